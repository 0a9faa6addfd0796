"""Token ids -> text deltas for streaming, never splitting a multi-byte character.

MiniCPM's tokenizer falls back to single bytes for rare characters, so one Chinese character can
span several tokens, and decoding a prefix of them yields U+FFFD. We keep two offsets into the
generated ids: decoding from `prefix` to `read` reproduces what was already emitted, decoding
from `prefix` to the end gives that plus the new text. New text is emitted only once it no longer
ends in an incomplete character. Both decodes start at the same token, so the tokenizer's
"strip the first token's leading space" rule affects them alike and the deltas concatenate to
exactly the full decode.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", for a partial character)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, incomplete bytes included."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]
