"""Generated token ids -> the events a client sees, the same for every backend.

Both engines hand each request's new tokens, one at a time, to a `TokenOutput`. It owns the rules
that make answers byte-identical across backends: EOS ends the answer (unless `ignore_eos`), the
token budget ends it with "length", text leaves through the incremental detokenizer, and stop
strings cut it, with text that might be the start of one held back until it is known.
Log-probabilities, when asked for, ride with the text: a token's entry leaves in the delta that
carries its text, or in the last one when its text never leaves (EOS, a stop string).
"""

from __future__ import annotations

from minicpm_server.engine.detokenize import IncrementalDetokenizer
from minicpm_server.engine.protocol import Finished, SamplingParams, TextDelta, TokenLogprob
from minicpm_server.engine.stops import first_stop, stop_prefix_overlap
from minicpm_server.model.tokenizer import Tokenizer


class TokenOutput:
    """One request's answer so far; `push` each generated token, read back its events."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_tokens: int, eos_token_id: int) -> None:
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.eos_token_id = eos_token_id
        self.stops = tuple(s for s in params.stop if s)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text = ""  # decoded so far, including what is held back for stop strings
        self.emitted = 0  # how much of `text` has been sent
        self.generated = 0
        self.finish: str | None = None
        self._logprobs: list[TokenLogprob] = []  # entries not yet sent
        self._prompt_logprobs: list[TokenLogprob | None] | None = None  # sent with the first event

    @property
    def done(self) -> bool:
        return self.finish is not None

    def prefilled(self, scores: list[TokenLogprob | None] | None = None) -> list[TextDelta | Finished]:
        """The prompt is in the cache (with its log-probabilities, when asked); with no token to
        generate (max_new_tokens 0: echo or scoring only), the request ends here."""
        self._prompt_logprobs = scores
        if self.params.max_new_tokens == 0:
            self.finish = "length"
            return self._events()
        return []

    def push(self, token: int, logprob: TokenLogprob | None = None) -> list[TextDelta | Finished]:
        """Take one generated token (EOS included: it counts as a completion token)."""
        if self.finish is not None:
            return []
        if logprob is not None:
            self._logprobs.append(logprob)
        self.generated += 1
        if token == self.eos_token_id and not self.params.ignore_eos:
            self.finish = "stop"
        else:
            self.text += self.detok.push(token)
            if self.generated >= self.params.max_new_tokens:
                self.finish = "length"
        if self.finish is not None:
            self.text += self.detok.flush()
        return self._events()

    def end(self, reason: str) -> list[TextDelta | Finished]:
        """Finish for a reason the backend knows (cancelled, or its own length limit)."""
        if self.finish is not None:
            return []
        self.finish = reason
        if reason != "cancelled":
            self.text += self.detok.flush()
            return self._events()
        return [self.finished()]

    def finished(self) -> Finished:
        return Finished(self.finish or "stop", self.prompt_tokens, self.generated)

    def _events(self) -> list[TextDelta | Finished]:
        """The delta that is safe to send now, and Finished when the answer is done."""
        cut = first_stop(self.text, self.stops, self.emitted)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
        held = 0 if self.finish else stop_prefix_overlap(self.text, self.stops)
        safe = len(self.text) - held
        events: list[TextDelta | Finished] = []
        scores_due = self._prompt_logprobs is not None or (self.finish and self._logprobs)
        if safe > self.emitted or scores_due:
            delta = TextDelta(self.text[self.emitted : safe], self.generated, self._logprobs, self._prompt_logprobs)
            events.append(delta)
            self.emitted, self._logprobs, self._prompt_logprobs = safe, [], None
        if self.finish:
            events.append(self.finished())
        return events
