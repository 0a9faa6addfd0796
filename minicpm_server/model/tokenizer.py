"""MiniCPM-2B's tokenizer, exactly as the model was trained: sentencepiece on `tokenizer.model`.

The rule: a prompt's ids are `[BOS] + sentencepiece.encode(text)`, and an answer's text is
`sentencepiece.decode(ids)`. MiniCPM-2B's model has `add_dummy_prefix` false (no "▁" in front of
the text) and makes `\\n`, `\\t` and HTML tags user-defined pieces; `<用户>` and `<AI>` are plain
text to it. transformers' conversions get this wrong in ways that change the ids (a leading "▁",
a "▁" after every newline), so when a checkpoint has `tokenizer.model` we run sentencepiece
itself, whatever `tokenizer.json` says. Measured on the real file (BENCHMARKS.md): sentencepiece
encodes about 1.9x and decodes short streaming windows about 2x faster than transformers'
`LlamaTokenizer`, and it treats text like "</s>" in a prompt as text, never as a control token.

Only a checkpoint without `tokenizer.model` is tokenized with its `tokenizer.json`, as shipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from minicpm_server.cache import cache_root
from minicpm_server.exceptions import first_line as _first_line

log = logging.getLogger("minicpm_server")

# Strings on which a converted tokenizer.json most often parts ways with sentencepiece: a
# leading word, text after a newline or a tab, leading spaces, HTML, a turn marker, CJK.
PROBES = (
    "hello world",
    "\nfoo",
    "a\tb",
    "  two leading spaces",
    "<p>para</p>",
    "<用户>你好<AI>",
    "山东省最高的山是哪座山？",
    "x = 1\n    y = 2",
)


class TokenizerError(Exception):
    """The tokenizer files are missing, unreadable or not a MiniCPM tokenizer."""


class Tokenizer(Protocol):
    """What the server needs of a tokenizer; both implementations below follow it."""

    bos_token: str
    eos_token: str
    bos_token_id: int
    eos_token_id: int
    chat_template: str | None
    source: Path  # the file the ids come from
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with BOS in front, as the model saw its prompts in training."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids; BOS and EOS decode to nothing."""
        ...

    def token_text(self, token_id: int) -> str:
        """One token as text on its own (log-probabilities name tokens this way): a control
        token by its name ("</s>"), any other as it decodes alone."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes: a byte-fallback token's single byte, any other its text's UTF-8."""
        ...

    def grammar_vocabulary(self) -> tuple[list[str], bool]:
        """Every token as a grammar engine reads it (the raw piece; "" for control and unknown
        tokens, which are then never allowed), and whether single bytes are pieces of their own."""
        ...

    def encode_with_control_tokens(self, text: str) -> list[int]:
        """Ids of `text` where a control token's name ("<s>", "</s>") written in it stands for
        that token (as Hugging Face tokenizers read text); no BOS is added. Only /tokenize reads
        text this way: prompts keep "</s>" as plain text."""
        ...


class SentencePieceTokenizer:
    """sentencepiece on the checkpoint's `tokenizer.model`: the reference itself."""

    def __init__(self, model_file: Path, config: dict[str, Any]) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot read {model_file}: {exc}") from None
        self.source = model_file
        self.bos_token_id, self.eos_token_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_token_id < 0 or self.eos_token_id < 0:
            raise TokenizerError(f"{model_file} has no BOS/EOS pieces; not a MiniCPM tokenizer")
        self.bos_token = self._sp.id_to_piece(self.bos_token_id)
        self.eos_token = self._sp.id_to_piece(self.eos_token_id)
        self.chat_template = config.get("chat_template")
        self.vocab_size = self._sp.get_piece_size()
        self._controls: dict[str, int] | None = None  # control tokens' names (encode_with_control_tokens)

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *self._sp.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        if self._sp.is_control(token_id):
            return self._sp.id_to_piece(token_id)
        return self._sp.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        if self._sp.is_byte(token_id):
            return bytes([int(self._sp.id_to_piece(token_id)[1:-1], 16)])  # "<0xE4>"
        return self.token_text(token_id).encode("utf-8")

    def grammar_vocabulary(self) -> tuple[list[str], bool]:
        sp = self._sp
        pieces = ["" if sp.is_control(i) or sp.is_unknown(i) else sp.id_to_piece(i) for i in range(self.vocab_size)]
        return pieces, any(sp.is_byte(i) for i in range(self.vocab_size))

    def encode_with_control_tokens(self, text: str) -> list[int]:
        if self._controls is None:
            self._controls = {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}
        return _split_on_names(text, self._controls, self._sp.encode)


class TokenizerJsonTokenizer:
    """A checkpoint's `tokenizer.json` through the tokenizers library, as shipped."""

    def __init__(self, json_file: Path, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(json_file))
        except Exception as exc:  # the library raises its own exception type for a corrupt file
            raise TokenizerError(f"cannot read {json_file}: {_first_line(exc)}") from None
        self.source = json_file
        self.bos_token = _token_text(config.get("bos_token"), "<s>")
        self.eos_token = _token_text(config.get("eos_token"), "</s>")
        bos, eos = self._tok.token_to_id(self.bos_token), self._tok.token_to_id(self.eos_token)
        if bos is None or eos is None:
            raise TokenizerError(
                f"{json_file} has no {self.bos_token}/{self.eos_token} tokens; not a MiniCPM tokenizer"
            )
        self.bos_token_id, self.eos_token_id = bos, eos
        self.chat_template = config.get("chat_template")
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *self._tok.encode(text, add_special_tokens=False).ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id) or ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return self.token_text(token_id).encode("utf-8")

    def grammar_vocabulary(self) -> tuple[list[str], bool]:
        special = {a.content for a in self._tok.get_added_tokens_decoder().values() if a.special}
        pieces = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i) or ""
            pieces.append("" if piece in special else piece)
        return pieces, any(len(p) == 6 and p.startswith("<0x") and p.endswith(">") for p in pieces)

    def encode_with_control_tokens(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids  # the library reads special tokens' names


def _split_on_names(text: str, names: dict[str, int], encode) -> list[int]:
    """Encode `text`, with each occurrence of a key of `names` replaced by its id."""
    if not names:
        return list(encode(text))
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
    ids: list[int] = []
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            ids.extend(encode(text[start : match.start()]))
        ids.append(names[match.group()])
        start = match.end()
    if start < len(text):
        ids.extend(encode(text[start:]))
    return ids


# A checkpoint that model/tiny.py built has this file. Its tokenizer.json is lossy on purpose (as the
# real download's is), so the disagreement is no news to whoever started the demo: not warned about.
BUILT_HERE_MARKER = ".built-by-minicpm-server"


def load_tokenizer(directory: Path) -> Tokenizer:
    """The checkpoint's tokenizer by the rule above; warns once when tokenizer.json disagrees
    (for checkpoints the user brought, not the ones this project builds)."""
    config = _read_config(directory / "tokenizer_config.json")
    model_file, json_file = directory / "tokenizer.model", directory / "tokenizer.json"
    if model_file.is_file():
        tokenizer = SentencePieceTokenizer(model_file, config)
        if json_file.is_file() and not (directory / BUILT_HERE_MARKER).is_file():
            warn_if_json_disagrees(tokenizer, json_file, config)
        return tokenizer
    if json_file.is_file():
        return TokenizerJsonTokenizer(json_file, config)
    raise TokenizerError(f"no tokenizer in {directory}: expected tokenizer.model or tokenizer.json")


def warn_if_json_disagrees(reference: SentencePieceTokenizer, json_file: Path, config: dict[str, Any]) -> int:
    """Log one line when tokenizer.json encodes a probe differently; returns how many did.

    The outcome depends only on the two files (and the probes), so it is remembered under their
    digest in the project's cache: parsing the real 11 MB tokenizer.json took 0.8-2 s of every
    start-up, for the same answer each time."""
    key = _probe_key(reference.source, json_file, config)
    differ = _remembered_probe(key)
    if differ is None:
        try:
            shipped = TokenizerJsonTokenizer(json_file, config)
        except TokenizerError as exc:
            log.warning("ignoring %s (%s); tokenizing with %s", json_file.name, exc, reference.source.name)
            return len(PROBES)
        differ = [p for p in PROBES if shipped.encode(p) != reference.encode(p)]
        _remember_probe(key, differ)
    if differ:
        log.warning(
            "%s tokenizes %d of %d probe strings differently from %s (e.g. %r); using %s, the sentencepiece "
            "model MiniCPM was trained with",
            json_file.name,
            len(differ),
            len(PROBES),
            reference.source.name,
            differ[0],
            reference.source.name,
        )
    return len(differ)


def _probe_key(model_file: Path, json_file: Path, config: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps([PROBES, config], sort_keys=True, default=str).encode())
    for file in (model_file, json_file):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:32]


def _probe_file(key: str) -> Path:
    return cache_root() / "tokenizer-probes" / f"{key}.json"


def _remembered_probe(key: str) -> list[str] | None:
    try:
        found = json.loads(_probe_file(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, list) and all(p in PROBES for p in found) else None


def _remember_probe(key: str, differ: list[str]) -> None:
    """Written whole or not at all (a temporary file renamed); a cache we cannot write is no error."""
    target = _probe_file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(differ, ensure_ascii=False), encoding="utf-8")
        partial.replace(target)
    except OSError as exc:
        log.debug("cannot remember the tokenizer probe in %s: %s", target, exc)


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {file}: {exc}") from None
    return config if isinstance(config, dict) else {}


def _token_text(value: Any, default: str) -> str:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default
