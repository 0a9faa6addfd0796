"""Between the HTTP routes and the engine: one generation, seen from the HTTP side.

A request body becomes a GenerationRequest (rendered and tokenized off the event loop), goes to
the engine through its protocol, and comes back as events. `TrackedGeneration` records time to
first token, token counts and latency, and cancels the engine request whenever its consumer
stops early (a client that disconnects, a stream that is abandoned, a server shutting down).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from minicpm_server.api.errors import APIError, ClientDisconnected
from minicpm_server.api.metrics import Metrics
from minicpm_server.api.protocol import GenerationBody
from minicpm_server.engine.protocol import (
    Completion,
    Engine,
    EngineError,
    EngineUnavailableError,
    Finished,
    GenerationHandle,
    GenerationRequest,
    TextDelta,
)


@dataclass
class PreparedRequest:
    request: GenerationRequest
    prompt_text: str


def prepare(engine: Engine, body: GenerationBody) -> PreparedRequest:
    """Render, tokenize and convert a generation body (LegacyChatRequest, ChatCompletionRequest, ...)."""
    text = body.prompt_text(engine.tokenizer)
    ids = engine.tokenizer.encode(text)
    return PreparedRequest(body.to_generation_request(ids, engine.context_window), text)


async def submit(
    engine: Engine, body: GenerationBody, request: Request, metrics: Metrics, timeout: float
) -> TrackedGeneration:
    """Rendering and tokenizing a long history takes real time: it runs off the event loop."""
    prepared = await asyncio.to_thread(prepare, engine, body)
    return TrackedGeneration.submit(engine, prepared, request, metrics, timeout)


# --------------------------------------------------------------------------- running generations


@dataclass
class TrackedGeneration:
    """One engine request seen from the HTTP side: metrics, usage for the log, cancellation on early exit."""

    handle: GenerationHandle
    prepared: PreparedRequest
    request: Request
    metrics: Metrics
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    text_parts: list[str] = field(default_factory=list)
    finished: Finished | None = None

    timeout: float = 0.0  # seconds from `started`; 0 = no deadline

    @classmethod
    def submit(
        cls, engine: Engine, prepared: PreparedRequest, request: Request, metrics: Metrics, timeout: float = 0.0
    ) -> TrackedGeneration:
        started = getattr(request.state, "started", None) or time.perf_counter()
        handle = engine.submit(prepared.request)
        request.state.usage = (handle.prompt_tokens, 0)
        return cls(handle, prepared, request, metrics, started, timeout=timeout)

    async def _next_event(self, events: AsyncIterator[TextDelta | Finished]) -> TextDelta | Finished:
        if not self.timeout:
            return await events.__anext__()
        remaining = self.started + self.timeout - time.perf_counter()
        try:
            return await asyncio.wait_for(events.__anext__(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise APIError(
                504,
                f"the request took longer than {self.timeout:g} s (--request-timeout) and was cancelled",
                code="timeout",
            ) from None

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        source = self.handle.events()
        failed = False
        try:
            while True:
                try:
                    event = await self._next_event(source)
                except StopAsyncIteration:
                    return
                if isinstance(event, TextDelta):
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                    self.text_parts.append(event.text)
                    self.request.state.usage = (self.handle.prompt_tokens, event.completion_tokens)
                else:
                    self._record(event)
                yield event
                if isinstance(event, Finished):
                    return
        except (EngineError, EngineUnavailableError):
            failed = True  # the engine ended it: a failure, not a cancellation
            raise
        finally:
            if self.finished is None and not failed:
                self.handle.cancel()  # the consumer stopped early: free the engine's slot now
                self.request.state.cancelled = True

    def _record(self, done: Finished) -> None:
        self.finished = done
        now = time.perf_counter()
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        self.metrics.observe_generation(done.prompt_tokens, done.completion_tokens, ttft, now - self.started)
        self.request.state.usage = (done.prompt_tokens, done.completion_tokens)
        self.request.state.texts = (self.prepared.prompt_text, "".join(self.text_parts))

    async def complete(self) -> Completion:
        """The whole answer, or ClientDisconnected (and the request cancelled) if the client leaves first."""
        collector = asyncio.ensure_future(self._drain())
        gone = asyncio.ensure_future(_wait_for_disconnect(self.request))
        try:
            done, _ = await asyncio.wait({collector, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collector in done:
                return collector.result()
            raise ClientDisconnected()
        finally:
            gone.cancel()
            if not collector.done():
                collector.cancel()
                self.handle.cancel()

    async def _drain(self) -> Completion:
        async for _ in self.events():
            pass
        assert self.finished is not None
        f = self.finished
        return Completion("".join(self.text_parts), f.reason, f.prompt_tokens, f.completion_tokens)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
