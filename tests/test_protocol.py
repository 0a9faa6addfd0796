"""Request models: what is judged while a body is parsed, the one budget rule, and an HTTP side
that imports without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
from pydantic import ValidationError

from minicpm_server.api.protocol import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, token_budget
from tests.harness import REPO


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 2.0}},
            "logit_bias",
        ),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": "hi"}], "modalities": ["audio"]},
            "modalities",
        ),
        (CompletionRequest, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
        (CompletionRequest, {"prompt": "hi", "best_of": 3}, "best_of"),
    ],
)
def test_unsupported_fields_fail_while_parsing(model, body, param: str) -> None:
    """No tokenizer, no engine: the model itself refuses, naming the field."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    (error,) = caught.value.errors()
    assert error["type"] == UNSUPPORTED and error["ctx"]["param"] == param
    assert error["msg"].startswith(f"'{param}': ")


def test_token_budget_takes_the_first_field_sent() -> None:
    given = [("max_completion_tokens", None), ("max_tokens", 7)]
    assert token_budget(10, 100, given, "max_tokens") == (7, "max_tokens")
    assert token_budget(10, 100, [("max_tokens", None)], "max_tokens") == (90, "max_tokens")
    assert token_budget(10, 100, [("max_tokens", None)], "max_tokens", default=16) == (16, "max_tokens")
    # A prompt that fills the window still asks for one token: the engine's check then names it.
    assert token_budget(100, 100, [], "max_length") == (1, "max_length")


def test_unsupported_field_is_a_400_naming_it(server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 3}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "n" and error["code"] == UNSUPPORTED and "n=1" in error["message"]


def test_unknown_field_hint_comes_from_the_routes_own_model(server) -> None:
    """The "did you mean" list is the matched route's body model, on every endpoint."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_token": 3}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert "did you mean 'max_tokens'?" in r.json()["error"]["message"]
    r = requests.post(server.url + "/v1/completions", json={"prompt": "hi", "ecko": True}, timeout=30)
    assert "did you mean 'echo'?" in r.json()["error"]["message"]


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from minicpm_server.api.app import create_app
from minicpm_server.settings import Settings
app = create_app(Settings(model_path="/nonexistent"))
assert ("POST", "/") in app.state.tutorial_endpoints
print("imported")
"""


def test_http_side_imports_without_torch() -> None:
    """The app is built without torch or transformers: only loading the model needs them."""
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout
