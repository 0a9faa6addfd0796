"""Prompt rendering and clean-up, exactly as the checkpoint's model.chat does them."""

from __future__ import annotations

import pytest

from minicpm_server import chat
from minicpm_server.checkpoint import inspect_checkpoint, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(inspect_checkpoint(tiny_dir))


def test_single_turn_rendering(tokenizer) -> None:
    assert chat.render_chat(tokenizer, chat.conversation("  你好  ")) == "<用户>你好<AI>"


def test_history_and_system_rendering(tokenizer) -> None:
    history = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "hi "},
        {"role": "assistant", "content": " hello"},
    ]
    text = chat.render_chat(tokenizer, chat.conversation("again", history))
    # Non-user turns are their stripped content, with no separators: model.chat's template.
    assert text == "Be brief.<用户>hi<AI>hello<用户>again<AI>"


def test_builtin_template_used_when_checkpoint_has_none(tokenizer) -> None:
    messages = chat.conversation("q", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with_template = chat.render_chat(tokenizer, messages)
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert chat.render_chat(tokenizer, messages) == with_template
    finally:
        tokenizer.chat_template = saved


def test_prompt_gets_bos_and_marker_tokens(tokenizer) -> None:
    ids = chat.encode_prompt(tokenizer, "<用户>hello<AI>")
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1]) == "<用户>"
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<AI>"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("plain answer", "plain answer"),
        ("answer<AI>more", "answer"),
        ("answer<用户>next question<AI>", "answer"),
        ("a\nb<用户>x<AI>y", "a\nb"),
        ("<AI>everything after", ""),
    ],
)
def test_cut_at_turn_marker(raw: str, clean: str) -> None:
    assert chat.cut_at_turn_marker(raw) == clean
