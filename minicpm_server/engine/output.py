"""Generated token ids -> the events a client sees, the same for every backend.

Both engines hand each request's new tokens, one at a time, to a `TokenOutput`. It owns the rules
that make answers byte-identical across backends: EOS ends the answer (unless `ignore_eos`), the
token budget ends it with "length", text leaves through the incremental detokenizer, and stop
strings cut it, with text that might be the start of one held back until it is known.
"""

from __future__ import annotations

from minicpm_server.engine.detokenize import IncrementalDetokenizer
from minicpm_server.engine.protocol import Finished, SamplingParams, TextDelta
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

    @property
    def done(self) -> bool:
        return self.finish is not None

    def push(self, token: int) -> list[TextDelta | Finished]:
        """Take one generated token (EOS included: it counts as a completion token)."""
        if self.finish is not None:
            return []
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
        if safe > self.emitted:
            events.append(TextDelta(self.text[self.emitted : safe], self.generated))
            self.emitted = safe
        if self.finish:
            events.append(self.finished())
        return events
