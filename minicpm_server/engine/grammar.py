"""Structured outputs: a request's constraint as a grammar, compiled by xgrammar over our vocabulary.

A `Constraint` (engine/protocol.py) says what the answer must be: JSON valid against a schema, any
JSON object, text matching a regex, one of a list of strings, or text in an EBNF grammar. xgrammar
(what vLLM and SGLang use by default) turns it into a grammar, compiles that against the
tokenizer's vocabulary once per constraint (cached), and a matcher per request then says, before
each token is sampled, which tokens keep the answer inside the grammar; the others get -inf.

The vocabulary is ours: MiniCPM's sentencepiece pieces as the model sees them ("▁" for a space,
byte-fallback pieces `<0xE4>` for single bytes, no dummy prefix), so every token the mask allows
decodes to text the grammar accepts, Chinese and rare characters included. Control tokens (BOS,
UNK) are never allowed; EOS is allowed only where the grammar is complete.

JSON comes out compact (vLLM's `disable_any_whitespace`): vLLM's default lets the model put any
whitespace between JSON tokens, but a 2.7B model left free to indent can emit spaces, tabs and
newlines until its token budget runs out (measured on the random-weight test models: most of an
80-token answer was whitespace). Compact JSON parses the same.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from minicpm_server.engine.protocol import Constraint

if TYPE_CHECKING:
    from minicpm_server.model.tokenizer import Tokenizer

# What vLLM's xgrammar backend passes with disable_any_whitespace (the vLLM backend sets it), so the
# two backends compile the same grammar. (xgrammar 0.2.8 still allows a space after a comma.)
COMPACT: dict[str, Any] = {"any_whitespace": False, "separators": (",", ":"), "strict_mode": True}
CACHE_ENTRIES = 256  # compiled grammars kept, least recently used dropped first


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (an invalid schema, a regex that does not parse, ...):
    a 400 naming `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def to_grammar(constraint: Constraint) -> Any:
    """The constraint as an xgrammar Grammar (no vocabulary needed: this is its validation)."""
    import xgrammar as xgr

    try:
        if constraint.kind == "json":
            _refuse_remote_refs(json.loads(constraint.value), constraint.param)
            return xgr.Grammar.from_json_schema(constraint.value, **COMPACT)
        if constraint.kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', **COMPACT)
        if constraint.kind == "regex":
            return xgr.Grammar.from_regex(constraint.value)
        if constraint.kind == "choice":
            options = json.loads(constraint.value)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))
        return xgr.Grammar.from_ebnf(constraint.value)
    except ConstraintError:
        raise
    except (
        Exception
    ) as exc:  # xgrammar's C++ side raises RuntimeError, its Python side others; all are the input's fault
        raise ConstraintError(f"{constraint.param}: {_reason(exc)}", constraint.param) from None


def _refuse_remote_refs(schema: Any, param: str) -> None:
    """xgrammar resolves only references inside the schema ("#/$defs/x"); for any other it would
    warn and let anything through, which a client would never notice."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                raise ConstraintError(
                    f"{param}: $ref {ref!r} is not supported: only references inside the schema", param
                )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _reason(exc: Exception) -> str:
    """xgrammar's message without its source location prefix ("[12:00:00] /project/...cc:83: ")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("[") else text


def grammar_vocabulary(tokenizer: Tokenizer) -> tuple[list[str], bool]:
    """Every token as xgrammar reads it (a sentencepiece piece; "" for control tokens, which it
    then never allows), and whether the vocabulary uses byte fallback."""
    return tokenizer.grammar_vocabulary()


class GrammarCompiler:
    """Compiles constraints against one tokenizer's vocabulary; thread-safe, cached by constraint."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_id: int) -> None:
        import xgrammar as xgr

        pieces, byte_fallback = grammar_vocabulary(tokenizer)
        vocab_type = xgr.VocabType.BYTE_FALLBACK if byte_fallback else xgr.VocabType.RAW
        self.info = xgr.TokenizerInfo(
            pieces, vocab_type, vocab_size=vocab_size, stop_token_ids=[eos_token_id], add_prefix_space=False
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (not found in the cache)

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar, from the cache when this constraint was compiled before."""
        with self._lock:
            found = self._cache.get(constraint)
            if found is not None:
                self._cache.move_to_end(constraint)
                return found
        compiled = self._compiler.compile_grammar(to_grammar(constraint))
        with self._lock:
            self.compiled += 1
            self._cache[constraint] = compiled
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)
