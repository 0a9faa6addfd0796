"""Ollama's API through the official `ollama` Python client (and raw HTTP where the client hides
the wire), on a real server: the same answers as the OpenAI endpoints, Ollama's shapes and errors."""

from __future__ import annotations

import json

import jsonschema_rs
import ollama
import pytest
import requests

from minicpm_server.api.ollama_protocol import OLLAMA_API_VERSION
from minicpm_server.model import chat
from minicpm_server.model.checkpoint import inspect_checkpoint, load_tokenizer
from minicpm_server.model.facts import parameter_count, parameter_size
from tests.harness import HOLD_TOKENS, LEAKS, REPO, metric, wait_for_metric

# Greedy, and long enough to compare: past end-of-sequence (our option, as on the other endpoints).
GREEDY = {"temperature": 0, "num_predict": 24, "ignore_eos": True}
OPENAI_GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "山东省最高的山是哪座山？"}]


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(inspect_checkpoint(tiny_dir))


def openai(server, path: str, body: dict) -> dict:
    r = requests.post(server.url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def openai_chat(server, messages: list[dict], **extra) -> dict:
    return openai(server, "/v1/chat/completions", {"messages": messages, **OPENAI_GREEDY, **extra})


def refused(call) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as caught:
        call()
    return caught.value


# --------------------------------------------------------------------------- the model routes


def test_list_show_ps_and_version(client, server, tiny_dir) -> None:
    config = inspect_checkpoint(tiny_dir).config
    (listed,) = client.list().models
    assert listed.model == "MiniCPM-tiny"  # the served name (--served-model-name, else the directory's)
    assert listed.details.family == "minicpm" and listed.details.quantization_level == "F32"
    assert listed.size == (tiny_dir / "pytorch_model.bin").stat().st_size and len(listed.digest) == 64

    shown = client.show("MiniCPM-tiny")
    assert shown.modelinfo["minicpm.context_length"] == config["max_position_embeddings"]
    assert shown.modelinfo["general.parameter_count"] == parameter_count(config)
    assert shown.modelinfo["general.architecture"] == "minicpm"
    assert shown.capabilities == ["completion"]
    assert shown.details.parameter_size == parameter_size(parameter_count(config))
    assert "<用户>" in shown.template and "PARAMETER temperature 0.5" in shown.modelfile
    assert "repeat_penalty" in shown.parameters and not LEAKS.search(shown.modelfile)  # no paths shown
    assert client.show("MiniCPM-tiny:latest").capabilities == ["completion"]
    assert refused(lambda: client.show("llama3.2")).status_code == 404

    (running,) = client.ps().models
    assert running.model == "MiniCPM-tiny" and running.context_length == config["max_position_embeddings"]
    assert running.size_vram == 0  # on CPU
    assert requests.get(server.url + "/api/version", timeout=30).json() == {"version": OLLAMA_API_VERSION}


def test_parameter_count_is_the_models(loaded) -> None:
    """Counted from config.json, it equals the loaded model's parameters; MiniCPM-2B's is 2.7B."""
    assert parameter_count(loaded.files.config) == sum(p.numel() for p in loaded.model.parameters())
    real = json.loads((REPO / "tests/data/minicpm-2b-sft-config.json").read_text())
    assert parameter_size(parameter_count(real)) == "2.7B"


# --------------------------------------------------------------------------- chat and generate


def test_chat_equals_the_openai_endpoint_whole_and_streamed(client, server) -> None:
    expected = openai_chat(server, QUESTION)
    r = client.chat(model="any-name", messages=QUESTION, options=GREEDY)
    assert r.model == "MiniCPM-tiny" and r.message.role == "assistant"
    assert r.message.content == expected["choices"][0]["message"]["content"]
    assert r.done and r.done_reason == expected["choices"][0]["finish_reason"]
    assert r.prompt_eval_count == expected["usage"]["prompt_tokens"]
    assert r.eval_count == expected["usage"]["completion_tokens"]
    assert r.load_duration == 0 and r.prompt_eval_duration > 0 and r.eval_duration > 0
    assert abs(r.total_duration - r.prompt_eval_duration - r.eval_duration) <= 2  # nanoseconds, rounded

    parts = list(client.chat(model="any-name", messages=QUESTION, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].message.content == "" and parts[-1].eval_count == r.eval_count
    assert parts[-1].done_reason == r.done_reason and parts[-1].total_duration > 0


def test_generate_equals_chat_and_raw_equals_completions(client, server) -> None:
    """A prompt with a system text is the chat turn; raw: true is /v1/completions (no template)."""
    r = client.generate(model="m", prompt=QUESTION[1]["content"], system=QUESTION[0]["content"], options=GREEDY)
    assert r.response == openai_chat(server, QUESTION)["choices"][0]["message"]["content"]

    expected = openai(server, "/v1/completions", {"prompt": "hello world", **OPENAI_GREEDY})
    raw = client.generate(model="m", prompt="hello world", raw=True, options=GREEDY)
    assert raw.response == expected["choices"][0]["text"]
    assert raw.prompt_eval_count == expected["usage"]["prompt_tokens"]
    streamed = list(client.generate(model="m", prompt="hello world", raw=True, options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == raw.response and streamed[-1].context == raw.context


def test_context_carries_a_conversation_on(client, server, tokenizer) -> None:
    """`context` is the prompt's token ids and the answer's; sent back, they go before the next prompt."""
    first = client.generate(model="m", prompt="hello", options=GREEDY)
    assert tokenizer.decode(first.context) == "<用户>hello<AI>" + first.response
    assert first.context[: first.prompt_eval_count] == tokenizer.encode("<用户>hello<AI>")

    second = client.generate(model="m", prompt="and then?", context=first.context, options=GREEDY)
    ids = [*first.context, *tokenizer.encode("<用户>and then?<AI>")[1:]]
    body = {"prompt": ids, **OPENAI_GREEDY, "stop": list(chat.TURN_MARKERS)}  # chat turns end at the markers
    expected = openai(server, "/v1/completions", body)
    assert second.response == expected["choices"][0]["text"] and second.prompt_eval_count == len(ids)

    outside = refused(lambda: client.generate(model="m", prompt="x", context=[1, 10**6]))
    assert outside.status_code == 400 and "context[1]" in outside.error


def test_every_sampling_option_means_what_the_openai_field_does(client, server) -> None:
    options = {
        "temperature": 0.9,
        "top_k": 20,
        "top_p": 0.7,
        "min_p": 0.05,
        "repeat_penalty": 1.3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.4,
        "seed": 7,
        "num_predict": 20,
        "ignore_eos": True,
    }
    fields = {**options, "repetition_penalty": options["repeat_penalty"], "max_tokens": options["num_predict"]}
    for name in ("repeat_penalty", "num_predict"):
        del fields[name]
    expected = openai_chat(server, QUESTION, **fields)["choices"][0]["message"]["content"]
    assert client.chat(model="m", messages=QUESTION, options=options).message.content == expected
    # repeat_last_n 0: Ollama's window of no tokens, so no penalty at all
    plain = openai_chat(server, QUESTION, repetition_penalty=1.0)["choices"][0]["message"]["content"]
    unpenalised = client.chat(model="m", messages=QUESTION, options={**GREEDY, "repeat_last_n": 0})
    assert unpenalised.message.content == plain


def test_stop_seed_num_predict_and_num_ctx(client) -> None:
    full = client.generate(model="m", prompt="stop test", raw=True, options={**GREEDY, "num_predict": 30}).response
    stop = full[8:11]
    cut = client.generate(
        model="m", prompt="stop test", raw=True, options={**GREEDY, "num_predict": 30, "stop": [stop]}
    )
    assert cut.response == full[: full.index(stop)] and cut.done_reason == "stop"

    sampled = {"temperature": 1.0, "seed": 42, "num_predict": 16}
    assert len({client.chat(model="m", messages=QUESTION, options=sampled).message.content for _ in range(2)}) == 1

    r = client.generate(model="m", prompt="count", raw=True, options={**GREEDY, "num_predict": 7})
    assert r.eval_count == 7 and r.done_reason == "length"
    # Without num_predict, the answer may fill what num_ctx leaves after the prompt.
    window = client.generate(
        model="m", prompt="count", raw=True, options={"num_ctx": 40, "temperature": 0, "ignore_eos": True}
    )
    assert window.prompt_eval_count + window.eval_count == 40 and window.done_reason == "length"


def test_options_that_cannot_change_the_answer_are_accepted(client) -> None:
    expected = client.chat(model="m", messages=QUESTION, options=GREEDY).message.content
    harmless = {"num_thread": 2, "num_gpu": 1, "main_gpu": 0, "use_mmap": True, "num_batch": 8, "numa": False}
    harmless |= {"num_keep": 4, "low_vram": False, "mirostat": 0, "mirostat_tau": 5.0, "tfs_z": 1.0, "typical_p": 1.0}
    harmless |= {"repeat_last_n": -1, "penalize_newline": True, "seed": -1}
    r = client.chat(model="m", messages=QUESTION, options={**GREEDY, **harmless}, keep_alive="5m", think=False)
    assert r.message.content == expected


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"mirostat": 2}, "options.mirostat"),
        ({"tfs_z": 0.9}, "options.tfs_z"),
        ({"typical_p": 0.5}, "options.typical_p"),
        ({"penalize_newline": False}, "options.penalize_newline"),
        ({"repeat_last_n": 64}, "options.repeat_last_n"),
        ({"num_predict": 0}, "options.num_predict"),
        ({"num_ctx": 100_000}, "options.num_ctx"),
        ({"num_ctx": 8, "num_predict": 4}, "options.num_ctx"),
        ({"temperature": 3}, "options.temperature"),
        ({"temprature": 0.2}, "did you mean 'temperature'"),
    ],
)
def test_options_that_would_change_the_answer_are_refused(client, options: dict, named: str) -> None:
    error = refused(lambda: client.chat(model="m", messages=QUESTION, options=options))
    assert error.status_code == 400 and named in error.error


def test_penalty_options_are_free_when_no_penalty_is_on(client) -> None:
    off = {**GREEDY, "repeat_penalty": 1.0}
    expected = client.chat(model="m", messages=QUESTION, options=off).message.content
    free = {**off, "repeat_last_n": 64, "penalize_newline": False}
    assert client.chat(model="m", messages=QUESTION, options=free).message.content == expected


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


def test_format_json_and_schema_as_the_openai_response_format(client, server) -> None:
    validator = jsonschema_rs.validator_for(PERSON)
    for seed in range(3):
        sampled = {"temperature": 1.0, "seed": seed, "num_predict": 300}
        r = client.chat(model="m", messages=QUESTION, format=PERSON, options=sampled)
        schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        expected = openai_chat(
            server,
            QUESTION,
            temperature=1.0,
            seed=seed,
            max_tokens=300,
            ignore_eos=False,
            response_format=schema_format,
        )
        assert r.message.content == expected["choices"][0]["message"]["content"]
        if r.done_reason == "stop":
            validator.validate(json.loads(r.message.content))
        g = client.generate(model="m", prompt="x", format="json", options=sampled)
        expected = openai_chat(
            server,
            [{"role": "user", "content": "x"}],
            temperature=1.0,
            seed=seed,
            max_tokens=300,
            ignore_eos=False,
            response_format={"type": "json_object"},
        )
        assert g.response == expected["choices"][0]["message"]["content"]
        if g.done_reason == "stop":
            assert isinstance(json.loads(g.response), dict)


def test_logprobs_as_the_openai_endpoint_gives_them(client, server) -> None:
    r = client.chat(model="m", messages=QUESTION, options=GREEDY, logprobs=True, top_logprobs=2)
    expected = openai_chat(server, QUESTION, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    assert [(e.token, e.logprob) for e in r.logprobs] == [(e["token"], e["logprob"]) for e in expected]
    assert all(len(e.top_logprobs) == 2 for e in r.logprobs)


def test_empty_or_null_content_is_an_empty_turn(client, server) -> None:
    """The official client leaves an empty content out; Ollama reads a missing or null one as empty."""
    messages = [{"role": "assistant", "content": ""}, {"role": "user", "content": "hi"}]
    expected = openai_chat(server, messages)["choices"][0]["message"]["content"]
    assert client.chat(model="m", messages=messages, options=GREEDY).message.content == expected
    body = {
        "model": "m",
        "stream": False,
        "options": GREEDY,
        "messages": [{"role": "assistant", "content": None}, messages[1]],
    }
    assert requests.post(server.url + "/api/chat", json=body, timeout=120).json()["message"]["content"] == expected


def test_loading_requests_answer_at_once(client) -> None:
    """Nothing to generate from: Ollama loads the model (here it is loaded) and says so."""
    assert client.generate(model="m").done_reason == "load"
    assert client.chat(model="m", messages=[]).done_reason == "load"


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (
            lambda c: c.chat(model="m", messages=QUESTION, tools=[{"type": "function", "function": {"name": "f"}}]),
            "tools",
        ),
        (lambda c: c.chat(model="m", messages=QUESTION, think=True), "think"),
        (lambda c: c.chat(model="m", messages=[{"role": "user", "content": "x", "images": [b"\x89PNG"]}]), "images"),
        (lambda c: c.chat(model="m", messages=[{"role": "tool", "content": "42", "tool_name": "f"}]), "role"),
        (lambda c: c.generate(model="m", prompt="x", images=[b"\x89PNG"]), "images"),
        (lambda c: c.generate(model="m", prompt="x", suffix="y"), "suffix"),
        (lambda c: c.generate(model="m", prompt="x", template="{{ .Prompt }}"), "template"),
        (lambda c: c.generate(model="m", prompt="x", raw=True, system="s"), "system"),
    ],
)
def test_what_minicpm_cannot_do_is_a_400(client, call, named: str) -> None:
    error = refused(lambda: call(client))
    assert error.status_code == 400 and named in error.error


# --------------------------------------------------------------------------- errors, wire, auth, metrics


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/api/pull", {"model": "llama3.2"}, 400, "download.py"),
        ("POST", "/api/push", {"model": "x"}, 400, "push"),
        ("POST", "/api/create", {"model": "x", "from": "y"}, 400, "Modelfile"),
        ("DELETE", "/api/delete", {"model": "x"}, 400, "delete"),
        ("POST", "/api/copy", {"source": "x", "destination": "y"}, 400, "any name"),
        ("POST", "/api/embed", {"model": "x", "input": "hi"}, 400, "not an embedding model"),
        ("POST", "/api/embeddings", {"model": "x", "prompt": "hi"}, 400, "not an embedding model"),
        ("POST", "/api/show", {"model": "llama3.2"}, 404, "not found"),
        ("POST", "/api/unknown", {}, 404, "no route"),
        ("GET", "/api/chat", None, 405, "Method Not Allowed"),
        ("POST", "/api/chat", "{not json", 400, "not valid JSON"),
        ("POST", "/api/chat", {"messages": []}, 400, "model"),
        ("POST", "/api/generate", {"model": "m", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ("POST", "/api/generate", {"model": "m", "prompt": "x", "format": "xml"}, 400, "format"),
    ],
)
def test_errors_in_ollamas_shape(server, method: str, path: str, body, status: int, says: str) -> None:
    data = body if isinstance(body, str) else json.dumps(body) if body is not None else None
    r = requests.request(method, server.url + path, data=data, timeout=60)
    assert r.status_code == status
    assert list(r.json()) == ["error", "request_id"] and says in r.json()["error"], r.text
    assert r.json()["request_id"] == r.headers["x-request-id"]
    assert not LEAKS.search(r.text)


def test_client_calls_that_cannot_work_here_say_what_to_do(client) -> None:
    assert "download.py" in refused(lambda: client.pull("llama3.2")).error
    assert "embedding" in refused(lambda: client.embed(model="m", input="hi")).error
    assert refused(lambda: client.delete("m")).status_code == 400
    assert refused(lambda: client.copy("m", "n")).status_code == 400


def test_streams_ndjson_by_default_and_reads_json_without_a_content_type(server) -> None:
    """Ollama's documented curl examples send no Content-Type and no "stream": they get NDJSON."""
    body = json.dumps({"model": "m", "messages": QUESTION, "options": {"num_predict": 5}})
    with requests.post(server.url + "/api/chat", data=body, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(line["done"] is False for line in lines[:-1])
    whole = requests.post(server.url + "/api/generate", data='{"model": "m", "prompt": "hi", "stream": false}')
    assert whole.headers["content-type"] == "application/json" and whole.json()["done"] is True


def test_body_limit_in_ollamas_shape(server) -> None:
    r = requests.post(server.url + "/api/generate", json={"model": "m", "prompt": "x" * 1_100_000}, timeout=60)
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]


def test_api_key(start_server, tiny_dir, monkeypatch) -> None:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)  # the client would send it
    server = start_server("--model-path", tiny_dir, "--device", "cpu", "--api-key", "sesame")
    error = refused(lambda: ollama.Client(host=server.url).list())
    assert error.status_code == 401 and "Bearer" in error.error
    keyed = ollama.Client(host=server.url, headers={"Authorization": "Bearer sesame"})
    assert keyed.list().models[0].model == "MiniCPM-tiny"
    assert keyed.chat(model="m", messages=QUESTION, options={"num_predict": 3}).done


def test_metrics_count_ollama_requests(client, server) -> None:
    ok, bad = ('endpoint="/api/chat",status="200"', 'endpoint="/api/chat",status="400"')
    before_ok = metric(server.url, "minicpm_requests_total", ok)
    before_bad = metric(server.url, "minicpm_requests_total", bad)
    tokens = metric(server.url, "minicpm_generation_tokens_total")
    client.chat(model="m", messages=QUESTION, options={**GREEDY, "num_predict": 4})
    refused(lambda: client.chat(model="m", messages=QUESTION, think=True))
    wait_for_metric(server.url, "minicpm_requests_total", lambda v: v == before_ok + 1, ok)
    wait_for_metric(server.url, "minicpm_requests_total", lambda v: v == before_bad + 1, bad)
    assert metric(server.url, "minicpm_generation_tokens_total") == tokens + 4


def test_a_client_leaving_mid_stream_cancels_the_generation(long_server) -> None:
    client = ollama.Client(host=long_server.url)
    reason = ("minicpm_requests_finished_total", 'reason="cancelled"')
    for start in (
        lambda: client.generate(
            model="m", prompt="long", raw=True, stream=True, options={"num_predict": HOLD_TOKENS, "ignore_eos": True}
        ),
        lambda: client.chat(
            model="m", messages=QUESTION, stream=True, options={"num_predict": HOLD_TOKENS, "ignore_eos": True}
        ),
    ):
        cancelled = metric(long_server.url, *reason)
        parts = start()
        assert next(parts).done is False
        parts.close()  # the client's stream closes its connection
        wait_for_metric(long_server.url, reason[0], lambda v, before=cancelled: v == before + 1, reason[1])
    assert metric(long_server.url, "minicpm_requests_running") == 0
