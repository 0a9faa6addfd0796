"""MiniCPM's chat format, exactly as the checkpoint's `model.chat` renders and cleans it.

`model.chat(tokenizer, query, history)` appends `{"role": "user", "content": query}` to the
history, renders it with the chat template below (a user turn is `<用户>` + stripped content +
`<AI>`; any other turn, system and assistant alike, is its stripped content; no separators), lets
the tokenizer add BOS, generates, and keeps the decoded text before the first `<AI>` or `<用户>`.

MiniCPM-2B has no system role: a system message is rendered as plain text where it stands,
which is what the template's non-user branch does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

USER_TAG = "<用户>"
AI_TAG = "<AI>"
# model.chat keeps only the text before the first of these: the model starting a new turn.
TURN_MARKERS: tuple[str, ...] = (AI_TAG, USER_TAG)

# The template shipped in the download's tokenizer_config.json; used when a checkpoint lacks one.
MINICPM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{'<用户>' + message['content'].strip() + '<AI>'}}"
    "{% else %}{{message['content'].strip()}}{% endif %}"
    "{% endfor %}"
)


def conversation(query: str, history: Sequence[dict[str, str]] = (), role: str = "user") -> list[dict[str, str]]:
    """The message list model.chat renders: the history, then the new query."""
    return [{"role": m["role"], "content": m["content"]} for m in history] + [{"role": role, "content": query}]


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """Render messages with the checkpoint's chat template, or MiniCPM's when it has none."""
    template = getattr(tokenizer, "chat_template", None) or MINICPM_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=False
    )


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids for a rendered prompt; the tokenizer adds BOS, as in model.chat."""
    return list(tokenizer(text).input_ids)


def cut_at_turn_marker(text: str) -> str:
    """The text before the first `<AI>` or `<用户>`, or all of it when neither appears."""
    cuts = [i for i in (text.find(marker) for marker in TURN_MARKERS) if i >= 0]
    return text[: min(cuts)] if cuts else text
