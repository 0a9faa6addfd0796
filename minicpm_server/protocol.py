"""Request and response models for every endpoint, in one place.

Validation is strict: no type coercion ("10" is not a number), no unknown fields, no NaN or
Infinity, no lone surrogates in strings. A bad request gets a 400 that names the field; nothing
a client sends is silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Sampling defaults of the tutorial's model.chat call (temperature, top_p, repetition_penalty).
DEFAULT_TEMPERATURE = 0.5
DEFAULT_TOP_P = 0.8
DEFAULT_REPETITION_PENALTY = 1.02


def _no_lone_surrogates(value: str) -> str:
    # JSON may spell "\ud800"; such a string cannot be encoded as UTF-8, tokenized or echoed back.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string contains a lone UTF-16 surrogate, which is not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]

MAX_STOP_STRINGS = 32
StopText = Annotated[Text, Field(min_length=1, max_length=1000)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)] | None


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ChatMessage(StrictModel):
    role: Literal["user", "assistant", "system"] = Field(description="MiniCPM renders non-user turns as plain text.")
    content: Text


class SamplingFields(StrictModel):
    """Sampling options shared by every generation endpoint."""

    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="0 disables top-k.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(False, description="Keep generating after the end-of-sequence token.")


class LegacyChatRequest(SamplingFields):
    """`POST /`: the tutorial's body, `{"prompt": ...}`, plus optional model.chat-style fields."""

    prompt: Text
    history: list[ChatMessage] | None = Field(None, description="Earlier turns, oldest first.")
    max_length: int | None = Field(None, ge=1, description="Total tokens, prompt included, as in model.chat.")
    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate; wins over max_length.")
    do_sample: bool = Field(True, description="false means greedy decoding.")
    stop: Stop = Field(None, description=f"Stop when one of these (up to {MAX_STOP_STRINGS}) appears.")
    stream: bool = Field(False, description="Answer as newline-delimited JSON chunks.")


class LegacyChatResponse(BaseModel):
    response: str
    status: int = 200
    time: str = Field(description="Server local time, YYYY-MM-DD HH:MM:SS.")


# --------------------------------------------------------------------------- OpenAI-compatible


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class ChatCompletionMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart] = Field(description="A string, or text parts (joined).")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(StrictModel):
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    """Fields both /v1 generation endpoints take, including OpenAI's that we only accept at their defaults."""

    model: Text | None = Field(None, description="Any name is accepted; answers name the served model.")
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description=f"Up to {MAX_STOP_STRINGS} stop strings.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Only 0; use repetition_penalty.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Only 0; use repetition_penalty.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported.")
    user: Text | None = Field(None, description="An end-user id; recorded nowhere.")

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to something we cannot do, with why: a 400, never silently ignored."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.presence_penalty or self.frequency_penalty:
            name = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return name, "not supported; use repetition_penalty"
        if self.logit_bias:
            return "logit_bias", "not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "only allowed when stream is true"
        return None


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens.")
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
            if getattr(self, name) not in (None, []):
                return name, "tool and function calling are not supported by MiniCPM-2B"
        if self.logprobs or self.top_logprobs is not None:
            return ("logprobs" if self.logprobs else "top_logprobs"), "log probabilities are not supported"
        if self.response_format is not None and self.response_format != {"type": "text"}:
            return "response_format", "only {'type': 'text'} is supported"
        return super().unsupported()


class CompletionRequest(OpenAIFields):
    prompt: Text | list[Text] = Field(description="A string (or a list holding one string); no chat template.")
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", "send exactly one prompt per request"
        if self.echo:
            return "echo", "not supported"
        if self.suffix:
            return "suffix", "not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.logprobs is not None:
            return "logprobs", "log probabilities are not supported"
        return super().unsupported()

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "openbmb"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "unavailable", "shutting_down"]
    model: str | None = None
    running: int = 0
    waiting: int = 0
    detail: str | None = None


class FaultRequest(StrictModel):
    kind: Literal["oom", "fatal"] = Field(
        description="oom: the next step raises CUDA's out-of-memory error; fatal: the engine thread dies."
    )


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the error answers a route can give."""
    return {code: {"model": ErrorResponse} for code in codes}
