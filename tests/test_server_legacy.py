"""POST / and /health on a real server, driven the way the tutorial's users drive it."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import requests

import client
from tests.harness import HOLD_TOKENS, long_generation, wait_for_metric

QUESTION = "山东省最高的山是哪座山, 它比黄山高还是矮？差距多少？"
TIME_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


def test_tutorial_curl_command(server) -> None:
    # The tutorial's exact command shape (plus a length cap so the random model stops soon).
    body = json.dumps({"prompt": QUESTION, "max_length": 100}, ensure_ascii=False)
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", server.url, "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(out.stdout)
    assert set(answer) == {"response", "status", "time"}
    assert isinstance(answer["response"], str)
    assert answer["status"] == 200
    assert TIME_FORMAT.match(answer["time"])


def test_tutorial_requests_client(server) -> None:
    # client.get_completion is the tutorial's function: requests, data=json.dumps, max_length 512.
    text = client.get_completion(QUESTION, url=server.url, max_length=120)
    assert isinstance(text, str)
    assert "<AI>" not in text and "<用户>" not in text


def post_lines(server, at_least: int = 0) -> list[tuple[int, int]]:
    """(prompt_tokens, completion_tokens) of each successful POST / in the server's log."""
    lines = server.log_lines("POST / status=200 prompt_tokens=", at_least) if at_least else server.log().splitlines()
    found = [re.search(r"POST / status=200 prompt_tokens=(\d+) completion_tokens=(\d+)", line) for line in lines]
    return [(int(m.group(1)), int(m.group(2))) for m in found if m]


@pytest.fixture(scope="module")
def cli_server(start_server, tiny_dir):
    """A server of their own for the CLI tests, which read its log: no other test's line lands in it."""
    return start_server("--model-path", tiny_dir, "--device", "cpu")


def test_client_cli_one_question(cli_server) -> None:
    server = cli_server
    before = len(post_lines(server))
    out = subprocess.run(
        ["python", "client.py", "--url", server.url, "--max-length", "80", "hello"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and "error" not in out.stdout.lower()
    [(prompt_tokens, completion_tokens)] = post_lines(server, at_least=before + 1)[before:]
    assert prompt_tokens + completion_tokens <= 80  # --max-length counts the prompt, as in model.chat


def test_client_interactive_mode_sends_history(cli_server) -> None:
    server = cli_server
    before = len(post_lines(server))
    proc = subprocess.run(
        ["python", "client.py", "--url", server.url, "--max-new-tokens", "40"],
        input="first question\nsecond question\n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("MiniCPM>") == 2
    (first_prompt, first_answer), (second_prompt, _) = post_lines(server, at_least=before + 2)[-2:]
    # The second prompt carries the first turn (question and answer) as history.
    assert second_prompt > first_prompt + first_answer // 2


def test_history_changes_the_prompt(server) -> None:
    base = {"prompt": "and then?", "max_new_tokens": 12, "do_sample": False}
    alone = requests.post(server.url, json=base).json()["response"]
    history = [{"role": "user", "content": "tell me about rivers"}, {"role": "assistant", "content": "rivers flow"}]
    with_history = requests.post(server.url, json={**base, "history": history})
    assert with_history.status_code == 200
    assert with_history.json()["response"] != alone


def test_same_seed_same_answer(server) -> None:
    body = {"prompt": QUESTION, "max_new_tokens": 20, "seed": 1234, "temperature": 1.0}
    first = requests.post(server.url, json=body).json()["response"]
    assert requests.post(server.url, json=body).json()["response"] == first


BAD_REQUESTS = [
    ("not json", b"{prompt", None),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', None),
    ("array body", b"[1, 2]", None),
    ("string body", b'"hello"', None),
    ("null body", b"null", None),
    ("missing prompt", {}, "prompt"),
    ("numeric prompt", {"prompt": 5}, "prompt"),
    ("null prompt", {"prompt": None}, "prompt"),
    ("list prompt", {"prompt": ["a"]}, "prompt"),
    ("string number", {"prompt": "a", "max_new_tokens": "10"}, "max_new_tokens"),
    ("string temperature", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("string bool", {"prompt": "a", "do_sample": "yes"}, "do_sample"),
    ("negative max_new_tokens", {"prompt": "a", "max_new_tokens": -1}, "max_new_tokens"),
    ("zero max_new_tokens", {"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ("negative temperature", {"prompt": "a", "temperature": -0.1}, "temperature"),
    ("top_p above 1", {"prompt": "a", "top_p": 1.5}, "top_p"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, "top_p"),
    ("negative top_k", {"prompt": "a", "top_k": -1}, "top_k"),
    ("zero penalty", {"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ("negative seed", {"prompt": "a", "seed": -1}, "seed"),
    ("absurd max_length", {"prompt": "a", "max_length": 10**9}, "max_length"),
    ("absurd max_new_tokens", {"prompt": "a", "max_new_tokens": 10**12}, "max_new_tokens"),
    ("max_length below prompt", {"prompt": "a b c d e f", "max_length": 3}, "max_length"),
    ("history not a list", {"prompt": "a", "history": "earlier"}, "history"),
    ("history item missing content", {"prompt": "a", "history": [{"role": "user"}]}, "history.0.content"),
    ("history unknown role", {"prompt": "a", "history": [{"role": "robot", "content": "x"}]}, "history.0.role"),
    ("history pairs", {"prompt": "a", "history": [["user", "x"]]}, "history.0"),
    ("history numeric content", {"prompt": "a", "history": [{"role": "user", "content": 5}]}, "history.0.content"),
    ("misspelt field", {"prompt": "a", "temprature": 0.3}, "temprature"),
    ("NaN", b'{"prompt": "a", "temperature": NaN}', "temperature"),
    ("Infinity", b'{"prompt": "a", "top_p": Infinity}', "top_p"),
    ("lone surrogate", b'{"prompt": "\\ud800"}', "prompt"),
    ("prompt beyond the context window", {"prompt": "你好 世界 " * 1500}, "prompt"),
]


@pytest.mark.parametrize(("name", "body", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_400(server, name: str, body, param: str | None) -> None:
    if isinstance(body, bytes):
        r = requests.post(server.url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = requests.post(server.url, json=body, timeout=30)
    assert r.status_code == 400, (name, r.status_code, r.text)
    error = r.json()["error"]
    assert error["message"] and "Traceback" not in r.text
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[0] in error["message"]


def test_missing_content_type_is_explained_on_v1(server) -> None:
    """POST / reads JSON without the header (the tutorial's clients); /v1 asks for it, and says so."""
    r = requests.post(server.url + "/v1/completions", data='{"prompt": "a"}', timeout=30)  # as `curl -d` sends
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]["message"]


def test_server_keeps_serving_after_bad_input(server) -> None:
    for _, body, _ in BAD_REQUESTS[:6]:
        requests.post(server.url, data=body if isinstance(body, bytes) else json.dumps(body), timeout=30)
    r = requests.post(server.url, json={"prompt": "still there?", "max_new_tokens": 4})
    assert r.status_code == 200 and requests.get(server.url + "/health").status_code == 200


def test_unknown_route_and_method_are_json(server) -> None:
    missing = requests.get(server.url + "/nope")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = requests.put(server.url + "/", json={"prompt": "a"})
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_health_answers_during_generation(long_server) -> None:
    """The model runs on its own thread: /health answers while generations are running. A blocked
    event loop would answer only after they ended, and then report none running."""
    url, body = long_generation(long_server.url, HOLD_TOKENS, stream=True)
    streams = [requests.post(url, json=body, stream=True, timeout=300) for _ in range(4)]
    readers = [s.iter_lines() for s in streams]  # held: a dropped iterator closes its connection
    for lines in readers:
        next(lines)
    try:
        wait_for_metric(long_server.url, "minicpm_requests_running", lambda v: v == 4)
        probes = [requests.get(long_server.url + "/health", timeout=300) for _ in range(20)]
        assert [(p.status_code, p.json()["running"]) for p in probes] == [(200, 4)] * 20
    finally:
        for s in streams:
            s.close()
    wait_for_metric(long_server.url, "minicpm_requests_running", lambda v: v == 0)


def test_one_log_line_per_request_without_texts(server) -> None:
    marker = "UNIQUE-PROMPT-MARKER-1234"
    before = len(server.log_lines("POST / status=200", 0))
    requests.post(server.url, json={"prompt": marker, "max_new_tokens": 3})
    lines = server.log_lines("POST / status=200", before + 1)
    log = server.log()
    assert re.search(r"prompt_tokens=\d+ completion_tokens=\d+ duration=\d", lines[-1])
    assert marker not in log


def test_log_prompts_flag_logs_texts(start_server, tiny_dir) -> None:
    logged = start_server("--model-path", tiny_dir, "--device", "cpu", "--log-prompts")
    requests.post(logged.url, json={"prompt": "LOGGED-PROMPT-5678", "max_new_tokens": 3})
    assert logged.log_lines("LOGGED-PROMPT-5678")


def test_api_key_required_except_health(start_server, tiny_dir) -> None:
    secured = start_server("--model-path", tiny_dir, "--device", "cpu", "--api-key", "s3cret")
    assert requests.get(secured.url + "/health").status_code == 200
    missing = requests.post(secured.url, json={"prompt": "a", "max_new_tokens": 2})
    wrong = requests.post(secured.url, json={"prompt": "a"}, headers={"Authorization": "Bearer nope"})
    right = requests.post(
        secured.url, json={"prompt": "a", "max_new_tokens": 2}, headers={"Authorization": "Bearer s3cret"}
    )
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200
    answer = client.get_completion("a", url=secured.url, max_length=20, api_key="s3cret")
    assert isinstance(answer, str) and "<AI>" not in answer
    assert len(secured.log_lines("POST / status=200", 2)) == 2  # `right`, then the client with the key


# --------------------------------------------------------------------------- the tutorial's own clients


def test_tutorial_client_without_content_type(server) -> None:
    """The tutorial's requests call, as written there: a JSON string as `data`, no Content-Type."""
    r = requests.post(server.url, data=json.dumps({"prompt": "你好", "max_length": 60}))
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["response"], str) and r.json()["status"] == 200


def test_curl_dash_d_without_header(server) -> None:
    """`curl -d '{...}'` sends form encoding; POST / reads the JSON all the same."""
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", server.url, "-d", '{"prompt": "hello", "max_length": 40}'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(out.stdout)["status"] == 200, out.stdout


def test_not_json_without_content_type_is_still_a_clear_400(server) -> None:
    r = requests.post(server.url, data="prompt=hello")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    other = requests.post(server.url + "/v1/completions", data=json.dumps({"prompt": "a"}))
    assert other.status_code == 400  # the /v1 routes keep requiring a JSON content type


def test_errors_on_post_root_keep_the_contract_keys(server) -> None:
    r = requests.post(server.url, json={"prompt": 5})
    body = r.json()
    assert r.status_code == 400 and body["status"] == 400 and body["response"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"]) and body["error"]["param"] == "prompt"
    v1 = requests.post(server.url + "/v1/completions", json={"prompt": 5}).json()
    assert set(v1) == {"error"}  # OpenAI's shape stays as it is on /v1


def test_max_tokens_is_accepted_on_post_root(server) -> None:
    body = {"prompt": "a", "max_tokens": 3, "ignore_eos": True, "stop": [], "stream": True}
    lines = [json.loads(x) for x in requests.post(server.url, json=body, stream=True).iter_lines() if x]
    assert lines[-1]["done"] and lines[-1]["usage"]["completion_tokens"] <= 3
    too_many = requests.post(server.url, json={"prompt": "a", "max_tokens": 10**6})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"


def test_unknown_field_names_the_one_meant(server) -> None:
    r = requests.post(server.url, json={"prompt": "a", "max_lenght": 20})
    assert r.status_code == 400
    assert "unknown field 'max_lenght'; did you mean 'max_length'?" in r.json()["error"]["message"]


def test_log_has_generations_and_failures_not_probes(start_server, long_dir) -> None:
    server = start_server("--model-path", long_dir, "--device", "cpu")
    for _ in range(3):
        requests.get(server.url + "/health")
    assert requests.post(server.url, json={"prompt": 5}).status_code == 400
    url, body = long_generation(server.url, HOLD_TOKENS, stream=True)
    stream = requests.post(url, json=body, stream=True)
    lines = stream.iter_lines()
    next(lines)
    stream.close()
    wait_for_metric(server.url, "minicpm_requests_finished_total", lambda v: v == 1, 'reason="cancelled"')
    log = server.log()
    assert "GET /health" not in log and "GET /metrics" not in log  # probes are debug-level
    assert re.search(r"POST / status=400 duration=", log)  # no token counts for what never ran
    assert re.search(r"POST /v1/completions status=200 cancelled prompt_tokens=\d+ completion_tokens=[1-9]", log)
