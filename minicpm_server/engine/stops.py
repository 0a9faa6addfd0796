"""Stop strings on streamed text, for every backend: where one starts, and what to hold back.

A stop string may arrive split across tokens, so text that could be the start of one is held
back until it either completes (the answer ends before it) or cannot any more (it is sent).
"""

from __future__ import annotations


def first_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Where the earliest stop string starts, searching only text that could hold a new one."""
    if not stops:
        return None
    start = max(0, emitted - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stop_prefix_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
