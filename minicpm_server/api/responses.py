"""Every answer the generation endpoints give, whole or streamed: one formatter per endpoint.

`POST /` answers the tutorial's `{"response", "status", "time"}` (streamed: one JSON object per
line); `/v1/chat/completions` and `/v1/completions` answer OpenAI's shapes (streamed: server-sent
events ending in `data: [DONE]`). The routes pick a formatter and never shape a body themselves.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from minicpm_server.api.errors import error_payload
from minicpm_server.api.protocol import (
    ChatChoice,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    LegacyChatResponse,
    Usage,
)
from minicpm_server.engine.protocol import Completion, Finished, TextDelta


def now_string() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def finish_reason(reason: str) -> str:
    """OpenAI's reasons: "length" when the budget ran out, otherwise "stop" (cancelled never reaches a client)."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


# --------------------------------------------------------------------------- POST /


class LegacyFormat:
    """The tutorial's endpoint."""

    @staticmethod
    def answer(done: Completion) -> LegacyChatResponse:
        return LegacyChatResponse(response=done.text, status=200, time=now_string())

    @staticmethod
    async def stream(events: AsyncIterator[TextDelta | Finished]) -> AsyncIterator[str]:
        """NDJSON: the contract's keys plus `done`; the last line has the finish reason and usage."""
        try:
            async for event in events:
                line: dict[str, Any] = {"response": "", "status": 200, "time": now_string(), "done": False}
                if isinstance(event, TextDelta):
                    line["response"] = event.text
                else:
                    line["done"] = True
                    line["finish_reason"] = finish_reason(event.reason)
                    line["usage"] = usage(event.prompt_tokens, event.completion_tokens).model_dump()
                yield json.dumps(line, ensure_ascii=False) + "\n"
        except Exception as exc:
            line = {"response": None, "status": 503, "time": now_string(), "done": True, "error": error_payload(exc)}
            yield json.dumps(line, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- OpenAI


class OpenAIFormat:
    """What the two /v1 endpoints share: ids, chunk envelopes, the usage chunk and [DONE]."""

    id_prefix = ""
    chunk_object = ""

    def answer(self, done: Completion, model: str) -> Any:
        raise NotImplementedError

    def opening_chunk(self) -> dict[str, Any] | None:
        """A choice sent before any text, or None."""
        return None

    def piece(self, text: str, reason: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"

    async def stream(
        self, events: AsyncIterator[TextDelta | Finished], model: str, include_usage: bool
    ) -> AsyncIterator[str]:
        base = {"id": self.new_id(), "object": self.chunk_object, "created": int(time.time()), "model": model}

        def chunk(choice: dict[str, Any]) -> str:
            body = {**base, "choices": [{"index": 0, "logprobs": None, **choice}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        try:
            opening = self.opening_chunk()
            if opening is not None:
                yield chunk(opening)
            async for event in events:
                if isinstance(event, TextDelta):
                    yield chunk(self.piece(event.text))
                    continue
                yield chunk(self.piece("", finish_reason(event.reason)))
                if include_usage:
                    tail = usage(event.prompt_tokens, event.completion_tokens).model_dump()
                    yield _sse({**base, "choices": [], "usage": tail})
        except Exception as exc:
            yield _sse({"error": error_payload(exc)})
        yield _sse("[DONE]")


class ChatFormat(OpenAIFormat):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def answer(self, done: Completion, model: str) -> ChatCompletionResponse:
        choice = ChatChoice(message=ChatMessageOut(content=done.text), finish_reason=finish_reason(done.finish_reason))
        return ChatCompletionResponse(
            id=self.new_id(),
            created=int(time.time()),
            model=model,
            choices=[choice],
            usage=usage(done.prompt_tokens, done.completion_tokens),
        )

    def opening_chunk(self) -> dict[str, Any]:
        return {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}

    def piece(self, text: str, reason: str | None = None) -> dict[str, Any]:
        return {"delta": {"content": text} if text or reason is None else {}, "finish_reason": reason}


class CompletionFormat(OpenAIFormat):
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def answer(self, done: Completion, model: str) -> CompletionResponse:
        choice = CompletionChoice(text=done.text, finish_reason=finish_reason(done.finish_reason))
        return CompletionResponse(
            id=self.new_id(),
            created=int(time.time()),
            model=model,
            choices=[choice],
            usage=usage(done.prompt_tokens, done.completion_tokens),
        )

    def piece(self, text: str, reason: str | None = None) -> dict[str, Any]:
        return {"text": text, "finish_reason": reason}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
