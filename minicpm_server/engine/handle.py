"""The caller's side of a submitted request, shared by the backends: events on the caller's loop.

Engines run elsewhere (the native engine on its own thread, vLLM on its own event loop), so
events cross over with `call_soon_threadsafe`, batched per loop so that one engine step costs the
server's loop one wake-up however many requests it advanced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from minicpm_server.engine.protocol import Finished, GenerationRequest, TextDelta

_ids = itertools.count(1)


@dataclass
class Failed:
    error: Exception


Event = TextDelta | Finished | Failed


class QueueHandle:
    """Implements protocol.GenerationHandle; create it on the event loop that will read it."""

    def __init__(self, request: GenerationRequest, on_cancel: Callable[[QueueHandle], None] | None = None) -> None:
        self.id = next(_ids)
        self.prompt_ids = request.prompt_ids
        self.params = request.params
        self.grammar = request.grammar  # the backend's compiled constraint, if any
        self.cancelled = False
        self._on_cancel = on_cancel
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Free this request's slot; its events end with Finished("cancelled")."""
        if self.cancelled:
            return
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel(self)

    def deliver(self, event: Event) -> None:
        """On the handle's own loop."""
        self._queue.put_nowait(event)

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        """Text deltas, then one Finished; raises the engine's error if generation failed."""
        while True:
            event = await self._queue.get()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Finished):
                return


def emit_all(events: list[tuple[QueueHandle, Event]]) -> None:
    """Hand events to their handles' loops, from any thread: one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[QueueHandle, Event]]] = {}
    for handle, event in events:
        by_loop.setdefault(handle._loop, []).append((handle, event))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is listening any more
            loop.call_soon_threadsafe(_deliver_all, items)


def _deliver_all(items: list[tuple[QueueHandle, Event]]) -> None:
    for handle, event in items:
        handle.deliver(event)
