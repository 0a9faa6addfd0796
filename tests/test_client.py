"""client.py as a newcomer runs it: long chats, pipes, no server, and the tutorial's get_completion()."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

import client
from tests.harness import REPO, SMALL_WINDOW, free_port, long_question


def run_client(*args: str, stdin: str = "", stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    for name in ("MINICPM_API_KEY", "MINICPM_URL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, str(REPO / "client.py"), *args],
        input=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,  # only stops a broken client from hanging the suite
        env=env,
        cwd=REPO,
    )


def test_question_lengths_overflow_the_small_window(small_server) -> None:
    """The premise of the tests below: three questions alone are more than the window holds."""
    body = {"prompt": long_question(1), "max_tokens": 1}
    usage = requests.post(small_server.url + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert usage["prompt_tokens"] * 3 > SMALL_WINDOW


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_long_chat_drops_the_oldest_turns_instead_of_failing(small_server, stream: bool) -> None:
    # No budget flags: what a newcomer types. The old default (512 new tokens) failed every turn here.
    stdin = "".join(long_question(n) + "\n" for n in range(1, 5))
    out = run_client("--url", small_server.url, *(["--stream"] if stream else []), stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("MiniCPM> ") == 4
    assert "error" not in out.stderr
    notices = out.stderr.splitlines()
    assert notices, "nothing was dropped: the conversation should have outgrown the window"
    for line in notices:
        assert line in (
            f"(dropped the oldest turn to fit the {SMALL_WINDOW}-token context window)",
            *(f"(dropped the {n} oldest turns to fit the {SMALL_WINDOW}-token context window)" for n in (2, 3)),
        )
    # What the model saw last: the newest question, without the first ones.
    last = small_server.log_lines("QUESTION-4")[-1]
    assert "<用户>QUESTION-4 " in last and "QUESTION-1 " not in last


def test_chat_shows_the_servers_message_when_even_the_question_cannot_fit(small_server) -> None:
    # An explicit budget larger than the window: dropping turns cannot help, so the server's message is
    # shown, and the chat goes on to the next question.
    out = run_client("--url", small_server.url, "--max-new-tokens", "300", stdin="short one\nshort two\n")
    assert out.returncode == 0
    assert out.stderr.count("error: server answered 400: max_new_tokens is too large") == 2
    assert "MiniCPM> " not in out.stdout


def test_one_question_with_default_budget_fits_a_small_window(small_server) -> None:
    # The old default max_length of 512 was larger than this window: 400 before any answer.
    out = run_client("--url", small_server.url, "hello")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


@pytest.mark.parametrize(
    "args",
    [["--max-new-tokens", "5", "hello"], ["--stream", "--max-new-tokens", "5", "hello"], ["--max-new-tokens", "5"]],
    ids=["one-question", "stream", "chat"],
)
def test_reader_that_went_away_ends_quietly(server, args: list[str]) -> None:
    """`python client.py ... | head -1`: the reader closes the pipe; no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: every write the client makes meets a closed pipe, on any machine
    try:
        out = run_client("--url", server.url, *args, stdin="hello\n", stdout=write_end)
    finally:
        os.close(write_end)
    assert out.returncode == 0
    assert out.stderr == ""


@pytest.mark.parametrize("args", [[], ["hello"], ["--stream", "hello"]], ids=["chat", "one-question", "stream"])
def test_no_server_is_one_clear_line(args: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = run_client("--url", url, *args, stdin="hello\n")
    assert out.returncode == 1
    assert out.stderr == f"error: cannot reach the server at {url} (is `python api.py` running?)\n"
    assert out.stdout == ""


def test_get_completion_sends_the_tutorials_request(monkeypatch) -> None:
    """The tutorial's function, unchanged: {"prompt", "max_length": 512} as a JSON string, answer's "response"."""
    sent = {}

    class Answer:
        status_code = 200

        @staticmethod
        def json() -> dict:
            return {"response": "泰山", "status": 200, "time": "2026-11-25 10:30:00"}

    def post(url, headers=None, data=None, timeout=None):
        sent.update(url=url, headers=headers, data=data)
        return Answer()

    monkeypatch.setattr(client.requests, "post", post)
    assert client.get_completion("山东省最高的山是哪座山？") == "泰山"
    assert sent["url"] == "http://127.0.0.1:6006"
    assert sent["headers"] == {"Content-Type": "application/json"}
    assert json.loads(sent["data"]) == {"prompt": "山东省最高的山是哪座山？", "max_length": 512}


def test_get_completion_errors_carry_the_servers_code(server) -> None:
    with pytest.raises(RuntimeError) as raised:
        client.get_completion("hi", url=server.url, max_length=100_000)
    assert isinstance(raised.value, client.ServerError)
    assert raised.value.status == 400 and raised.value.code == "context_length_exceeded"
    assert str(raised.value).startswith("server answered 400: ")


def test_conversation_api_trims_history(small_server, capsys) -> None:
    chat = client.Conversation(small_server.url, max_new_tokens=8, window=SMALL_WINDOW)
    for n in range(1, 5):
        chat.ask(long_question(n))
    assert [m["content"] for m in chat.history if m["role"] == "user"][-1] == long_question(4)
    assert long_question(1) not in [m["content"] for m in chat.history]
    assert f"to fit the {SMALL_WINDOW}-token context window" in capsys.readouterr().err
