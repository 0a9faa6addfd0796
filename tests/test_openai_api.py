"""The OpenAI-compatible API through the official openai SDK and raw HTTP, on a real server."""

from __future__ import annotations

import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

import client
from minicpm_server.model import chat
from minicpm_server.model.checkpoint import inspect_checkpoint, load_tokenizer
from tests.harness import HOLD_TOKENS, long_generation, metric, wait_for_metric


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy_chat(sdk, content: str, n: int = 20, **extra):
    return sdk.chat.completions.create(
        model="minicpm",
        messages=[{"role": "user", "content": content}],
        max_tokens=n,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )


def test_models_list(sdk) -> None:
    assert [m.id for m in sdk.models.list()] == ["MiniCPM-tiny"]  # the checkpoint directory's name


def test_chat_completion_non_stream(sdk, tiny_dir) -> None:
    r = greedy_chat(sdk, "你好", 12)
    assert r.object == "chat.completion" and r.model == "MiniCPM-tiny"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    tokenizer = load_tokenizer(inspect_checkpoint(tiny_dir))
    assert r.usage.prompt_tokens == len(tokenizer.encode("<用户>你好<AI>"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stream_matches_non_stream_and_reports_usage(sdk) -> None:
    expected = greedy_chat(sdk, "tell me about rivers", 25)
    stream = sdk.chat.completions.create(
        model="minicpm",
        messages=[{"role": "user", "content": "tell me about rivers"}],
        max_tokens=25,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    assert "".join(pieces) == expected.choices[0].message.content
    assert reasons[-1] == expected.choices[0].finish_reason and all(r is None for r in reasons[:-1])
    assert usage is not None and usage.completion_tokens == expected.usage.completion_tokens


def test_raw_sse_ends_with_done(server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_max_completion_tokens_and_finish_length(sdk) -> None:
    r = sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "a"}],
        max_completion_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True, "stop": []},
    )
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_completions_raw_prompt(sdk, tiny_dir) -> None:
    r = sdk.completions.create(model="m", prompt="hello world", temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.completion_tokens == 16  # OpenAI's default max_tokens
    tokenizer = load_tokenizer(inspect_checkpoint(tiny_dir))
    assert r.usage.prompt_tokens == len(tokenizer.encode("hello world"))  # no chat template
    chunks = list(
        sdk.completions.create(
            model="m", prompt="hello world", temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_system_message_is_plain_text_before_the_turn(sdk, server, tiny_dir) -> None:
    """MiniCPM has no system role: the system message is plain text, then the <用户> turn. The server's
    prompt is exactly that text: as many tokens, and the same greedy answer as the text sent raw."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    tokenizer = load_tokenizer(inspect_checkpoint(tiny_dir))
    text = chat.render_chat(tokenizer, messages)
    assert text == "Be brief.<用户>hi<AI>"
    r = sdk.chat.completions.create(
        model="m", messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.prompt_tokens == len(tokenizer.encode(text))
    # /v1/completions applies no template; a chat answer ends at the model's next turn marker.
    body = {"prompt": text, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stop": list(chat.TURN_MARKERS)}
    raw = requests.post(server.url + "/v1/completions", json=body, timeout=120).json()
    assert raw["usage"]["prompt_tokens"] == r.usage.prompt_tokens
    assert r.choices[0].message.content == raw["choices"][0]["text"]
    assert r.choices[0].finish_reason == raw["choices"][0]["finish_reason"]


def test_stop_strings(sdk) -> None:
    full = greedy_chat(sdk, "stop test", 30).choices[0].message.content
    stop = full[8:11]
    cut = greedy_chat(sdk, "stop test", 30, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_same_seed_same_answer(sdk) -> None:
    def ask():
        return (
            sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "seeded"}], max_tokens=20, seed=42, temperature=1.0
            )
            .choices[0]
            .message.content
        )

    assert ask() == ask()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # "auto": no tool format
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"response_format": {"type": "json_schema"}}, "response_format"),  # without the schema
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
        ),
        ({"stop": ["s"] * 1000}, "stop"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_unsupported_or_bad_requests_raise_bad_request(sdk, extra: dict, param: str) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 3}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            **{k: v for k, v in {**base, **extra}.items() if k in ("model", "messages")},
            extra_body={k: v for k, v in {**base, **extra}.items() if k not in ("model", "messages")},
        )
    assert info.value.body["param"].startswith(param.split(".")[0]), info.value.body


def test_parallel_requests_are_batched_and_correct(server, sdk) -> None:
    prompts = [f"question number {i} about mountains" for i in range(16)]
    alone = {p: greedy_chat(sdk, p, 16).choices[0].message.content for p in prompts[:4]}
    steps_before = metric(server.url, "minicpm_generation_tokens_total")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: greedy_chat(sdk, p, 16), prompts))
    assert all(r.usage.completion_tokens == 16 for r in together)
    for p, r in zip(prompts[:4], together[:4], strict=True):
        assert r.choices[0].message.content == alone[p]  # float32: batching changes nothing
    assert metric(server.url, "minicpm_generation_tokens_total") - steps_before == 16 * 16


def test_abandoned_streams_free_their_slots(long_server) -> None:
    server = long_server
    url, body = long_generation(server.url, HOLD_TOKENS, stream=True)
    cancelled = metric(server.url, "minicpm_requests_finished_total", 'reason="cancelled"')
    finished_by_length = metric(server.url, "minicpm_requests_finished_total", 'reason="length"')
    responses = [requests.post(url, json=body, stream=True) for _ in range(6)]
    readers = [r.iter_lines() for r in responses]  # held: a dropped iterator closes its connection
    for lines in readers:
        next(lines)
    assert metric(server.url, "minicpm_requests_running") == 6
    for r in responses:
        r.close()
    wait_for_metric(server.url, "minicpm_requests_running", lambda v: v == 0)
    # Freed by cancellation, not by running to the end of their tokens.
    assert metric(server.url, "minicpm_requests_finished_total", 'reason="cancelled"') == cancelled + 6
    assert metric(server.url, "minicpm_requests_finished_total", 'reason="length"') == finished_by_length


def test_disconnected_non_stream_request_is_cancelled(long_server) -> None:
    server = long_server
    body = json.dumps(long_generation(server.url, HOLD_TOKENS)[1]).encode()
    host, port = server.url.removeprefix("http://").split(":")
    cancelled = metric(server.url, "minicpm_requests_finished_total", 'reason="cancelled"')
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    wait_for_metric(server.url, "minicpm_requests_running", lambda v: v >= 1)
    sock.close()
    wait_for_metric(server.url, "minicpm_requests_finished_total", lambda v: v == cancelled + 1, 'reason="cancelled"')
    assert metric(server.url, "minicpm_requests_running") == 0


def test_chinese_stream_has_no_replacement_characters(server) -> None:
    """With a seed whose full answer is clean UTF-8, no streamed chunk carries a broken character."""
    for seed in range(60):
        body = {"prompt": "请用中文回答：泰山有多高？", "max_new_tokens": 30, "seed": seed, "temperature": 1.0}
        full = requests.post(server.url, json=body).json()["response"]
        if "\ufffd" not in full and re.search(r"[\u4e00-\u9fff]", full):
            break
    else:
        pytest.fail("no seed gave a clean Chinese answer")
    with requests.post(server.url, json={**body, "stream": True}, stream=True) as r:
        lines = [json.loads(line) for line in r.iter_lines(decode_unicode=True) if line]
    chunks = [line["response"] for line in lines]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == full and lines[-1]["done"] is True


def test_metrics_exposed(server, sdk) -> None:
    greedy_chat(sdk, "metrics", 3)
    text = requests.get(server.url + "/metrics").text
    for name in (
        "minicpm_requests_running",
        "minicpm_requests_waiting",
        "minicpm_prompt_tokens_total",
        "minicpm_generation_tokens_total",
        "minicpm_time_to_first_token_seconds_bucket",
        "minicpm_request_latency_seconds_bucket",
    ):
        assert name in text
    assert 'minicpm_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    requests.get(server.url + "/no/such/path/12345")
    requests.get(server.url + "/v1/models")
    text = requests.get(server.url + "/metrics").text
    # Labelled by the matched route, so stray paths cannot create new series.
    assert 'minicpm_requests_total{endpoint="other",status="404"}' in text and "12345" not in text
    assert 'minicpm_requests_total{endpoint="/v1/models",status="200"}' in text


def test_queue_overflow_answers_429_without_waiting(start_server, long_dir) -> None:
    """With the batch and the queue full, the next request is refused at once: its 429 arrives
    while the queued requests are still waiting for the one that holds the only batch slot."""
    small = start_server("--model-path", long_dir, "--device", "cpu", "--max-batch", "1", "--max-queue", "2")
    url, body = long_generation(small.url, 4)
    with ThreadPoolExecutor(3) as pool:
        holder = {**body, "max_tokens": HOLD_TOKENS, "stream": True}
        stream = requests.post(url, json=holder, stream=True, timeout=300)
        assert stream.status_code == 200
        lines = stream.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)  # the stream now holds the batch's only slot
        queued = [pool.submit(requests.post, url, json=body, timeout=300) for _ in range(2)]
        wait_for_metric(small.url, "minicpm_requests_waiting", lambda v: v == 2)
        refused = requests.post(url, json=body, timeout=300)
        still_queued = [not f.done() for f in queued]
        stream.close()  # cancels the running generation; the queued ones then run
        results = [f.result() for f in queued]
    assert refused.status_code == 429, refused.text[:200]
    assert refused.headers.get("Retry-After") and refused.json()["error"]["code"] == "queue_full"
    assert still_queued == [True, True]
    assert [r.status_code for r in results] == [200, 200]


def test_client_stream_flag(server, monkeypatch, capsys) -> None:
    """`client.py --stream` asks for the NDJSON stream, prints the answer as its pieces arrive (more
    than one), and the pieces make the answer the same request gets without streaming. The spy on
    requests.post makes both greedy: the client sends the server's default sampling, a new draw each time."""
    real_post = requests.post
    sent: list[tuple[dict, bool]] = []
    chunks: list[dict] = []

    def post(url: str, data: str, **kwargs) -> requests.Response:
        body = {**json.loads(data), "do_sample": False}
        sent.append((body, kwargs.get("stream", False)))
        response = real_post(url, data=json.dumps(body), **kwargs)
        read = response.iter_lines

        def iter_lines(*args, **iter_kwargs):
            for line in read(*args, **iter_kwargs):
                if line:
                    chunks.append(json.loads(line))
                yield line

        response.iter_lines = iter_lines
        return response

    monkeypatch.setattr(requests, "post", post)
    assert client.main(["--url", server.url, "--stream", "--max-length", "60", "hi"]) == 0
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert [(body["stream"], stream) for body, stream in sent] == [(True, True)]
    pieces = [c["response"] for c in chunks if c["response"]]
    assert len(pieces) > 1 and chunks[-1]["done"]
    whole = requests.post(server.url, json={"prompt": "hi", "max_length": 60, "do_sample": False}, timeout=120)
    assert printed == "".join(pieces) + "\n" == whole.json()["response"] + "\n"


def test_harmless_openai_fields_are_accepted(sdk) -> None:
    """What Open WebUI, LangChain and others send and cannot change the answer: accepted, like vLLM."""
    r = sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        metadata={"app": "test"},
        store=False,
        service_tier="auto",
        reasoning_effort="low",
        modalities=["text"],
        tool_choice="none",
        parallel_tool_calls=False,
        user="someone",
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_min_p_and_openai_penalties_change_the_answer(server) -> None:
    def complete(**extra) -> str:
        body = {"prompt": "penalties", "max_tokens": 24, "temperature": 0, "ignore_eos": True, **extra}
        r = requests.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    plain = complete()
    assert complete(frequency_penalty=2.0, presence_penalty=2.0) != plain  # greedy: the penalties made the difference
    # min_p 1.0 keeps only the top token: sampling at any temperature gives the greedy answer.
    assert complete(temperature=1.5, top_p=1.0, min_p=1.0, seed=3) == plain


def test_retrieve_model(sdk, server) -> None:
    name = sdk.models.list().data[0].id
    assert sdk.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found"
