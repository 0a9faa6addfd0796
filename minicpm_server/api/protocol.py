"""Request and response models for every endpoint, in one place.

Validation is strict: no type coercion ("10" is not a number), no unknown fields, no NaN or
Infinity, no lone surrogates in strings. A bad request gets a 400 that names the field; nothing
a client sends is silently ignored. Everything that can be judged from the body alone is judged
while it is parsed (field constraints, and `model_validator`s across fields, which raise
`unsupported(...)` errors that errors.py turns into a 400 naming the field); only what needs the
prompt's token count (the budget against the context window) is left for later.

Each generation request converts itself (`prompt_text`, then `to_generation_request`) into the
engine's GenerationRequest: the token budget and the field that set it (`token_budget`), the
sampling parameters (the tutorial's defaults live in engine/protocol.py) and the stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from minicpm_server.api.structured import (
    _constrains,
    chat_turns,
    requested_constraint,
    tool_choice_problem,
    tool_constraint,
)
from minicpm_server.engine.protocol import MAX_LOGPROBS, Constraint, GenerationRequest, SamplingParams
from minicpm_server.model import chat
from minicpm_server.model.tokenizer import Tokenizer

# OpenAI's /v1/completions answers 16 tokens when max_tokens is not given; clients rely on it.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class InvalidRequest(ValueError):
    """A well-formed request that cannot be served as asked: a 400 naming `param`."""

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.param, self.code = param, code


UNSUPPORTED = "unsupported_parameter"


def unsupported(param: str, why: str) -> PydanticCustomError:
    """A validation error for a field set to something we cannot do; errors.py names `param`."""
    return PydanticCustomError(UNSUPPORTED, "'{param}': {why}", {"param": param, "why": why})


def token_budget(
    prompt_tokens: int,
    context_window: int,
    given: list[tuple[str, int | None]],
    fallback_field: str,
    default: int | None = None,
) -> tuple[int, str]:
    """The generation budget and the field that set it: the first field in `given` the client
    sent, else `default`, else the rest of the context window (named `fallback_field` in errors)."""
    for field, value in given:
        if value is not None:
            return value, field
    if default is not None:
        return default, fallback_field
    return max(context_window - prompt_tokens, 1), fallback_field  # a full window fails the engine's check


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


@dataclass(frozen=True)
class PromptInput:
    """One prompt as the engine takes it (`ids`) and as an echo or the log shows it (`text`)."""

    ids: list[int]
    text: str


class GenerationBody(Protocol):
    """What every generation request model does: its prompts (one per answer), then each one's
    GenerationRequest."""

    def prompts(self, tokenizer: Tokenizer) -> list[PromptInput]: ...

    def to_generation_request(self, prompt_ids: list[int], context_window: int) -> GenerationRequest: ...


class RenderedPrompt:
    """A body whose one prompt is text it renders (`prompt_text`), tokenized with BOS in front."""

    def prompt_text(self, tokenizer: Tokenizer) -> str:
        raise NotImplementedError

    def prompts(self, tokenizer: Tokenizer) -> list[PromptInput]:
        text = self.prompt_text(tokenizer)
        return [PromptInput(tokenizer.encode(text), text)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ChatMessage(StrictModel):
    role: Literal["user", "assistant", "system"] = Field(description="MiniCPM renders non-user turns as plain text.")
    content: Text


class RefusesUnsupported(StrictModel):
    """A request model that refuses, while it is parsed, the first field set to something we
    cannot do (`unsupported()` says which and why): never silently ignored."""

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        problem = self.unsupported()
        if problem is not None:
            raise unsupported(*problem)
        return self

    def unsupported(self) -> tuple[str, str] | None:
        return None


class SamplingFields(StrictModel):
    """Sampling options shared by every generation endpoint."""

    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="0 disables top-k.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(False, description="Keep generating after the end-of-sequence token.")
    min_p: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop tokens below min_p x the top token's probability."
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Subtracted from the logit of every token already generated."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Subtracted once per time a token has been generated."
    )

    def sampling_params(self, max_new_tokens: int, stop: tuple[str, ...], do_sample: bool = True) -> SamplingParams:
        """Fields the client left out take SamplingParams' defaults (the tutorial's)."""
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        chosen = {name: value for name, value in given.items() if value is not None}
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            **chosen,
        )


class LegacyChatRequest(RenderedPrompt, SamplingFields):
    """`POST /`: the tutorial's body, `{"prompt": ...}`, plus optional model.chat-style fields."""

    prompt: Text
    history: list[ChatMessage] | None = Field(None, description="Earlier turns, oldest first.")
    max_length: int | None = Field(None, ge=1, description="Total tokens, prompt included, as in model.chat.")
    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate; wins over max_length.")
    max_tokens: int | None = Field(
        None, ge=1, description="OpenAI's name for max_new_tokens (which wins if both are sent)."
    )
    do_sample: bool = Field(True, description="false means greedy decoding.")
    stop: Stop = Field(None, description=f"Stop when one of these (up to {MAX_STOP_STRINGS}) appears.")
    stream: bool = Field(False, description="Answer as newline-delimited JSON chunks.")

    def prompt_text(self, tokenizer: Tokenizer) -> str:
        """model.chat's rendering of the history and the new prompt."""
        history = [m.model_dump() for m in self.history or ()]
        return chat.render_chat(tokenizer, chat.conversation(self.prompt, history))

    def to_generation_request(self, prompt_ids: list[int], context_window: int) -> GenerationRequest:
        """Budget: max_new_tokens, else max_tokens, else what max_length (prompt included) leaves,
        else the rest of the window. Generation stops at the model's next turn marker, as
        model.chat cuts its answer there."""
        prompt_tokens = len(prompt_ids)
        if self.max_length is not None and self.max_length <= prompt_tokens:
            raise InvalidRequest(
                f"max_length {self.max_length} leaves no room for an answer: the prompt alone is "
                f"{prompt_tokens} tokens (max_length counts the prompt, as in model.chat)",
                "max_length",
                "context_length_exceeded",
            )
        after_prompt = None if self.max_length is None else self.max_length - prompt_tokens
        budget, field = token_budget(
            prompt_tokens,
            context_window,
            [("max_new_tokens", self.max_new_tokens), ("max_tokens", self.max_tokens), ("max_length", after_prompt)],
            "max_length",
        )
        stops = (*_stop_list(self.stop), *chat.TURN_MARKERS)
        return GenerationRequest(prompt_ids, self.sampling_params(budget, stops, self.do_sample), field)


class LegacyChatResponse(BaseModel):
    response: str
    status: int = 200
    time: str = Field(description="Server local time, YYYY-MM-DD HH:MM:SS.")


# --------------------------------------------------------------------------- OpenAI-compatible


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class FunctionCallIn(StrictModel):
    name: Text
    arguments: Text = Field(description="The arguments as a JSON string, as the server returned them.")


class ToolCallIn(StrictModel):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatCompletionMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = Field(
        description="A string, or text parts (joined); null only on an assistant turn that called tools."
    )
    name: Text | None = Field(None, description="Accepted; a tool message's function name is shown to the model.")
    tool_calls: list[ToolCallIn] | None = Field(None, description="An assistant turn's tool calls.")
    tool_call_id: Text | None = Field(None, description="A tool message: the call it answers.")

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise unsupported("content", "null only on an assistant message with tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise unsupported("tool_calls", "only an assistant message carries tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise unsupported("tool_call_id", "a tool message names the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


JsonValue = dict[str, Any]


class JsonSchemaFormat(StrictModel):
    name: Annotated[Text, Field(max_length=64)] = "response"
    description: Text | None = None
    schema_: JsonValue | None = Field(None, alias="schema", description="The JSON schema the answer must satisfy.")
    strict: bool | None = Field(None, description="Accepted: answers always follow the schema.")


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise unsupported("response_format.json_schema", "required with type json_schema, and only then")
        return self


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs` extension: exactly one of these."""

    json_: JsonValue | Text | None = Field(None, alias="json", description="A JSON schema (object or its text).")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1, max_length=1024)] | None = None
    grammar: Text | None = Field(None, description="An EBNF grammar (xgrammar's dialect, as vLLM's).")
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [n for n in ("json_", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise unsupported("structured_outputs", "give exactly one of json, regex, choice, grammar, json_object")
        return self


class FunctionDef(StrictModel):
    name: Annotated[Text, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: JsonValue | None = Field(None, description="A JSON schema of the arguments.")
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(StrictModel):
    name: Text


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: ToolChoiceFunction


class StreamOptions(StrictModel):
    include_usage: bool = False


class OpenAIFields(RefusesUnsupported, SamplingFields):
    """Fields both /v1 generation endpoints take, including OpenAI's that we only accept at their defaults."""

    model: Text | None = Field(None, description="Any name is accepted; answers name the served model.")
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description=f"Up to {MAX_STOP_STRINGS} stop strings.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported.")
    # Accepted and ignored: they cannot change the answer (OpenAI clients such as Open WebUI and
    # LangChain send some of them).
    user: Text | None = Field(None, description="An end-user id; recorded nowhere.")
    metadata: dict[str, Text] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored: nothing is stored.")
    service_tier: Text | None = Field(None, description="Accepted and ignored.")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the answer is JSON that parses (and validates), by construction."
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's extension: json, regex, choice, grammar (EBNF) or json_object."
    )

    def constraint(self) -> Constraint | None:
        """What response_format or structured_outputs asks the answer to be (None: free text)."""
        return requested_constraint(self.response_format, self.structured_outputs)

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to something we cannot do, with why."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.structured_outputs is not None and _constrains(self.response_format):
            return "structured_outputs", "give either response_format or structured_outputs, not both"
        if self.logit_bias:
            return "logit_bias", "not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "only allowed when stream is true"
        return None


class ChatCompletionRequest(RenderedPrompt, OpenAIFields):
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens.")
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"required" or a named function: the answer is a call, constrained to its schema.'
    )
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated by OpenAI: use tools.")
    function_call: Any = Field(None, description="Deprecated by OpenAI: use tool_choice.")
    logprobs: bool = Field(False, description="Return each answer token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many most likely tokens at each position."
    )
    parallel_tool_calls: bool | None = Field(
        None, description='With tool_choice "required": false allows exactly one call (default: one or more).'
    )
    reasoning_effort: Text | None = Field(None, description="Accepted and ignored: MiniCPM-2B does not reason apart.")
    modalities: list[Text] | None = Field(None, description='Only ["text"].')

    def unsupported(self) -> tuple[str, str] | None:
        for name in ("functions", "function_call"):
            if getattr(self, name) not in (None, []):
                return name, "deprecated function calling is not supported: send tools and tool_choice"
        problem = tool_choice_problem(self.tools, self.tool_choice)
        if problem is not None:
            return problem
        if self.calls_tools and (self.structured_outputs is not None or _constrains(self.response_format)):
            return "tool_choice", "a tool call is already structured: drop response_format or structured_outputs"
        if self.modalities not in (None, ["text"]):
            return "modalities", 'only ["text"] is supported'
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "only allowed when logprobs is true"
        return super().unsupported()

    @property
    def calls_tools(self) -> bool:
        """The answer is a tool call: tool_choice names a function or says "required"."""
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    def prompt_text(self, tokenizer: Tokenizer) -> str:
        return chat.render_chat(tokenizer, chat_turns(self.messages))

    def to_generation_request(self, prompt_ids: list[int], context_window: int) -> GenerationRequest:
        """Budget: max_completion_tokens, else max_tokens, else the rest of the window; stops at turn markers."""
        budget, field = token_budget(
            len(prompt_ids),
            context_window,
            [("max_completion_tokens", self.max_completion_tokens), ("max_tokens", self.max_tokens)],
            "max_tokens",
        )
        constraint = tool_constraint(self) if self.calls_tools else self.constraint()
        # A grammar decides where a structured answer ends; a turn marker inside a JSON string is text.
        markers = () if constraint is not None else chat.TURN_MARKERS
        params = replace(
            self.sampling_params(budget, (*_stop_list(self.stop), *markers)),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            constraint=constraint,
        )
        return GenerationRequest(prompt_ids, params, field)


MAX_PROMPTS = 64  # prompts in one /v1/completions request (one answer each)
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
PromptList = Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
TokenIdsList = Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]


class CompletionRequest(OpenAIFields):
    prompt: Text | PromptList | TokenIds | TokenIdsList = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists: one answer each, "
        "in order. Text gets BOS in front; token ids are used as given. No chat template."
    )
    max_tokens: int | None = Field(None, ge=0, description="0 (with echo): score the prompt, generate nothing.")
    echo: bool = Field(False, description="Put the prompt in front of the answer (and score it, with logprobs).")
    suffix: Text | None = None
    best_of: int | None = None
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Each token's log-probability and this many most likely tokens."
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        """Clear words for the shapes a union would answer with four errors."""
        if isinstance(value, list):
            if not value:
                raise PydanticCustomError("empty_prompt", "the prompt list is empty: send at least one prompt")
            kinds = {type(item) for item in value}
            if len(kinds) > 1:
                raise PydanticCustomError(
                    "mixed_prompt", "a prompt list holds strings, token ids, or lists of token ids, not a mix"
                )
            nested = [item for item in value if isinstance(item, list)]
            if any(type(token) is not int for item in nested for token in item):
                raise PydanticCustomError("mixed_prompt", "a list of token ids holds integers only")
            empty = next((i for i, item in enumerate(value) if item == []), None)
            if empty is not None:
                raise PydanticCustomError(
                    "empty_prompt", "prompt[{index}] is an empty list of token ids", {"index": empty}
                )
        return value

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "0 is only allowed with echo (to return or score the prompt alone)"
        return super().unsupported()

    def prompts(self, tokenizer: Tokenizer) -> list[PromptInput]:
        """Text prompts are tokenized with BOS in front; token ids are checked and used as given."""
        given = self.prompt
        if isinstance(given, str):
            return [PromptInput(tokenizer.encode(given), given)]
        if isinstance(given[0], str):
            return [PromptInput(tokenizer.encode(text), text) for text in given]  # type: ignore[arg-type]
        lists = [given] if isinstance(given[0], int) else given
        where = "prompt" if isinstance(given[0], int) else "prompt[{}]"
        return [token_ids_prompt(ids, where.format(i), "prompt", tokenizer) for i, ids in enumerate(lists)]  # type: ignore[arg-type]

    def to_generation_request(self, prompt_ids: list[int], context_window: int) -> GenerationRequest:
        given = [("max_tokens", self.max_tokens)]
        budget, field = token_budget(
            len(prompt_ids), context_window, given, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS
        )
        params = replace(
            self.sampling_params(budget, _stop_list(self.stop)),
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo else None,
            constraint=self.constraint(),
        )
        return GenerationRequest(prompt_ids, params, field)


def token_ids_prompt(ids: list[int], where: str, param: str, tokenizer: Tokenizer) -> PromptInput:
    """Token ids a client sent, checked against the vocabulary (a 400 naming the position)."""
    for position, token in enumerate(ids):
        if token >= tokenizer.vocab_size:
            raise InvalidRequest(
                f"{where}[{position}]: token id {token} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                param,
                "invalid_token_id",
            )
    return PromptInput(list(ids), tokenizer.decode(ids))


def _stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object's text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, its log-probability (None for a prompt's first
    token), the most likely tokens at its position (text -> log-probability; the token itself
    included) and where its text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# --------------------------------------------------------------------------- tokenizer endpoints (vLLM's shapes)


class TokenizeRequest(StrictModel):
    """`POST /tokenize`: text (`prompt`) or a conversation (`messages`, rendered as chat prompts are)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatCompletionMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None,
        description="BOS in front (default: true for prompt, as vLLM; for messages the template's own tokens are used "
        "and BOS is added as every chat prompt has it).",
    )
    add_generation_prompt: bool = Field(True, description="MiniCPM's template always ends a user turn with <AI>.")
    return_token_strs: bool = Field(False, description="Also return each token as text.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise unsupported("prompt", "send exactly one of 'prompt' and 'messages'")
        if not self.add_generation_prompt:
            raise unsupported("add_generation_prompt", "MiniCPM's chat template always ends with the <AI> marker")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    model: Text | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    bos_token: str
    eos_token: str
    bos_token_id: int
    eos_token_id: int
    vocab_size: int
    model_max_length: int
    chat_template: str
    add_bos_token: bool = True
    add_eos_token: bool = False


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
    request_id: str | None = None  # as in the answer's X-Request-Id header


class ErrorResponse(BaseModel):
    error: ErrorDetail


class LegacyErrorResponse(ErrorResponse):
    """POST /'s errors also carry the endpoint's own keys, so the tutorial's client can read them."""

    response: None = None
    status: int
    time: str


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "unavailable", "shutting_down"]
    model: str | None = None
    engine: str | None = None  # the backend serving: "native" or "vllm"
    running: int = 0
    waiting: int = 0
    detail: str | None = None


class FaultRequest(StrictModel):
    kind: Literal["oom", "fatal"] = Field(
        description="oom: the next step raises CUDA's out-of-memory error; fatal: the engine thread dies."
    )


def error_responses(*codes: int, model: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the error answers a route can give."""
    return {code: {"model": model} for code in codes}
