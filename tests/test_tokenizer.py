"""The tokenizer rule, checked against sentencepiece itself on MiniCPM-2B's real tokenizer.model.

The model was trained on `[BOS] + sentencepiece.encode(text)` and its answers are
`sentencepiece.decode(ids)`: whatever the server does must give exactly those ids and that text,
also when streamed one token at a time, and whatever tokenizer.json sits beside the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import requests
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from minicpm_server.engine.detokenize import IncrementalDetokenizer
from minicpm_server.model import chat
from minicpm_server.model.tokenizer import (
    BUILT_HERE_MARKER,
    SentencePieceTokenizer,
    TokenizerJsonTokenizer,
    load_tokenizer,
)
from tests import reference

CORPUS = [
    # Chinese and English prose
    "山东省最高的山是哪座山, 它比黄山高还是矮？差距多少？",
    "泰山位于山东省泰安市，主峰玉皇顶海拔1545米。黄山最高峰莲花峰海拔1864.8米。",
    "MiniCPM is an end-side LLM developed by ModelBest Inc. and TsinghuaNLP.",
    "The quick brown fox jumps over the lazy dog; it's 3.14 o'clock, isn't it?",
    "中英混排：MiniCPM-2B 在 MT-Bench 上超过了 Llama2-70B-Chat。",
    # code with indentation
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "```python\nfor i in range(10):\n\tprint(i)\n```",
    'int main() {\n  printf("%d\\n", 42);\n  return 0;\n}',
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    # runs of spaces and newlines, \r\n, tabs
    "a  b   c    d",
    "line one\n\n\nline four",
    "windows\r\nline\r\nendings\r\n",
    "\t\ttabs\tand\t\tmore",
    " \n \t \r\n ",
    # HTML
    "<p>Hello</p><br/><b>bold</b><table><tr><td>1</td></tr></table>",
    "<!DOCTYPE html><html><head><title>x</title></head></html>",
    # full-width digits and punctuation
    "０１２３４５６７８９ ＝ ＋ － ％",
    "【注意】《红楼梦》第１２０回：“好了歌”！",
    # emoji and rare CJK (byte fallback)
    "😀🚀👩‍👩‍👧‍👦 emoji",
    "𠀀𠀁𪚥 龘靐齉 biáng",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº",
    # leading and trailing spaces
    " leading space",
    "   three leading",
    "trailing space ",
    "trailing spaces   ",
    # MiniCPM's markers and special-token look-alikes are text
    "<用户>你好<AI>你好，有什么可以帮你？<用户>再见<AI>",
    "<s>not a control token</s> <unk> <reserved_5> <SEP>",
    "",
    "x",
]

HISTORY = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？\n\n- 问答\n- 写作"},
]


@pytest.fixture(scope="module")
def sp(real_tokenizer: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(real_tokenizer / "tokenizer.model"))


@pytest.fixture(scope="module")
def ours(real_dir: Path):
    return load_tokenizer(real_dir)


def test_real_checkpoint_uses_sentencepiece(ours, real_dir: Path) -> None:
    assert isinstance(ours, SentencePieceTokenizer)
    assert ours.source == real_dir / "tokenizer.model"
    assert ours.vocab_size == 122753 and (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_turn_markers_are_three_plain_tokens(ours) -> None:
    assert ours.encode("<用户>")[1:] == [95396, 4194, 95388]  # "<", "用户", ">"
    assert 2 not in ours.encode("</s>")  # text, never the end-of-sequence token


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_corpus_encodes_and_decodes_as_sentencepiece(ours, sp, text: str) -> None:
    ids = sp.encode(text)
    assert ours.encode(text) == [1, *ids]
    assert ours.decode(ids) == sp.decode(ids)
    assert ours.decode([1, *ids, 2]) == sp.decode(ids)  # BOS and EOS decode to nothing


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_streamed_deltas_concatenate_to_the_full_decode(ours, sp, text: str) -> None:
    ids = sp.encode(text)
    detok = IncrementalDetokenizer(ours)
    chunks = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == sp.decode(ids)
    if "\ufffd" not in sp.decode(ids):
        assert all("\ufffd" not in c for c in chunks)  # a byte-fallback character never streams half


def test_corpus_covers_byte_fallback_and_user_defined_pieces(sp) -> None:
    pieces = {sp.id_to_piece(i) for text in CORPUS for i in sp.encode(text)}
    assert any(p.startswith("<0x") for p in pieces)
    assert {"\n", "\t", "<p>", "０"} <= pieces


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_text_encodes_and_streams_as_sentencepiece(real_dir: Path, text: str) -> None:
    ours, sp = _cached(real_dir)
    ids = sp.encode(text)
    assert ours.encode(text) == [1, *ids]
    detok = IncrementalDetokenizer(ours)
    assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == sp.decode(ids)


_CACHE: dict[Path, tuple] = {}


def _cached(path: Path) -> tuple:
    # hypothesis runs the test body many times; function-scoped fixtures would be rebuilt each time.
    if path not in _CACHE:
        _CACHE[path] = (load_tokenizer(path), reference.sentencepiece_of(path))
    return _CACHE[path]


def test_chat_template_with_history_encodes_as_sentencepiece(ours, sp) -> None:
    text = chat.render_chat(ours, chat.conversation("山东省最高的山是哪座？", HISTORY))
    expected = (
        "你是一个乐于助人的助手。<用户>你好<AI>你好！有什么可以帮你？\n\n- 问答\n- 写作<用户>山东省最高的山是哪座？<AI>"
    )
    assert text == expected
    assert ours.encode(text) == [1, *sp.encode(expected)]


def test_lossy_tokenizer_json_is_named_in_one_warning(real_dir: Path, tmp_path: Path, caplog) -> None:
    import shutil

    brought = tmp_path / "brought"  # the real tokenizer's files as a user brings them (no marker of ours)
    brought.mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_dir / name, brought / name)
    shipped = TokenizerJsonTokenizer(brought / "tokenizer.json", {})
    assert shipped.encode("hello") != load_tokenizer(brought).encode("hello")  # the conversion is lossy
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minicpm_server"):
        load_tokenizer(brought)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "tokenizer.json tokenizes" in warnings[0] and "using tokenizer.model" in warnings[0]


def test_no_warning_without_tokenizer_json(real_nojson_dir: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="minicpm_server"):
        tokenizer = load_tokenizer(real_nojson_dir)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_tokenizer_json_alone_is_used_as_shipped(tmp_path: Path, tiny_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, TokenizerJsonTokenizer)
    ids = tokenizer.encode("hello world")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids).strip() == "hello world"


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_trained_tiny_tokenizer_follows_the_rule_too(tiny_dir: Path, text: str) -> None:
    ours, sp = _cached(tiny_dir)
    ids = sp.encode(text)
    assert ours.encode(text) == [1, *ids]
    detok = IncrementalDetokenizer(ours)
    assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == sp.decode(ids)


# --------------------------------------------------------------------------- through the server

PROMPTS = ["山东省最高的山是哪座山？", "def f(x):\n    return x", "  hello\tworld  "]


@pytest.fixture(scope="module", params=["real_dir", "real_nojson_dir"])
def real_server(request, start_server):
    path = request.getfixturevalue(request.param)
    return path, start_server("--model-path", path, "--device", "cpu")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_answers_and_usage_match_a_sentencepiece_reference(real_server, prompt: str) -> None:
    path, server = real_server
    config, state = reference.load_raw(path)
    sp = reference.sentencepiece_of(path)
    prompt_ids = reference.encode(sp, reference.chat_prompt(prompt))
    generated = reference.greedy(config, state, prompt_ids, 12, repetition_penalty=1.02)
    expected = reference.clean(sp, generated, config["eos_token_id"])

    legacy = requests.post(server.url, json={"prompt": prompt, "max_new_tokens": 12, "do_sample": False}, timeout=120)
    assert legacy.status_code == 200, legacy.text
    assert legacy.json()["response"] == expected

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0}
    openai = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert openai["choices"][0]["message"]["content"] == expected
    assert openai["usage"]["prompt_tokens"] == len(prompt_ids)

    raw = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    completion = requests.post(server.url + "/v1/completions", json=raw, timeout=120).json()
    assert completion["usage"]["prompt_tokens"] == len(reference.encode(sp, prompt))


def test_the_json_warning_is_for_checkpoints_the_user_brought(tiny_dir: Path, tmp_path: Path, caplog) -> None:
    """Our own checkpoints' tokenizer.json is lossy on purpose: no warning about it. The same
    files without our marker (a user's checkpoint) are warned about, as before."""
    import shutil

    assert (tiny_dir / BUILT_HERE_MARKER).is_file()
    with caplog.at_level(logging.WARNING, logger="minicpm_server"):
        load_tokenizer(tiny_dir)
    assert not [r for r in caplog.records if "tokenizer.json" in r.getMessage()]
    brought = tmp_path / "brought"
    brought.mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, brought / name)
    with caplog.at_level(logging.WARNING, logger="minicpm_server"):
        load_tokenizer(brought)
    assert [r for r in caplog.records if "tokenizer.json tokenizes" in r.getMessage()]


def test_the_tokenizer_json_check_is_remembered_per_pair_of_files(tiny_dir, tmp_path, monkeypatch, caplog) -> None:
    """A checkpoint the user brought, whose tokenizer.json disagrees with tokenizer.model (as the
    real download's does): warned about at every start, but tokenizer.json is parsed only the
    first time (0.8-2 s of start-up for the real one), and again once either file changes."""
    import shutil

    from minicpm_server.model import tokenizer as tokenizer_module

    brought = tmp_path / "brought"
    shutil.copytree(tiny_dir, brought)
    (brought / tokenizer_module.BUILT_HERE_MARKER).unlink()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    parsed: list[Path] = []
    real_init = tokenizer_module.TokenizerJsonTokenizer.__init__

    def counting_init(self, file, config):
        parsed.append(file)
        real_init(self, file, config)

    monkeypatch.setattr(tokenizer_module.TokenizerJsonTokenizer, "__init__", counting_init)

    def warnings() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="minicpm_server"):
            tokenizer_module.load_tokenizer(brought)
        return [r.getMessage() for r in caplog.records if "probe strings differently" in r.getMessage()]

    first = warnings()
    assert len(first) == 1 and len(parsed) == 1
    assert list((tmp_path / "cache" / "minicpm-server" / "tokenizer-probes").glob("*.json"))
    assert warnings() == first and len(parsed) == 1  # remembered: the same line, no parse
    with (brought / "tokenizer.json").open("a") as handle:
        handle.write("\n")  # a changed file is checked again
    assert warnings() == first and len(parsed) == 2
