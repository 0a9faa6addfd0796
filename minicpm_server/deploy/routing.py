"""Prefix affinity without Ray: which replica has most of a prompt's prefix cached.

A chat's next turn resends its whole history, and only the replica that served the last turn has
that history's KV cached. The router therefore remembers, per replica, the prompts it sent there,
as chained hashes of fixed-size blocks of the prompt's text (as vLLM hashes KV blocks of tokens,
here of characters: the router has no tokenizer), and prefers the replica holding the longest run
of a new prompt's leading blocks. Load evens out through the caller: when the preferred replica
is busier than the least loaded by more than a threshold, the least loaded wins.

The prompt's text is read from the JSON body (`routing_text`), tolerantly: a body the server will
refuse routes as an empty prompt (to the least loaded replica) and gets its 4xx there.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

# Characters per hashed block: a few tokens of MiniCPM's (1-4 characters each), small enough that
# a short first turn still makes a block the next turn can match.
BLOCK_CHARS = 16
# Blocks remembered per replica, least recently routed dropped first: far more than a replica's
# KV cache holds, so the router forgets later than the engine does.
MAX_BLOCKS_PER_REPLICA = 200_000
# Separators that cannot occur in JSON-decoded text typed by people, so that "ab"+"c" and
# "a"+"bc" never render alike.
_FIELD = "\x1f"
_RECORD = "\x1e"


def routing_text(path: str, body: bytes) -> str:
    """The prompt as a prefix-preserving string: a later turn of a chat renders as an extension of
    the earlier turn's string. Handles OpenAI chat/completions, Ollama chat/generate and the
    tutorial's POST / (its prompt is the chat's newest user turn, after its history); anything
    else is ""."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    parts: list[str] = []
    if isinstance(data.get("system"), str):  # Ollama's /api/generate
        parts.append(_message("system", data["system"]))
    for key in ("history", "messages"):
        if isinstance(data.get(key), list):
            parts.extend(_message(m.get("role"), m.get("content")) for m in data[key] if isinstance(m, dict))
    if "prompt" in data:
        parts.append(_message("user", data["prompt"]) if path == "/" else _prompt_text(data["prompt"]))
    return "".join(parts)


def _message(role: Any, content: Any) -> str:
    return f"{role}{_FIELD}{_content_text(content)}{_RECORD}"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt_text(prompt: Any) -> str:
    """A completion's prompt: text, token ids, or a batch of either (the first one decides)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return ",".join(map(str, prompt)) + ","
        return _prompt_text(prompt[0])
    return ""


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[int]:
    """Chained hashes of the text's whole blocks: block i's hash covers blocks 0..i, so two texts
    share hash i only when they share their first (i+1)*block_chars characters."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """Per replica, the block hashes of prompts routed there (an LRU set each)."""

    def __init__(self, max_blocks_per_replica: int = MAX_BLOCKS_PER_REPLICA) -> None:
        self.max_blocks = max_blocks_per_replica
        self._blocks: dict[Hashable, OrderedDict[int, None]] = {}

    def matched_blocks(self, replica: Hashable, hashes: Sequence[int]) -> int:
        """How many of the prompt's leading blocks the replica was sent before."""
        held = self._blocks.get(replica)
        if not held:
            return 0
        count = 0
        for h in hashes:
            if h not in held:
                break
            count += 1
        return count

    def record(self, replica: Hashable, hashes: Iterable[int]) -> None:
        held = self._blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_blocks:
            held.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        self._blocks.pop(replica, None)

    def keep_only(self, replicas: Iterable[Hashable]) -> None:
        alive = set(replicas)
        for gone in [r for r in self._blocks if r not in alive]:
            del self._blocks[gone]


def choose_by_prefix(
    index: PrefixIndex, hashes: Sequence[int], loads: dict[Hashable, int], imbalance_threshold: int
) -> list[list[Hashable]]:
    """Replicas in ranks, most preferred first. The one with the longest cached prefix leads when
    it has a match and its load exceeds the lightest by at most `imbalance_threshold`; otherwise
    all replicas form one rank and the caller takes the least loaded of them."""
    replicas = list(loads)
    if not replicas:
        return []
    matches = {r: index.matched_blocks(r, hashes) for r in replicas}
    best = max(replicas, key=lambda r: (matches[r], -loads[r]))
    lightest = min(loads.values())
    if matches[best] == 0 or loads[best] - lightest > imbalance_threshold:
        random.shuffle(replicas)  # the caller takes the first of equally loaded replicas
        return [replicas]
    rest = sorted((r for r in replicas if r != best), key=lambda r: loads[r])
    return [[best], rest] if rest else [[best]]
