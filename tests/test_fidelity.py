"""The loaded model computes MiniCPM's forward pass, and the server decodes it as model.chat would."""

from __future__ import annotations

import pytest
import requests
import torch

from minicpm_server.model.checkpoint import load_checkpoint
from tests import reference

PROMPTS = ["你好，山东省最高的山是哪座山?", "what is the river city", "x"]


@pytest.mark.parametrize("fixture", ["tiny_dir", "gqa_dir"])
def test_logits_match_independent_reference(request: pytest.FixtureRequest, fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    loaded = load_checkpoint(path, device="cpu", dtype="float32")
    config, state = reference.load_raw(path)
    if fixture == "gqa_dir":
        assert config["num_key_value_heads"] < config["num_attention_heads"]
    sp = reference.sentencepiece_of(path)
    for prompt in PROMPTS:
        ids = reference.encode(sp, reference.chat_prompt(prompt))
        with torch.inference_mode():
            ours = loaded.model(torch.tensor([ids])).logits[0]
        theirs = reference.logits(config, state, ids)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def reference_greedy(tiny_dir):
    config, state = reference.load_raw(tiny_dir)
    sp = reference.sentencepiece_of(tiny_dir)

    def run(prompt: str, new_tokens: int) -> tuple[int, str]:
        ids = reference.encode(sp, reference.chat_prompt(prompt))
        generated = reference.greedy(config, state, ids, new_tokens, repetition_penalty=1.02)
        return len(ids), reference.clean(sp, generated, config["eos_token_id"])

    return run


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_post_equals_reference_decoding(server, reference_greedy, prompt: str) -> None:
    prompt_tokens, expected = reference_greedy(prompt, 24)
    by_new_tokens = requests.post(server.url, json={"prompt": prompt, "max_new_tokens": 24, "do_sample": False})
    # max_length counts the prompt, as in model.chat: the same 24 new tokens.
    by_length = requests.post(server.url, json={"prompt": prompt, "max_length": prompt_tokens + 24, "temperature": 0})
    assert by_new_tokens.status_code == 200, by_new_tokens.text
    assert by_new_tokens.json()["response"] == expected
    assert by_length.json()["response"] == expected
