"""Between the HTTP routes and the engine: one generation, seen from the HTTP side.

A request body becomes one GenerationRequest per prompt (rendered and tokenized off the event
loop), goes to the engine through its protocol, and comes back as events. `TrackedGeneration`
records time to first token, token counts and latency, and cancels the engine request whenever
its consumer stops early (a client that disconnects, a stream that is abandoned, a server
shutting down). A body with several prompts (/v1/completions) is submitted whole or not at all,
collected together (`complete_all`) or streamed as one interleaved sequence (`merged_events`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from minicpm_server.api.errors import APIError, ClientDisconnected
from minicpm_server.api.metrics import Metrics
from minicpm_server.api.protocol import GenerationBody, PromptInput
from minicpm_server.engine.protocol import (
    Completion,
    Engine,
    EngineError,
    EngineUnavailableError,
    Finished,
    GenerationHandle,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
)


@dataclass
class PreparedRequest:
    request: GenerationRequest
    prompt: PromptInput

    @property
    def prompt_text(self) -> str:
        return self.prompt.text


def prepare(engine: Engine, body: GenerationBody) -> list[PreparedRequest]:
    """Render, tokenize and convert a generation body (LegacyChatRequest, ChatCompletionRequest, ...)."""
    return [
        PreparedRequest(engine.prepare(body.to_generation_request(prompt.ids, engine.context_window)), prompt)
        for prompt in body.prompts(engine.tokenizer)
    ]


async def submit(
    engine: Engine, body: GenerationBody, request: Request, metrics: Metrics, timeout: float
) -> list[TrackedGeneration]:
    """One generation per prompt, all submitted or none (a refusal cancels those already queued).
    Rendering and tokenizing a long history takes real time: it runs off the event loop."""
    prepared = await asyncio.to_thread(prepare, engine, body)
    started: list[TrackedGeneration] = []
    try:
        for one in prepared:
            started.append(TrackedGeneration.submit(engine, one, request, metrics, timeout))
    except Exception:
        for gen in started:
            gen.handle.cancel()
        raise
    return started


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
    last_token_at: float = 0.0
    finished_at: float | None = None  # when Finished arrived (perf_counter, as `started`)
    text_parts: list[str] = field(default_factory=list)
    finished: Finished | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    timeout: float = 0.0  # seconds from `started`; 0 = no deadline
    completion_tokens: int = 0

    @classmethod
    def submit(
        cls, engine: Engine, prepared: PreparedRequest, request: Request, metrics: Metrics, timeout: float = 0.0
    ) -> TrackedGeneration:
        started = getattr(request.state, "started", None) or time.perf_counter()
        handle = engine.submit(prepared.request)
        gen = cls(handle, prepared, request, metrics, started, timeout=timeout)
        request.state.generations = [*getattr(request.state, "generations", []), gen]
        gen._note_usage(0)
        return gen

    def _note_usage(self, completion_tokens: int) -> None:
        """The request's token counts for its log line: every generation of the request, summed."""
        self.completion_tokens = completion_tokens
        gens = getattr(self.request.state, "generations", [self])
        self.request.state.usage = (
            sum(g.handle.prompt_tokens for g in gens),
            sum(getattr(g, "completion_tokens", 0) for g in gens),
        )

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
                    self._note_token_times(event.completion_tokens)
                    self.text_parts.append(event.text)
                    self.logprobs.extend(event.logprobs)
                    if event.prompt_logprobs is not None:
                        self.prompt_logprobs = event.prompt_logprobs
                    self._note_usage(event.completion_tokens)
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

    def _note_token_times(self, completion_tokens: int) -> None:
        """The first token's time, then the gaps between later ones (for the latency metrics)."""
        now = time.perf_counter()
        new_tokens = completion_tokens - self.completion_tokens
        if self.first_token_at is None:
            self.first_token_at = now
        elif new_tokens > 0:
            self.metrics.observe_token_gap(now - self.last_token_at, new_tokens)
        if new_tokens > 0:
            self.last_token_at = now

    def _record(self, done: Finished) -> None:
        self.finished = done
        now = self.finished_at = time.perf_counter()
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        self.metrics.observe_generation(done.prompt_tokens, done.completion_tokens, ttft, now - self.started)
        self._note_usage(done.completion_tokens)
        self.request.state.texts = (self.prepared.prompt_text, "".join(self.text_parts))

    async def complete(self) -> Completion:
        """The whole answer, or ClientDisconnected (and the request cancelled) if the client leaves first."""
        (done,) = await complete_all([self])
        return done

    async def drain(self) -> Completion:
        async for _ in self.events():
            pass
        assert self.finished is not None
        f = self.finished
        text = "".join(self.text_parts)
        return Completion(text, f.reason, f.prompt_tokens, f.completion_tokens, self.logprobs, self.prompt_logprobs)


async def complete_all(gens: list[TrackedGeneration]) -> list[Completion]:
    """Every generation's whole answer, in order; ClientDisconnected (all cancelled) if the client leaves first."""
    collector = asyncio.ensure_future(asyncio.gather(*(g.drain() for g in gens)))
    gone = asyncio.ensure_future(_wait_for_disconnect(gens[0].request))
    try:
        done, _ = await asyncio.wait({collector, gone}, return_when=asyncio.FIRST_COMPLETED)
        if collector in done:
            return list(collector.result())
        raise ClientDisconnected()
    finally:
        gone.cancel()
        if not collector.done():
            collector.cancel()
            for gen in gens:
                gen.handle.cancel()


async def merged_events(gens: list[TrackedGeneration]) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
    """The generations' events as they come, each with its generation's index. A failure in any
    is raised here; leaving early cancels every generation still running."""
    if len(gens) == 1:  # the common case needs no tasks
        async for event in gens[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, gen: TrackedGeneration) -> None:
        try:
            async for event in gen.events():
                await queue.put((index, event))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))
        await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for gen in gens:
            if gen.finished is None:
                gen.handle.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
