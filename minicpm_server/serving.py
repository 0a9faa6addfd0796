"""Between the HTTP routes and the engine: requests become prompt ids and sampling parameters,
and engine handles become completions, with the request cancelled when its client goes away."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from minicpm_server import chat
from minicpm_server.engine import Completion, ContextOverflowError, Engine, GenerationHandle
from minicpm_server.errors import APIError, ClientDisconnected
from minicpm_server.protocol import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    LegacyChatRequest,
    SamplingFields,
)
from minicpm_server.sampling import SamplingParams


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


def prepare_chat(
    engine: Engine,
    messages: Sequence[dict[str, str]],
    fields: SamplingFields,
    *,
    max_new_tokens: int | None,
    max_length: int | None = None,
    do_sample: bool = True,
    stop: Sequence[str] = (),
    size_param: str = "max_tokens",
) -> PreparedRequest:
    """A chat turn as model.chat would run it: template, BOS, and a stop at the next turn marker."""
    text = chat.render_chat(engine.tokenizer, messages)
    ids = chat.encode_prompt(engine.tokenizer, text)
    budget = resolve_max_new_tokens(
        len(ids), engine.context_window, max_new_tokens=max_new_tokens, max_length=max_length
    )
    check_fits(engine, len(ids), budget, size_param)
    params = sampling_params(fields, budget, do_sample=do_sample, stop=(*stop, *chat.TURN_MARKERS))
    return PreparedRequest(ids, params, text)


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


def prepare_legacy(engine: Engine, body: LegacyChatRequest) -> PreparedRequest:
    history = [m.model_dump() for m in body.history or ()]
    size_param = "max_new_tokens" if body.max_new_tokens is not None else "max_length"
    return prepare_chat(
        engine,
        chat.conversation(body.prompt, history),
        body,
        max_new_tokens=body.max_new_tokens,
        max_length=body.max_length,
        do_sample=body.do_sample,
        stop=stop_list(body.stop),
        size_param=size_param,
    )


async def prepare_off_loop(func: Any, *args: Any, **kwargs: Any) -> PreparedRequest:
    """Tokenizing a long history takes real time: keep it off the event loop."""
    return await asyncio.to_thread(func, *args, **kwargs)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def complete_or_cancel(handle: GenerationHandle, request: Request) -> Completion:
    """The whole completion, or ClientDisconnected (and the request cancelled) if the client leaves first."""
    result = asyncio.ensure_future(handle.result())
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result in done:
            return result.result()
        raise ClientDisconnected()
    finally:
        gone.cancel()
        if not result.done():
            handle.cancel()
            result.cancel()


def record_usage(request: Request, prepared: PreparedRequest, completion_tokens: int, answer: str | None) -> None:
    """What the request log line reports (see RequestLogMiddleware)."""
    request.state.usage = (len(prepared.prompt_ids), completion_tokens)
    request.state.texts = (prepared.prompt_text, answer)
