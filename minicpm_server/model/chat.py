"""MiniCPM's chat format, exactly as the checkpoint's `model.chat` renders and cleans it.

`model.chat(tokenizer, query, history)` appends `{"role": "user", "content": query}` to the
history, renders it with the chat template below (a user turn is `<用户>` + stripped content +
`<AI>`; any other turn, system and assistant alike, is its stripped content; no separators), lets
the tokenizer add BOS, generates, and keeps the decoded text before the first `<AI>` or `<用户>`.

MiniCPM-2B has no system role: a system message is rendered as plain text where it stands,
which is what the template's non-user branch does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
    """Render messages with the checkpoint's chat template, or MiniCPM's when it has none.

    The template comes with the download, so it runs in jinja2's sandbox (as transformers runs
    chat templates). BOS is the tokenizer's to add: a template that writes it out as text has it
    removed here, or sentencepiece would encode "<s>" as three ordinary pieces.
    """
    template = getattr(tokenizer, "chat_template", None) or MINICPM_CHAT_TEMPLATE
    text = _compiled(template).render(
        messages=list(messages),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        add_generation_prompt=False,
    )
    return text.removeprefix(tokenizer.bos_token)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
