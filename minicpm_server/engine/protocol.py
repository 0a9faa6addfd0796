"""The seam between the HTTP side and generation: what any engine backend takes and gives.

The HTTP side turns a request body into a `GenerationRequest` (prompt ids, `SamplingParams`,
and the name of the field that set the token budget, for error messages), submits it to an
`Engine`, and reads `TextDelta` events and one `Finished` from the returned handle. It never
touches a backend's internals: the metrics read `Engine.stats`, errors are the exceptions below.

Log-probabilities, when a request asks for them, travel in the events as token ids and numbers
(`TokenLogprob`); what a token looks like as text is the HTTP side's business. A log-probability
is the model's own: log-softmax of the raw logits, before penalties, temperature, top-k and top-p
(as vLLM reports by default), so greedy answers' numbers compare across servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from minicpm_server.model.tokenizer import Tokenizer

# The tutorial's model.chat call: temperature 0.5, top_p 0.8, repetition_penalty 1.02. Every
# endpoint uses them when a request does not say otherwise; this is the one place they live.
DEFAULT_TEMPERATURE = 0.5
DEFAULT_TOP_P = 0.8
DEFAULT_REPETITION_PENALTY = 1.02

FaultKind = Literal["oom", "fatal"]


ConstraintKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What a structured answer must be (engine/grammar.py): `json` a JSON schema's text, `regex`,
    `choice` a JSON list of strings, `grammar` EBNF; `param` is the request field it came from."""

    kind: ConstraintKind
    value: str = ""
    param: str = "response_format"


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler; validated by the protocol layer before it gets here."""

    max_new_tokens: int
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    do_sample: bool = True
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: its log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo, scoring)
    constraint: Constraint | None = None  # structured output: the answer stays inside this grammar

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 20 for chat, 5 for completions)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    budget_field: str = "max_tokens"  # the request field that set max_new_tokens, named in errors
    grammar: Any = None  # the backend's compiled form of params.constraint, made by Engine.prepare

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a sequence with its log-probability, and the most likely tokens at its
    position (`top`: (id, logprob) pairs, most likely first; as many as the request asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# --------------------------------------------------------------------------- events


@dataclass
class TextDelta:
    """New answer text. `logprobs`: one entry per generated token whose text is (or was held
    back and is now) in this delta, when the request asked; `prompt_logprobs`: the prompt's
    scores (None for its first token), on the request's first event only."""

    text: str
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, when asked


@dataclass
class EngineStats:
    """A snapshot of an engine's state and counters: everything the metrics read."""

    running: int = 0
    waiting: int = 0
    failures: int = 0
    cache_releases: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("stop", "length", "cancelled"), 0))
    # KV memory, where the backend reports it (None: it does not, and the metric is left out)
    prefix_hit_tokens: int | None = None  # prompt tokens whose KV a cached prefix supplied
    kv_used_tokens: int | None = None  # token slots held by requests or cached prefixes
    kv_capacity_tokens: int | None = None
    kv_usage: float | None = None  # the share in use, for a backend that reports only that (vLLM)
    prefix_query_tokens: int | None = None  # prompt tokens looked up in the prefix cache


# --------------------------------------------------------------------------- errors


class EngineError(Exception):
    """Generation failed inside the engine (out of memory, say); the request may be retried."""


class QueueFullError(Exception):
    """More requests are waiting than --max-queue allows."""


class EngineUnavailableError(Exception):
    """The engine is not running (still loading, shutting down, or its thread died)."""


class ContextOverflowError(ValueError):
    """The prompt plus the requested tokens do not fit in the model's context window.

    `field` names what the client should change: the budget field it sent, or "prompt" when the
    prompt alone fills the window.
    """

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_window: int, budget_field: str) -> None:
        self.prompt_tokens, self.max_new_tokens, self.context_window = prompt_tokens, max_new_tokens, context_window
        self.field = "prompt" if prompt_tokens >= context_window else budget_field
        super().__init__(self._message(budget_field))

    def _message(self, budget_field: str) -> str:
        p, n, window = self.prompt_tokens, self.max_new_tokens, self.context_window
        if self.field == "prompt":
            return f"the prompt is {p} tokens; the context window is {window} tokens"
        if budget_field == "max_length":
            return f"max_length {p + n} exceeds the context window of {window} tokens (the prompt is {p} tokens)"
        return (
            f"{budget_field} is too large: the prompt ({p} tokens) plus {n} new tokens exceeds the context "
            f"window of {window} tokens; ask for at most {window - p} new tokens"
        )


def check_fits(request: GenerationRequest, context_window: int) -> None:
    """The context-window rule, for every backend: prompt plus budget within the window."""
    if request.prompt_tokens + request.params.max_new_tokens > context_window:
        raise ContextOverflowError(
            request.prompt_tokens, request.params.max_new_tokens, context_window, request.budget_field
        )


# --------------------------------------------------------------------------- the interface


class GenerationHandle(Protocol):
    """The caller's side of one submitted request."""

    @property
    def prompt_tokens(self) -> int: ...

    def cancel(self) -> None:
        """Free the request's slot; its events end with Finished("cancelled")."""
        ...

    def events(self) -> AsyncIterator[TextDelta | Finished]:
        """Text deltas, then one Finished; raises EngineError or EngineUnavailableError on failure."""
        ...


class Engine(Protocol):
    """A generation backend. Submit from the event loop that will read the handle's events."""

    name: str  # "native" or "vllm", reported by /health and the start-up log
    tokenizer: Tokenizer
    context_window: int

    @property
    def alive(self) -> bool: ...

    @property
    def stats(self) -> EngineStats: ...

    def start(self) -> None: ...

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Work a request needs before it is submitted that is too slow for the event loop (compiling
        its grammar); called on a worker thread. Raises ConstraintError for a constraint that
        cannot be compiled."""
        ...

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request. Raises ContextOverflowError, QueueFullError or EngineUnavailableError."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Stop generating; requests still in flight fail with EngineUnavailableError."""
        ...

    def reset_counters(self) -> None:
        """Counters (finished requests, failures) back to zero: the warm-up is not counted."""
        ...

    def inject_fault(self, kind: FaultKind) -> None:
        """Testing only: "oom" makes the next step fail like CUDA out of memory; "fatal" kills the engine."""
        ...
