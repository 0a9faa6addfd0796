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
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    LegacyChatResponse,
    PromptInput,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from minicpm_server.api.structured import tool_calls_from
from minicpm_server.engine.protocol import Completion, Finished, TextDelta, TokenLogprob
from minicpm_server.model.tokenizer import Tokenizer


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


class TokenNames:
    """Token ids as log-probability entries show them (the tokenizer's token_text and token_bytes)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        found = self._texts.get(token_id)
        if found is None:
            found = self._texts[token_id] = self.tokenizer.token_text(token_id)
        return found

    def byte_list(self, token_id: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token_id))

    def width(self, token_id: int) -> int:
        """How much of a choice's text the token accounts for (text_offset): BOS and EOS none."""
        if token_id in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            return 0
        return len(self.text(token_id))


class OpenAIFormat:
    """What the two /v1 endpoints share: ids, chunk envelopes, the usage chunk and [DONE]."""

    id_prefix = ""
    chunk_object = ""

    def __init__(self, names: TokenNames, prompts: list[PromptInput]) -> None:
        self.names = names
        self.prompts = prompts

    def answer(self, done: list[Completion], model: str) -> Any:
        raise NotImplementedError

    def opening_chunk(self) -> dict[str, Any] | None:
        """A choice sent before any text, or None."""
        return None

    def piece(self, index: int, delta: TextDelta | None, reason: str | None = None) -> dict[str, Any]:
        """One choice of a chunk: the delta's text (and log-probabilities), or the finish."""
        raise NotImplementedError

    def closing(self, index: int, reason: str) -> list[dict[str, Any]]:
        """The choices that end a choice's stream (the finish, and whatever must come before it)."""
        return [self.piece(index, None, reason)]

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"

    async def stream(
        self, events: AsyncIterator[tuple[int, TextDelta | Finished]], model: str, include_usage: bool
    ) -> AsyncIterator[str]:
        base = {"id": self.new_id(), "object": self.chunk_object, "created": int(time.time()), "model": model}

        def chunk(choice: dict[str, Any]) -> str:
            body = {**base, "choices": [{"logprobs": None, **choice}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        totals = [0, 0]
        try:
            opening = self.opening_chunk()
            if opening is not None:
                yield chunk(opening)
            async for index, event in events:
                if isinstance(event, TextDelta):
                    yield chunk(self.piece(index, event))
                    continue
                for choice in self.closing(index, finish_reason(event.reason)):
                    yield chunk(choice)
                totals[0] += event.prompt_tokens
                totals[1] += event.completion_tokens
            if include_usage:
                yield _sse({**base, "choices": [], "usage": usage(*totals).model_dump()})
        except Exception as exc:
            yield _sse({"error": error_payload(exc)})
        yield _sse("[DONE]")


class ChatFormat(OpenAIFormat):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        names: TokenNames,
        prompts: list[PromptInput],
        logprobs: bool = False,
        tool_request: ChatCompletionRequest | None = None,
    ) -> None:
        super().__init__(names, prompts)
        self.logprobs = logprobs
        self.tool_request = tool_request  # set when the answer is a tool call (api/structured.py)
        self._named_call: dict[str, Any] | None = None  # the streamed call of a named tool_choice
        self._buffer: list[str] = []  # a "required" answer, parsed when it ends

    def answer(self, done: list[Completion], model: str) -> ChatCompletionResponse:
        (one,) = done
        message, reason = ChatMessageOut(content=one.text), finish_reason(one.finish_reason)
        calls = self._tool_calls(one.text, reason)
        if calls is not None:
            message, reason = ChatMessageOut(content=None, tool_calls=[ToolCallOut(**c) for c in calls]), "tool_calls"
        choice = ChatChoice(
            message=message,
            finish_reason=reason,
            logprobs=ChatLogprobs(content=self._entries(one.logprobs)) if self.logprobs else None,
        )
        return ChatCompletionResponse(
            id=self.new_id(),
            created=int(time.time()),
            model=model,
            choices=[choice],
            usage=usage(one.prompt_tokens, one.completion_tokens),
        )

    def _entries(self, scores: list[TokenLogprob]) -> list[TokenLogprobOut]:
        def top(token_id: int, logprob: float) -> TopLogprob:
            return TopLogprob(token=self.names.text(token_id), logprob=logprob, bytes=self.names.byte_list(token_id))

        return [
            TokenLogprobOut(**top(s.token_id, s.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in s.top])
            for s in scores
        ]

    def _tool_calls(self, text: str, reason: str) -> list[dict[str, Any]] | None:
        """The answer as tool calls, or None: no tool was asked for, or max_tokens cut the call
        (then the partial text is the content, with finish_reason "length")."""
        if self.tool_request is None or reason == "length":
            return None
        try:
            return tool_calls_from(text, self.tool_request)
        except ValueError:
            return None

    def opening_chunk(self) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""}
        choice = self.tool_request.tool_choice if self.tool_request is not None else None
        if choice is not None and choice != "required":  # a named call streams its arguments as they come
            self._named_call = _call_header(choice.function.name)
            delta = {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **self._named_call}]}
        return {"index": 0, "delta": delta, "finish_reason": None}

    def piece(self, index: int, delta: TextDelta | None, reason: str | None = None) -> dict[str, Any]:
        if delta is None:
            return {"index": index, "delta": {}, "finish_reason": reason}
        content: dict[str, Any] = {"content": delta.text}
        if self._named_call is not None:
            content = {"tool_calls": [{"index": 0, "function": {"arguments": delta.text}}]}
        elif self.tool_request is not None:  # "required": the calls are known when the list is complete
            self._buffer.append(delta.text)
            content = {}
        choice: dict[str, Any] = {"index": index, "delta": content, "finish_reason": None}
        if self.logprobs:
            choice["logprobs"] = {"content": [e.model_dump() for e in self._entries(delta.logprobs)]}
        return choice

    def closing(self, index: int, reason: str) -> list[dict[str, Any]]:
        if self.tool_request is None:
            return [self.piece(index, None, reason)]
        if self._named_call is not None:
            return [self.piece(index, None, "tool_calls" if reason != "length" else reason)]
        text = "".join(self._buffer)
        calls = self._tool_calls(text, reason)
        if calls is None:  # cut by max_tokens: the partial text, as content
            return [
                {"index": index, "delta": {"content": text}, "finish_reason": None},
                self.piece(index, None, reason),
            ]
        deltas = [{"index": i, **call} for i, call in enumerate(calls)]
        return [
            {"index": index, "delta": {"tool_calls": deltas}, "finish_reason": None},
            self.piece(index, None, "tool_calls"),
        ]


class CompletionFormat(OpenAIFormat):
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def __init__(
        self, names: TokenNames, prompts: list[PromptInput], logprobs: int | None = None, echo: bool = False
    ) -> None:
        super().__init__(names, prompts)
        self.logprobs, self.echo = logprobs, echo
        self._offsets = [0] * len(prompts)  # per choice: where the next token's text starts
        self._opened = [False] * len(prompts)  # per choice: the echoed prompt has been sent

    def answer(self, done: list[Completion], model: str) -> CompletionResponse:
        choices = []
        for index, one in enumerate(done):
            prefix = self.prompts[index].text if self.echo else ""
            scores = self._scores(index, one.prompt_logprobs, one.logprobs)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=prefix + one.text,
                    finish_reason=finish_reason(one.finish_reason),
                    logprobs=scores,
                )
            )
        return CompletionResponse(
            id=self.new_id(),
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage(sum(d.prompt_tokens for d in done), sum(d.completion_tokens for d in done)),
        )

    def piece(self, index: int, delta: TextDelta | None, reason: str | None = None) -> dict[str, Any]:
        if delta is None:
            return {"index": index, "text": "", "finish_reason": reason}
        text, prompt_scores = delta.text, None
        if self.echo and not self._opened[index]:
            self._opened[index] = True
            text, prompt_scores = self.prompts[index].text + text, delta.prompt_logprobs
        scores = self._scores(index, prompt_scores, delta.logprobs)
        return {
            "index": index,
            "text": text,
            "logprobs": None if scores is None else scores.model_dump(),
            "finish_reason": None,
        }

    def _scores(
        self, index: int, prompt_scores: list[TokenLogprob | None] | None, generated: list[TokenLogprob]
    ) -> CompletionLogprobs | None:
        """OpenAI's legacy logprobs for the echoed prompt's tokens (when given) and the generated ones."""
        if self.logprobs is None:
            return None
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        prompt_ids = self.prompts[index].ids
        entries: list[tuple[int, TokenLogprob | None]] = []
        if prompt_scores is not None:
            entries.extend(zip(prompt_ids, prompt_scores, strict=True))
        entries.extend((s.token_id, s) for s in generated)
        for token_id, score in entries:
            text = self.names.text(token_id)
            out.tokens.append(text)
            out.text_offset.append(self._offsets[index])
            self._offsets[index] += self.names.width(token_id)
            if score is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(score.logprob)
            best = {self.names.text(t): v for t, v in score.top}
            best.setdefault(text, score.logprob)  # the token itself, as OpenAI's legacy shape lists it
            out.top_logprobs.append(best)
        return out


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _call_header(name: str) -> dict[str, Any]:
    """A streamed tool call's first delta: its id, type and name, with no arguments yet."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": ""}}
