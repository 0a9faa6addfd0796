"""Ollama's API: the request and answer models of `/api/chat`, `/api/generate` and the model routes.

A module of its own because Ollama names the same things differently from OpenAI and the
tutorial (sampling settings nested in `options`, `num_predict`, `repeat_penalty`, durations in
nanoseconds), and because its options have rules of their own: some are honoured, some only at
the value that changes nothing, some concern how Ollama loads a model and cannot change an
answer. The rules shared with every endpoint (strict parsing, the budget, the sampling
defaults, `unsupported(...)` errors) come from protocol.py.

Field names, defaults and shapes follow Ollama's API reference (docs/api.md). What we chose
where it leaves room is in README.md ("Ollama's API").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from minicpm_server.api.protocol import (
    InvalidRequest,
    JsonValue,
    PromptInput,
    RefusesUnsupported,
    RenderedPrompt,
    SamplingFields,
    Stop,
    StrictModel,
    Text,
    TokenId,
    _stop_list,
    token_budget,
    token_ids_prompt,
    unsupported,
)
from minicpm_server.api.structured import format_constraint
from minicpm_server.engine.protocol import MAX_LOGPROBS, GenerationRequest
from minicpm_server.model import chat
from minicpm_server.model.tokenizer import Tokenizer

Problem = tuple[str, str] | None  # (the field, why we cannot do what it asks), or None


class OllamaOptions(StrictModel):
    """`options`, as Ollama documents them (its Modelfile parameters)."""

    # Honoured, with the sampler every endpoint uses; left out, the tutorial's defaults apply.
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 means greedy decoding. Default 0.5.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default 0.8.")
    top_k: int | None = Field(None, ge=0, description="0 disables top-k (the default).")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="On every token in the context, prompt included. Default 1.02."
    )
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="On the answer's tokens (OpenAI's).")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="On the answer's tokens (OpenAI's).")
    seed: int | None = Field(None, ge=-1, le=2**63 - 1, description="-1 (Ollama's default): no seed.")
    num_predict: int | None = Field(
        None, ge=-2, description="Tokens to generate; -1 or -2: until the model stops or the context is full."
    )
    stop: Stop = Field(None, description="Stop strings (the answer ends before them).")
    num_ctx: int | None = Field(None, ge=1, description="The context to use, at most the model's window.")
    ignore_eos: bool = Field(False, description="Ours, as on the other endpoints: generate past end-of-sequence.")
    # Honoured only at the value that matches what our sampler does; any other value is a 400.
    repeat_last_n: int | None = Field(
        None, ge=-1, description="-1 or at least the window: the whole context (what we do); 0: no penalties."
    )
    penalize_newline: bool | None = Field(None, description="true only: the penalties apply to newlines too.")
    mirostat: int | None = Field(None, ge=0, le=2, description="0 only.")
    mirostat_tau: float | None = Field(None, description="Read only with mirostat, which is off.")
    mirostat_eta: float | None = Field(None, description="Read only with mirostat, which is off.")
    tfs_z: float | None = Field(None, description="1 only (tail-free sampling off).")
    typical_p: float | None = Field(None, description="1 only (typical sampling off).")
    # Accepted and ignored: how Ollama loads a model and spreads it over its hardware (and when it
    # shifts a full context, which we never do); none of them can change an answer here.
    num_keep: int | None = None
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None

    def problem(self) -> Problem:
        """The first option set to something we cannot do (its name without "options.")."""
        if self.num_predict == 0:
            return "num_predict", "0 generates nothing: send a positive count, or -1 (until the model stops)"
        if self.mirostat:
            return "mirostat", "Mirostat sampling is not supported: send 0 and use temperature, top_p, top_k, min_p"
        if self.tfs_z not in (None, 1.0):
            return "tfs_z", "tail-free sampling is not supported: send 1 or leave it out"
        if self.typical_p not in (None, 1.0):
            return "typical_p", "typical sampling is not supported: send 1 or leave it out"
        if self.penalize_newline is False and self._penalised:
            return "penalize_newline", (
                "the repetition penalties apply to every token, newlines included: send true, "
                "or turn them off (repeat_penalty 1, presence_penalty and frequency_penalty 0)"
            )
        return None

    @property
    def _penalised(self) -> bool:
        """A penalty is in effect (the default repeat_penalty 1.02 is one)."""
        params = self.sampling_fields().sampling_params(1, ())
        return params.repetition_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0

    def window_problem(self, context_window: int) -> Problem:
        """What can only be judged knowing the model's window."""
        if self.num_ctx is not None and self.num_ctx > context_window:
            return "num_ctx", f"{self.num_ctx} is more than the model's context window of {context_window} tokens"
        n = self.repeat_last_n
        if n is not None and 0 < n < context_window and self._penalised:
            return "repeat_last_n", (
                "the repetition penalty here looks at the whole context: send -1 (or at least "
                f"{context_window}, the window), 0 for no penalties, or turn the penalties off (repeat_penalty 1)"
            )
        return None

    def sampling_fields(self) -> SamplingFields:
        """The options as every endpoint's sampling fields (SamplingParams fills in the defaults)."""
        off = self.repeat_last_n == 0  # Ollama: a window of no tokens, so nothing is penalised
        return SamplingFields(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=1.0 if off else self.repeat_penalty,
            presence_penalty=0.0 if off else self.presence_penalty,
            frequency_penalty=0.0 if off else self.frequency_penalty,
            seed=None if self.seed == -1 else self.seed,
            ignore_eos=self.ignore_eos,
        )

    def budget(self, prompt_tokens: int, context_window: int) -> tuple[int, str]:
        """num_predict, else the rest of num_ctx (or of the window): Ollama's -1 and -2 both end
        there, since we never shift a full context. A budget num_ctx cannot hold is a 400."""
        given = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        window = self.num_ctx or context_window
        budget, field = token_budget(prompt_tokens, window, [("options.num_predict", given)], "options.num_predict")
        if self.num_ctx is not None and prompt_tokens + budget > self.num_ctx:
            raise InvalidRequest(
                f"options.num_ctx is {self.num_ctx} tokens: the prompt ({prompt_tokens} tokens) and {budget} new "
                f"tokens do not fit; raise num_ctx (at most {context_window}) or lower num_predict",
                "options.num_ctx",
                "context_length_exceeded",
            )
        return budget, field


class OllamaGeneration(RefusesUnsupported):
    """What /api/chat and /api/generate share."""

    model: Annotated[Text, Field(min_length=1)] = Field(description="Any name: the served model answers.")
    format: Literal["", "json"] | JsonValue | None = Field(
        None, description='"json" (a JSON object) or a JSON schema: the answer follows it, by construction.'
    )
    options: OllamaOptions | None = None
    stream: bool = Field(True, description="Ollama's default: newline-delimited JSON as the text comes.")
    keep_alive: Text | float | None = Field(None, description="Accepted and ignored: the model stays loaded.")
    think: bool | Literal["high", "medium", "low"] | None = Field(None, description="false only.")
    logprobs: bool = Field(False, description="Each answer token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many most likely tokens at each position."
    )

    @field_validator("format", mode="before")
    @classmethod
    def _format_word(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("", "json"):
            raise unsupported("format", 'send "json" or a JSON schema (an object)')
        return value

    @property
    def opts(self) -> OllamaOptions:
        return self.options or OllamaOptions()

    @property
    def loads_only(self) -> bool:
        """Nothing to generate from: Ollama's way of asking for the model to be loaded."""
        raise NotImplementedError

    def unsupported(self) -> Problem:
        if self.think not in (None, False):
            return "think", "MiniCPM-2B does not reason apart from its answer: send false or leave it out"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "only allowed when logprobs is true"
        problem = self.opts.problem()
        return None if problem is None else (f"options.{problem[0]}", problem[1])

    def generation_request(
        self, prompt_ids: list[int], context_window: int, template_stops: tuple[str, ...]
    ) -> GenerationRequest:
        """Budget from num_predict/num_ctx, the options' sampling, the stop strings, and `format` as
        a constraint (then the grammar, not the turn markers, decides where the answer ends)."""
        options = self.opts
        problem = options.window_problem(context_window)
        if problem is not None:
            raise InvalidRequest(
                f"'options.{problem[0]}': {problem[1]}", f"options.{problem[0]}", "unsupported_parameter"
            )
        budget, field = options.budget(len(prompt_ids), context_window)
        constraint = format_constraint(self.format)
        stops = (*_stop_list(options.stop), *(() if constraint is not None else template_stops))
        params = replace(
            options.sampling_fields().sampling_params(budget, stops),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            constraint=constraint,
        )
        return GenerationRequest(prompt_ids, params, field)


# --------------------------------------------------------------------------- /api/chat


class OllamaMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = Field("", description="MiniCPM renders system and assistant turns as plain text.")
    images: list[Text] | None = None
    thinking: Text | None = None
    tool_calls: list[JsonValue] | None = None
    tool_name: Text | None = None

    def problem(self) -> Problem:
        if self.role == "tool":
            return "role", "MiniCPM-2B has no tool-call format, so there are no tool results to send back"
        if self.images:
            return "images", "MiniCPM-2B is a text model: it cannot read images"
        if self.tool_calls:
            return "tool_calls", "MiniCPM-2B has no tool-call format: send the call as text content"
        if self.tool_name:
            return "tool_name", "only a tool message names a tool, and MiniCPM-2B has none"
        if self.thinking:
            return "thinking", "MiniCPM-2B does not reason apart from its answer: put the text in content"
        return None


class OllamaChatRequest(RenderedPrompt, OllamaGeneration):
    """`POST /api/chat`."""

    messages: list[OllamaMessage] = Field(
        default_factory=list, description="The conversation, oldest first; none: load the model (it is loaded)."
    )
    tools: list[JsonValue] | None = Field(None, description="Only an empty list (the ollama client always sends one).")

    @property
    def loads_only(self) -> bool:
        return not self.messages

    def unsupported(self) -> Problem:
        if self.tools:
            return "tools", (
                "MiniCPM-2B has no tool-call format, so it cannot decide by itself whether to call a tool; "
                'POST /v1/chat/completions calls one when told to (tool_choice "required" or a named function)'
            )
        for index, message in enumerate(self.messages):
            problem = message.problem()
            if problem is not None:
                return f"messages.{index}.{problem[0]}", problem[1]
        return super().unsupported()

    def prompt_text(self, tokenizer: Tokenizer) -> str:
        # Ollama reads a null or missing content as empty; the official client leaves empty ones out.
        turns = [{"role": m.role, "content": m.content or ""} for m in self.messages]
        return chat.render_chat(tokenizer, turns)

    def to_generation_request(self, prompt_ids: list[int], context_window: int) -> GenerationRequest:
        return self.generation_request(prompt_ids, context_window, chat.TURN_MARKERS)


# --------------------------------------------------------------------------- /api/generate


class OllamaGenerateRequest(OllamaGeneration):
    """`POST /api/generate`."""

    prompt: Text = Field("", description="Rendered as a user turn, or sent as it is with raw.")
    system: Text | None = Field(None, description="Plain text before the user turn (MiniCPM has no system role).")
    raw: bool = Field(False, description="No template: the prompt is the model's input (BOS in front).")
    context: Annotated[list[TokenId], Field(max_length=1 << 20)] | None = Field(
        None, description="A previous answer's context: its token ids go before this prompt's."
    )
    suffix: Text = Field("", description="Not supported (fill-in-the-middle).")
    template: Text | None = Field(None, description="Not supported (a Go template).")
    images: list[Text] | None = Field(None, description="Not supported: a text model.")
    width: int | None = Field(None, description="Not supported (image generation).")
    height: int | None = Field(None, description="Not supported (image generation).")
    steps: int | None = Field(None, description="Not supported (image generation).")

    @property
    def loads_only(self) -> bool:
        return not (self.prompt or self.system or self.context)

    def unsupported(self) -> Problem:
        if self.images:
            return "images", "MiniCPM-2B is a text model: it cannot read images"
        if self.suffix:
            return "suffix", "MiniCPM-2B was not trained to fill in the middle: send the text before the gap as prompt"
        if self.template:
            return "template", (
                "a per-request template is not supported: send raw: true with the prompt already in "
                "MiniCPM's format (<用户>question<AI>)"
            )
        for name in ("width", "height", "steps"):
            if getattr(self, name) is not None:
                return name, "image generation is not supported: MiniCPM-2B writes text"
        if self.raw and self.system:
            return "system", "raw: true sends the prompt as it is: put the system text in the prompt"
        return super().unsupported()

    def prompt_text(self, tokenizer: Tokenizer) -> str:
        if self.raw:
            return self.prompt
        history = [{"role": "system", "content": self.system}] if self.system else []
        return chat.render_chat(tokenizer, chat.conversation(self.prompt, history))

    def prompts(self, tokenizer: Tokenizer) -> list[PromptInput]:
        """The prompt's ids (BOS first); after a context, the context's ids (which begin with BOS) then
        the prompt's without a second BOS."""
        text = self.prompt_text(tokenizer)
        ids = tokenizer.encode(text)
        if not self.context:
            return [PromptInput(ids, text)]
        earlier = token_ids_prompt(self.context, "context", "context", tokenizer)
        return [PromptInput([*earlier.ids, *ids[1:]], earlier.text + text)]

    def to_generation_request(self, prompt_ids: list[int], context_window: int) -> GenerationRequest:
        return self.generation_request(prompt_ids, context_window, () if self.raw else chat.TURN_MARKERS)


# --------------------------------------------------------------------------- model routes


class OllamaShowRequest(StrictModel):
    """`POST /api/show`: `model` (older clients send `name`)."""

    model: Annotated[Text, Field(min_length=1)] | None = None
    name: Annotated[Text, Field(min_length=1)] | None = None
    verbose: bool = Field(False, description="Accepted: there are no further details to add.")

    @model_validator(mode="after")
    def _named(self):
        if self.model is None and self.name is None:
            raise unsupported("model", "name the model to show")
        return self

    @property
    def asked(self) -> str:
        return self.model or self.name or ""


# --------------------------------------------------------------------------- answers


class OllamaError(BaseModel):
    error: str
    request_id: str | None = None  # as in the answer's X-Request-Id header


class OllamaTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class OllamaLogprob(OllamaTopLogprob):
    top_logprobs: list[OllamaTopLogprob]


class OllamaAnswer(BaseModel):
    """Every /api/chat and /api/generate object; the last one (`done: true`) has the counts and
    durations (nanoseconds)."""

    model: str
    created_at: str
    done: bool
    done_reason: Literal["stop", "length", "load"] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[OllamaLogprob] | None = None


class OllamaMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class OllamaChatResponse(OllamaAnswer):
    message: OllamaMessageOut


class OllamaGenerateResponse(OllamaAnswer):
    response: str
    context: list[int] | None = None


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ListedModel]


class RunningModel(ListedModel):
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


# What GET /api/version answers: the Ollama release whose API these routes follow, not our own
# version. Ollama's clients read it as the API level (VS Code's Copilot Chat, for one, refuses a
# server below a minimum Ollama version); the server's own version is in /openapi.json.
OLLAMA_API_VERSION = "0.12.0"


class VersionResponse(BaseModel):
    version: str
