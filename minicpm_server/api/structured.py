"""Structured outputs and tool calls, seen from the HTTP side: request fields → a Constraint for the
engine (engine/grammar.py compiles it), tool calls in the history → text MiniCPM reads, and a
constrained answer → OpenAI's `tool_calls`.

What is supported and how (README, "Structured outputs"):

* `response_format` `{"type": "json_object"}` (any JSON object) and `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}`; vLLM's `structured_outputs` `{"json"}`,
  `{"regex"}`, `{"choice"}`, `{"grammar"}` (EBNF), `{"json_object": true}`.
* `tools` with `tool_choice` naming a function: the answer is that function's arguments, a JSON
  object valid against its `parameters`. With `"required"`: a JSON list of one or more calls,
  `[{"name": ..., "arguments": {...}}]`, each valid against its function's schema (exactly one
  with `parallel_tool_calls: false`). `tool_choice: "auto"` (OpenAI's default when tools are
  sent) is refused: MiniCPM-2B has no tool-call format of its own, so letting it decide whether
  to call would mean guessing from free text. `"none"` answers in text, ignoring the tools.
* Ollama's `format` (`/api/chat`, `/api/generate`): `"json"` as json_object, a schema as json_schema.
* In the history, an assistant turn's tool calls are written after its text as the same JSON list
  the model produces under "required", and a tool result becomes a user turn, `<用户>Result of
  NAME: CONTENT<AI>`, so the model answers it next.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from minicpm_server.engine.protocol import Constraint

if TYPE_CHECKING:
    from minicpm_server.api.protocol import (
        ChatCompletionMessage,
        ChatCompletionRequest,
        ResponseFormat,
        StructuredOutputs,
    )


def _constrains(response_format: ResponseFormat | None) -> bool:
    return response_format is not None and response_format.type != "text"


def requested_constraint(
    response_format: ResponseFormat | None, structured: StructuredOutputs | None
) -> Constraint | None:
    """The constraint a request's response_format or structured_outputs asks for, if any."""
    if structured is not None:
        param = "structured_outputs"
        if structured.json_ is not None:
            schema = structured.json_
            return Constraint("json", schema if isinstance(schema, str) else _canonical(schema), f"{param}.json")
        if structured.regex is not None:
            return Constraint("regex", structured.regex, f"{param}.regex")
        if structured.choice is not None:
            return Constraint("choice", json.dumps(structured.choice, ensure_ascii=False), f"{param}.choice")
        if structured.grammar is not None:
            return Constraint("grammar", structured.grammar, f"{param}.grammar")
        return Constraint("json_object", "", param)
    if not _constrains(response_format):
        return None
    assert response_format is not None
    if response_format.type == "json_object":
        return Constraint("json_object", "", "response_format")
    spec = response_format.json_schema
    assert spec is not None
    schema = spec.schema_ if spec.schema_ is not None else {"type": "object"}
    return Constraint("json", _canonical(schema), "response_format.json_schema.schema")


def format_constraint(value: str | dict[str, Any] | None) -> Constraint | None:
    """Ollama's `format`: "json" asks for a JSON object (Ollama's JSON mode, our json_object), a
    schema for JSON valid against it; "" or absent for free text."""
    if not value:
        return None
    if value == "json":
        return Constraint("json_object", "", "format")
    return Constraint("json", _canonical(value), "format")


def _canonical(schema: Any) -> str:
    """The schema's text, the cache key of its compiled grammar. Keys keep their order: a schema's
    properties are generated in the order it lists them."""
    return json.dumps(schema, ensure_ascii=False)


# --------------------------------------------------------------------------- tools


def tool_choice_problem(tools: Sequence[Any] | None, choice: Any) -> tuple[str, str] | None:
    """Why a tools/tool_choice pair cannot be served, or None."""
    if not tools:
        if choice not in (None, "none", "auto"):
            return "tool_choice", "names a tool but no tools were given"
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        return "tools", "two tools have the same name"
    if choice in (None, "auto"):
        return "tool_choice", (
            "MiniCPM-2B has no tool-call format of its own, so it cannot decide by itself whether to call a tool: "
            'send tool_choice "required" (it calls one or more of the tools) or {"type": "function", '
            '"function": {"name": ...}} (it calls that one), or "none"'
        )
    if choice not in ("none", "required") and choice.function.name not in names:
        return "tool_choice", f"names '{choice.function.name}', which is not among the tools ({', '.join(names)})"
    return None


def tool_constraint(body: ChatCompletionRequest) -> Constraint:
    """The grammar of the call a request asks for: the named function's arguments, or a list of
    calls of any of the tools."""
    tools = {t.function.name: t.function for t in body.tools or ()}
    choice = body.tool_choice
    if choice != "required":
        function = tools[choice.function.name]  # type: ignore[union-attr]
        return Constraint("json", _canonical(_parameters(function)), "tools")
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": _parameters(function)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, function in tools.items()
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if body.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return Constraint("json", _canonical(schema), "tools")


def _parameters(function: Any) -> dict[str, Any]:
    return function.parameters if function.parameters is not None else {"type": "object", "properties": {}}


def tool_calls_from(text: str, body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """A finished constrained answer as OpenAI's tool calls (id, type, function name, arguments
    as a JSON string). Raises ValueError when the text is not a whole call (cut by max_tokens)."""
    choice = body.tool_choice
    if choice != "required":
        json.loads(text)  # a complete object, or the caller reports the cut answer as text
        return [_call(choice.function.name, text.strip())]  # type: ignore[union-attr]
    return [_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(text)]


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def chat_turns(messages: Sequence[ChatCompletionMessage]) -> list[dict[str, str]]:
    """Messages as the (role, content) turns MiniCPM's template renders (module docstring)."""
    names = {call.id: call.function.name for m in messages for call in m.tool_calls or ()}
    turns = []
    for m in messages:
        if m.role == "tool":
            name = m.name or names.get(m.tool_call_id or "", "the tool")
            turns.append({"role": "user", "content": f"Result of {name}: {m.text()}"})
        elif m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
            text = m.text() + json.dumps(calls, ensure_ascii=False, separators=(",", ":"))  # as the model writes it
            turns.append({"role": "assistant", "content": text})
        else:
            turns.append({"role": m.role, "content": m.text()})
    return turns


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # shown as the client sent it
