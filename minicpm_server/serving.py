"""Between the HTTP routes and the engine.

Requests become prompt ids and sampling parameters; engine handles become completions or
streams. Every generation runs through `TrackedGeneration`, which records time to first token,
token counts and latency, and cancels the engine request whenever its consumer stops early (a
client that disconnects, a stream that is abandoned, a server shutting down).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from minicpm_server import chat
from minicpm_server.engine import Completion, ContextOverflowError, Engine, Finished, GenerationHandle, TextDelta
from minicpm_server.errors import APIError, ClientDisconnected, error_payload
from minicpm_server.metrics import Metrics
from minicpm_server.protocol import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    ChatCompletionRequest,
    CompletionRequest,
    LegacyChatRequest,
    OpenAIFields,
    SamplingFields,
)
from minicpm_server.sampling import SamplingParams

# OpenAI's /v1/completions answers 16 tokens when max_tokens is not given; clients rely on it.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class PreparedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str


def now_string() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


# --------------------------------------------------------------------------- preparing requests


def resolve_max_new_tokens(
    prompt_tokens: int, context_window: int, *, max_new_tokens: int | None = None, max_length: int | None = None
) -> int:
    """How many tokens to generate: explicit, or what max_length (prompt included) leaves, or the rest of the window."""
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is not None:
        if max_length <= prompt_tokens:
            raise APIError(
                400,
                f"max_length {max_length} leaves no room for an answer: the prompt alone is {prompt_tokens} tokens "
                "(max_length counts the prompt, as in model.chat)",
                param="max_length",
                code="context_length_exceeded",
            )
        return max_length - prompt_tokens
    return max(context_window - prompt_tokens, 1)  # a prompt that fills the window fails check_fits


def check_fits(engine: Engine, prompt_tokens: int, max_new_tokens: int, size_param: str) -> None:
    """The context-window check, naming the field the client actually sent."""
    try:
        engine.check_fits(prompt_tokens, max_new_tokens)
    except ContextOverflowError as exc:
        param = size_param if prompt_tokens < engine.context_window else "prompt"
        message = str(exc)
        if param == "max_length":
            message = (
                f"max_length {prompt_tokens + max_new_tokens} exceeds the context window of {engine.context_window} "
                f"tokens (the prompt is {prompt_tokens} tokens)"
            )
        elif param != "prompt":
            message = f"{param} is too large: {exc}"
        raise APIError(400, message, param=param, code="context_length_exceeded") from None


def sampling_params(
    fields: SamplingFields, max_new_tokens: int, *, do_sample: bool = True, stop: Sequence[str] = ()
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=DEFAULT_TEMPERATURE if fields.temperature is None else fields.temperature,
        top_p=DEFAULT_TOP_P if fields.top_p is None else fields.top_p,
        top_k=fields.top_k or 0,
        repetition_penalty=DEFAULT_REPETITION_PENALTY
        if fields.repetition_penalty is None
        else fields.repetition_penalty,
        do_sample=do_sample,
        seed=fields.seed,
        stop=tuple(stop),
        ignore_eos=fields.ignore_eos,
    )


def _prepare(
    engine: Engine,
    text: str,
    fields: SamplingFields,
    *,
    max_new_tokens: int | None,
    max_length: int | None = None,
    do_sample: bool = True,
    stop: Sequence[str] = (),
    size_param: str = "max_tokens",
) -> PreparedRequest:
    ids = chat.encode_prompt(engine.tokenizer, text)
    budget = resolve_max_new_tokens(
        len(ids), engine.context_window, max_new_tokens=max_new_tokens, max_length=max_length
    )
    check_fits(engine, len(ids), budget, size_param)
    return PreparedRequest(ids, sampling_params(fields, budget, do_sample=do_sample, stop=stop), text)


def prepare_legacy(engine: Engine, body: LegacyChatRequest) -> PreparedRequest:
    """POST /: model.chat's rendering, with a stop at the model's next turn marker."""
    history = [m.model_dump() for m in body.history or ()]
    text = chat.render_chat(engine.tokenizer, chat.conversation(body.prompt, history))
    return _prepare(
        engine,
        text,
        body,
        max_new_tokens=body.max_new_tokens,
        max_length=body.max_length,
        do_sample=body.do_sample,
        stop=(*stop_list(body.stop), *chat.TURN_MARKERS),
        size_param="max_new_tokens" if body.max_new_tokens is not None else "max_length",
    )


def _require_supported(body: OpenAIFields) -> None:
    problem = body.unsupported()
    if problem is not None:
        name, why = problem
        raise APIError(400, f"'{name}': {why}", param=name, code="unsupported_parameter")


def prepare_chat_completion(engine: Engine, body: ChatCompletionRequest) -> PreparedRequest:
    _require_supported(body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = chat.render_chat(engine.tokenizer, messages)
    size_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    return _prepare(
        engine,
        text,
        body,
        max_new_tokens=body.max_completion_tokens or body.max_tokens,
        stop=(*stop_list(body.stop), *chat.TURN_MARKERS),
        size_param=size_param,
    )


def prepare_completion(engine: Engine, body: CompletionRequest) -> PreparedRequest:
    _require_supported(body)
    return _prepare(
        engine,
        body.prompt_text(),
        body,
        max_new_tokens=body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
        stop=stop_list(body.stop),
    )


async def prepare_off_loop(func: Any, *args: Any) -> PreparedRequest:
    """Rendering and tokenizing a long history takes real time: keep it off the event loop."""
    return await asyncio.to_thread(func, *args)


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
        handle = engine.submit(prepared.prompt_ids, prepared.params)
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
                else:
                    self._record(event)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if self.finished is None:
                self.handle.cancel()  # the consumer stopped early: free the engine's slot now

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


# --------------------------------------------------------------------------- answer shapes


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def openai_answer(kind: str, done: Completion, model: str) -> dict[str, Any]:
    """The non-streaming body of /v1/chat/completions (kind "chat") or /v1/completions."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(done.finish_reason), "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": done.text}
    else:
        choice["text"] = done.text
    return {
        "id": new_id("chatcmpl" if kind == "chat" else "cmpl"),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(done.prompt_tokens, done.completion_tokens),
    }


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def openai_stream(gen: TrackedGeneration, *, kind: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending in `data: [DONE]`."""
    chunk_id, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
    base = {"id": chunk_id, "created": created, "model": model}
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choice: dict[str, Any]) -> str:
        body = {**base, "object": obj, "choices": [{"index": 0, "logprobs": None, **choice}]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    def piece(text: str, reason: str | None = None) -> dict[str, Any]:
        if kind == "chat":
            return {"delta": {"content": text} if text or reason is None else {}, "finish_reason": reason}
        return {"text": text, "finish_reason": reason}

    try:
        if kind == "chat":
            yield chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for event in gen.events():
            if isinstance(event, TextDelta):
                yield chunk(piece(event.text))
            else:
                yield chunk(piece("", finish_reason(event.reason)))
                if include_usage:
                    tail = {
                        **base,
                        "object": obj,
                        "choices": [],
                        "usage": usage(event.prompt_tokens, event.completion_tokens),
                    }
                    yield _sse(tail)
    except Exception as exc:
        yield _sse({"error": error_payload(exc)})
    yield _sse("[DONE]")


async def legacy_stream(gen: TrackedGeneration) -> AsyncIterator[str]:
    """POST / with stream: one JSON object per line, the contract's keys plus `done`."""
    try:
        async for event in gen.events():
            if isinstance(event, TextDelta):
                line = {"response": event.text, "status": 200, "time": now_string(), "done": False}
            else:
                line = {
                    "response": "",
                    "status": 200,
                    "time": now_string(),
                    "done": True,
                    "finish_reason": finish_reason(event.reason),
                    "usage": usage(event.prompt_tokens, event.completion_tokens),
                }
            yield json.dumps(line, ensure_ascii=False) + "\n"
    except Exception as exc:
        yield json.dumps({"error": error_payload(exc), "status": 503, "done": True}, ensure_ascii=False) + "\n"
