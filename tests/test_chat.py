"""Prompt rendering and clean-up, exactly as the checkpoint's model.chat does them."""

from __future__ import annotations

import pytest

from minicpm_server.model import chat
from minicpm_server.model.checkpoint import inspect_checkpoint, load_tokenizer


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


def test_prompt_gets_bos_and_markers_are_plain_text(tiny_dir, tokenizer) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    ids = tokenizer.encode("<用户>hello<AI>")
    assert ids[0] == tokenizer.bos_token_id == 1
    # As in MiniCPM-2B's tokenizer, the turn markers are ordinary text: "<", "用户", ">".
    assert [sp.id_to_piece(i) for i in ids[1:4]] == ["<", "用户", ">"]
    assert [sp.id_to_piece(i) for i in ids[-3:]] == ["<", "AI", ">"]


def test_template_that_writes_bos_as_text_does_not_encode_it(tokenizer) -> None:
    saved = tokenizer.chat_template
    tokenizer.chat_template = "{{ bos_token }}" + chat.MINICPM_CHAT_TEMPLATE
    try:
        assert chat.render_chat(tokenizer, chat.conversation("q")) == "<用户>q<AI>"
    finally:
        tokenizer.chat_template = saved
