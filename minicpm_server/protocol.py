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
    stop: Text | list[Text] | None = Field(None, description="Stop when any of these strings appears.")
    stream: bool = Field(False, description="Answer as newline-delimited JSON chunks.")


class LegacyChatResponse(BaseModel):
    response: str
    status: int = 200
    time: str = Field(description="Server local time, YYYY-MM-DD HH:MM:SS.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    model: str | None = None
    running: int = 0
    waiting: int = 0
    detail: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the error answers a route can give."""
    return {code: {"model": ErrorResponse} for code in codes}
