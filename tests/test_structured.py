"""Structured outputs and tool calls: JSON that parses (and validates) by construction, whatever
the model. The checkpoints have random weights, so without the mask almost nothing they write is
JSON (checked here too): every valid answer below is the grammar's doing."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema_rs
import pytest
import requests
from openai import OpenAI
from pydantic import BaseModel, Field

from minicpm_server.engine import vllm_installed
from minicpm_server.model.tokenizer import load_tokenizer

NEEDS_VLLM = pytest.mark.skipif(
    not vllm_installed(), reason="vLLM is not installed here; `bash scripts/test-vllm.sh` runs these"
)
SEEDS = range(6)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {
            "type": "array",
            "items": {"type": "string", "enum": ["a", "b", "北京"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "kind": {"const": "person"},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "city": {"enum": ["上海", "深圳"]}},
            "required": ["zip", "city"],
        },
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "kind", "address", "ok"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["北京", "上海"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CST"]}}, "required": ["zone"]},
    },
}


def chat(server, content: str = "介绍一下你自己", **extra) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 300, "temperature": 1.0, **extra}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text[:500]
    return r.json()["choices"][0]


def streamed_chat(server, **extra) -> tuple[str, list[dict], str]:
    """Text, tool-call deltas and finish reason of a streamed chat answer."""
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 300,
        "temperature": 1.0,
        "stream": True,
        **extra,
    }
    text, calls, reason = [], [], None
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["delta"].get("content") or "")
            calls.extend(choice["delta"].get("tool_calls") or [])
            reason = choice["finish_reason"] or reason
    return "".join(text), calls, reason


def load(text: str):
    """JSON as Python reads it, with numbers kept within what the validator takes: the grammar
    allows any number of digits and any exponent ("88e471" is valid JSON), where Python reads inf
    and the validator cannot hold an integer past 64 bits."""

    def finite(s: str) -> float:
        value = float(s)
        return value if abs(value) != float("inf") else 1e308

    return json.loads(text, parse_float=finite, parse_int=lambda s: int(s) if len(s) < 19 else finite(s))


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# --------------------------------------------------------------------------- JSON by construction


def test_json_schema_answers_validate_over_many_seeds(server) -> None:
    validator = jsonschema_rs.validator_for(PERSON)
    for seed in SEEDS:
        choice = chat(server, seed=seed, response_format=schema_format(PERSON))
        assert choice["finish_reason"] == "stop"
        validator.validate(load(choice["message"]["content"]))


def test_without_the_mask_the_same_model_writes_no_json(server) -> None:
    """What makes the test above able to fail: unconstrained, these answers do not parse."""
    parsed = 0
    for seed in SEEDS:
        try:
            json.loads(chat(server, seed=seed, max_tokens=40)["message"]["content"])
            parsed += 1
        except ValueError:
            pass
    assert parsed == 0


def test_streamed_deltas_join_to_valid_json(server) -> None:
    validator = jsonschema_rs.validator_for(PERSON)
    for seed in SEEDS[:3]:
        text, _, reason = streamed_chat(server, seed=seed, response_format=schema_format(PERSON))
        assert reason == "stop"
        validator.validate(load(text))


def test_json_object_on_both_endpoints(server) -> None:
    for seed in SEEDS[:3]:
        said = chat(server, seed=seed, max_tokens=400, response_format={"type": "json_object"})
        if said["finish_reason"] == "stop":
            assert isinstance(json.loads(said["message"]["content"]), dict)
        body = {
            "prompt": "{",
            "max_tokens": 400,
            "temperature": 1.0,
            "seed": seed,
            "response_format": {"type": "json_object"},
        }
        done = requests.post(server.url + "/v1/completions", json=body, timeout=300).json()["choices"][0]
        if done["finish_reason"] == "stop":
            assert isinstance(json.loads(done["text"]), dict)
        else:  # a free-form object may run past its budget; what there is still starts as an object
            assert done["text"].startswith("{")


def test_vllm_structured_outputs_regex_choice_and_grammar(server) -> None:
    def complete(seed: int, **structured) -> dict:
        body = {"prompt": "x", "max_tokens": 300, "temperature": 1.0, "seed": seed, "structured_outputs": structured}
        r = requests.post(server.url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    for seed in SEEDS[:3]:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", complete(regex=r"[0-9]{3}-[a-z]{2}", seed=seed)["text"])
        assert complete(choice=["是", "否", "maybe"], seed=seed)["text"] in ("是", "否", "maybe")
        grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
        text = complete(grammar=grammar, seed=seed)["text"]
        assert re.fullmatch(r"\(([1-9][0-9]?)(\+[1-9][0-9]?)*\)", text), text
        assert isinstance(json.loads(complete(json=PERSON, seed=seed)["text"]), dict)


def test_turn_markers_inside_a_structured_answer_do_not_cut_it(server) -> None:
    """Chat answers stop at <AI> and <用户> (MiniCPM's turn markers, plain text to its tokenizer);
    with a grammar active the grammar decides where the answer ends, so they may appear inside."""
    choice = chat(server, structured_outputs={"choice": ["<AI>答案<用户>"]})
    assert choice["message"]["content"] == "<AI>答案<用户>" and choice["finish_reason"] == "stop"


def test_a_grammar_that_cannot_finish_ends_with_length(server) -> None:
    choice = chat(server, max_tokens=5, response_format=schema_format(PERSON))
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith("{")


def test_real_tokenizer_chinese_and_byte_fallback_stay_valid_utf8(start_server, real_dir) -> None:
    """MiniCPM-2B's own vocabulary: Chinese pieces and byte-fallback tokens inside JSON strings."""
    server = start_server("--model-path", real_dir, "--device", "cpu")
    schema = {
        "type": "object",
        "properties": {"城市": {"enum": ["北京", "上海", "𝔘nicode"]}, "备注": {"type": "string", "maxLength": 12}},
        "required": ["城市", "备注"],
    }
    validator = jsonschema_rs.validator_for(schema)
    for seed in SEEDS[:4]:
        r = requests.post(
            server.url + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "天气"}],
                "max_tokens": 200,
                "temperature": 1.0,
                "seed": seed,
                "response_format": schema_format(schema),
            },
            timeout=300,
        )
        raw = r.content.decode("utf-8")  # strict: a broken multi-byte character fails here
        content = json.loads(raw)["choices"][0]["message"]["content"]
        validator.validate(load(content))
    server.stop()


def test_vocabulary_handed_to_the_grammar_engine_decodes_like_the_tokenizer(real_tokenizer) -> None:
    """Every token the mask can allow must decode to the text the grammar checked."""
    import xgrammar as xgr

    from minicpm_server.engine.grammar import GrammarCompiler

    tokenizer = load_tokenizer(real_tokenizer)
    info = GrammarCompiler(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_id).info
    assert info.vocab_type == xgr.VocabType.BYTE_FALLBACK
    decoded = info.decoded_vocab
    for token_id in range(3, tokenizer.vocab_size, 97):
        assert decoded[token_id] == tokenizer.token_bytes(token_id), token_id
    assert set(info.special_token_ids) >= {0, 1}  # UNK and BOS can never be chosen


# --------------------------------------------------------------------------- tools


def test_named_tool_call(server) -> None:
    validator = jsonschema_rs.validator_for(WEATHER["function"]["parameters"])
    for seed in SEEDS[:3]:
        choice = chat(
            server,
            seed=seed,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert (
            call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
        )
        validator.validate(load(call["function"]["arguments"]))


def test_required_tool_calls_stream_as_openai_deltas(server) -> None:
    schemas = {t["function"]["name"]: jsonschema_rs.validator_for(t["function"]["parameters"]) for t in (WEATHER, TIME)}
    for seed in SEEDS[:3]:
        text, calls, reason = streamed_chat(server, seed=seed, tools=[WEATHER, TIME], tool_choice="required")
        assert reason == "tool_calls" and text == "" and calls
        for call in calls:
            schemas[call["function"]["name"]].validate(load(call["function"]["arguments"]))
        whole = chat(server, seed=seed, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
        assert whole["finish_reason"] == "tool_calls" and len(whole["message"]["tool_calls"]) == 1


def test_named_tool_call_streams_its_arguments(server) -> None:
    text, calls, reason = streamed_chat(
        server, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert reason == "tool_calls" and text == ""
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    arguments = "".join(c["function"].get("arguments", "") for c in calls)
    assert json.loads(arguments)["city"] in ("北京", "上海")


def test_tool_messages_in_the_history_are_rendered(server) -> None:
    """An assistant turn with tool_calls and a tool result: accepted, and the prompt shows both."""
    messages = [
        {"role": "user", "content": "北京天气?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "晴, 25°C"},
    ]
    tokens = requests.post(server.url + "/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    text = requests.post(server.url + "/detokenize", json={"tokens": tokens}, timeout=60).json()["prompt"]
    assert (
        text == '<用户>北京天气?<AI>[{"name":"get_weather","arguments":{"city":"北京","days":1}}]'
        "<用户>Result of get_weather: 晴, 25°C<AI>"
    )
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=300)
    assert r.status_code == 200


# --------------------------------------------------------------------------- clients


class Person(BaseModel):
    name: str = Field(max_length=8)  # bounded: a random-weight model would never end a free string
    age: int = Field(ge=0, le=150)
    city: Literal["北京", "上海", "广州"]


def test_openai_sdk_parse_and_tool_call(server) -> None:
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    done = client.chat.completions.parse(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        response_format=Person,
        max_tokens=300,
        temperature=1.0,
        seed=1,
    )
    assert isinstance(done.choices[0].message.parsed, Person)
    said = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "天气"}],
        tools=[WEATHER],
        max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = said.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("北京", "上海")


def test_langchain_with_structured_output(server) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="m", max_tokens=300, temperature=1.0)
    person = model.with_structured_output(Person, method="json_schema").invoke("介绍一个人")
    assert isinstance(person, Person)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (
            "/v1/chat/completions",
            {"response_format": schema_format({"type": "bogus"})},
            "response_format.json_schema.schema",
        ),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
        ("/v1/completions", {"structured_outputs": {"regex": "(["}}, "structured_outputs.regex"),
        (
            "/v1/completions",
            {"structured_outputs": {"json": {"$ref": "http://example.com/s.json"}}},
            "structured_outputs.json",
        ),
        ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        (
            "/v1/completions",
            {"structured_outputs": {"grammar": "root ::= undefined_rule"}},
            "structured_outputs.grammar",
        ),
        (
            "/v1/chat/completions",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ("/v1/chat/completions", {"tools": [WEATHER]}, "tool_choice"),
        ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
    ],
)
def test_bad_structured_input_is_a_400_naming_the_field(server, path: str, extra: dict, param: str) -> None:
    body = {"max_tokens": 5, **extra}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})
    r = requests.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error


# --------------------------------------------------------------------------- the vLLM backend


@pytest.mark.vllm
@NEEDS_VLLM
def test_vllm_structured_outputs_agree_with_native(vllm_and_native) -> None:
    """vLLM's own structured outputs (its xgrammar over its tokenizer's vocabulary) allow what ours
    allow: greedy constrained answers are the same on both backends, and valid."""
    vllm, native = vllm_and_native
    validator = jsonschema_rs.validator_for(PERSON)
    for extra in (
        {"response_format": schema_format(PERSON)},
        {"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}},
        {"structured_outputs": {"choice": ["是", "否"]}},
        {"tools": [WEATHER], "tool_choice": "required"},
    ):
        answers = [chat(s, temperature=0, **extra) for s in (vllm, native)]
        assert answers[0]["message"] == answers[1]["message"] or (
            answers[0]["message"]["tool_calls"]
            and [c["function"] for c in answers[0]["message"]["tool_calls"]]
            == [c["function"] for c in answers[1]["message"]["tool_calls"]]
        )
    for seed in SEEDS[:3]:
        validator.validate(load(chat(vllm, seed=seed, response_format=schema_format(PERSON))["message"]["content"]))


@pytest.mark.vllm
@NEEDS_VLLM
def test_vllm_grammar_vocabulary_is_ours(tiny_dir, real_tokenizer, tmp_path) -> None:
    """What vLLM's xgrammar reads from the Granite copy's tokenizer (Hugging Face's loader) is the
    same vocabulary, token for token, as ours from tokenizer.model."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from minicpm_server.engine.grammar import GrammarCompiler
    from minicpm_server.model.checkpoint import preflight
    from minicpm_server.model.export import granite_directory
    from minicpm_server.model.tiny import build_tiny_checkpoint

    for directory in (
        tiny_dir,
        build_tiny_checkpoint(tmp_path / "real", "tiny", seed=3, tokenizer_from=real_tokenizer),
    ):
        ours = load_tokenizer(directory)
        hf = AutoTokenizer.from_pretrained(granite_directory(preflight(directory, "cpu").files))
        theirs = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=ours.vocab_size, stop_token_ids=[ours.eos_token_id])
        mine = GrammarCompiler(ours, ours.vocab_size, ours.eos_token_id).info
        assert theirs.vocab_type == mine.vocab_type
        controls = set(mine.special_token_ids) | {ours.eos_token_id}  # banned on vLLM by a logit bias
        assert controls == {0, 1, 2}
        differ = [i for i, (a, b) in enumerate(zip(theirs.decoded_vocab, mine.decoded_vocab, strict=True)) if a != b]
        assert set(differ) <= controls
