"""Evaluation-grade answers: log-probabilities (chat and completions, streamed or not, echo,
token-id prompts), scoring without generating, and the tokenizer endpoints, checked against an
independent plain-torch forward pass (tests/reference.py) on both backends."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import requests
import torch
from openai import OpenAI

from minicpm_server.engine import vllm_installed
from minicpm_server.engine.native.engine import NativeEngine
from minicpm_server.engine.protocol import GenerationRequest, SamplingParams, TextDelta
from minicpm_server.model import chat
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.tokenizer import load_tokenizer
from tests import reference

NEEDS_VLLM = pytest.mark.skipif(
    not vllm_installed(), reason="vLLM is not installed here; `bash scripts/test-vllm.sh` runs these"
)
TOLERANCE = 2e-4  # float32 on both sides; different kernels, so not bit-equal


class Reference:
    """log-softmax of the plain-torch model's logits, for any token sequence."""

    def __init__(self, directory: Path) -> None:
        self.config, self.state = reference.load_raw(directory)

    def scores(self, ids: list[int]) -> list[float | None]:
        """Each token's log-probability given the tokens before it (None for the first)."""
        logp = torch.log_softmax(reference.logits(self.config, self.state, ids).double(), dim=-1)
        return [None, *(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))]

    def top1(self, ids: list[int]) -> list[int]:
        """The most likely token after each prefix."""
        return reference.logits(self.config, self.state, ids).argmax(-1).tolist()


def post(server, path: str, body: dict, expect: int = 200) -> dict:
    r = requests.post(server.url + path, json=body, timeout=300)
    assert r.status_code == expect, r.text[:500]
    return r.json()


def assert_close(got: list[float | None], want: list[float | None]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert abs(g - w) < TOLERANCE, (g, w)


def lm_eval_request(server, ids: list[int], **extra) -> dict:
    """What lm-eval sends to score a continuation: token ids, one token, echo, logprobs 1, greedy."""
    body = {"prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, **extra}
    return post(server, "/v1/completions", body)["choices"][0]


# --------------------------------------------------------------------------- the numbers


@pytest.fixture(scope="module", params=["tiny", "real-tokenizer"])
def scored(request, server, start_server, tiny_dir):
    """(server, checkpoint directory): the tiny model, and one on MiniCPM-2B's real tokenizer
    (skipped where that tokenizer is not here)."""
    if request.param == "tiny":
        return server, tiny_dir
    real_dir = request.getfixturevalue("real_dir")
    return start_server("--model-path", real_dir, "--device", "cpu"), real_dir


def test_echo_scores_equal_the_reference(scored) -> None:
    """lm-eval's loglikelihood request: every prompt token after the first, and the generated one."""
    server, directory = scored
    tokenizer = load_tokenizer(directory)
    ids = tokenizer.encode("山东省最高的山是泰山, and the river is long")[1:]  # lm-eval sends ids without BOS
    choice = lm_eval_request(server, ids, repetition_penalty=1.0)  # so the answer is the raw argmax
    scores = choice["logprobs"]["token_logprobs"]
    assert len(scores) == len(ids) + 1 and scores[0] is None
    ref = Reference(directory)
    full = [*ids, ref.top1(ids)[-1]]  # greedy: the reference's own next token
    assert_close(scores, ref.scores(full))


def test_greedy_tokens_equal_their_top_entry_exactly(scored) -> None:
    """lm-eval decides is_greedy with `!=` between a token's number and its position's best."""
    server, directory = scored
    tokenizer = load_tokenizer(directory)
    ids = tokenizer.encode("the the the the the the")[1:]
    choice = lm_eval_request(server, ids)
    ref = Reference(directory)
    best = ref.top1(ids)
    logprobs = choice["logprobs"]
    for position in range(1, len(ids)):
        top = logprobs["top_logprobs"][position]
        is_greedy = logprobs["token_logprobs"][position] == max(top.values())
        assert is_greedy == (best[position - 1] == ids[position])


def test_string_prompt_scores_with_bos(server, tiny_dir) -> None:
    """A text prompt gets BOS in front, whose score is null; the rest match the reference."""
    tokenizer = load_tokenizer(tiny_dir)
    text = "hello there, how are you"
    body = {"prompt": text, "max_tokens": 0, "logprobs": 2, "echo": True}
    choice = post(server, "/v1/completions", body)["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    ids = tokenizer.encode(text)
    assert logprobs["tokens"][0] == tokenizer.bos_token
    assert_close(logprobs["token_logprobs"], Reference(tiny_dir).scores(ids))
    assert all(len(t) <= 3 for t in logprobs["top_logprobs"][1:])  # 2 best, plus the token itself
    # text_offset indexes the choice's text: every non-BOS token starts where its text does.
    for token, offset in zip(logprobs["tokens"][1:], logprobs["text_offset"][1:], strict=True):
        assert choice["text"][offset : offset + len(token)] == token


def test_generated_logprobs_match_the_reference_and_the_stream(server, tiny_dir) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    body = {"prompt": "once upon a time", "max_tokens": 6, "logprobs": 3, "temperature": 0, "ignore_eos": True}
    whole = post(server, "/v1/completions", {**body, "repetition_penalty": 1.0})["choices"][0]
    prompt = tokenizer.encode("once upon a time")
    ref = Reference(tiny_dir)
    ids = list(prompt)
    for _ in range(6):
        ids.append(ref.top1(ids)[-1])
    assert_close([None, *whole["logprobs"]["token_logprobs"]], [None, *ref.scores(ids)[len(prompt) :]])
    streamed = requests.post(
        server.url + "/v1/completions",
        json={**body, "repetition_penalty": 1.0, "stream": True},
        stream=True,
        timeout=300,
    )
    numbers, texts = [], []
    for line in streamed.iter_lines():
        if line.startswith(b"data: {"):
            choice = json.loads(line[6:])["choices"][0]
            texts.append(choice["text"])
            if choice["logprobs"]:
                numbers.extend(choice["logprobs"]["token_logprobs"])
    # The second request reuses the first's cached prompt (all but its last token), so its numbers
    # come from other shapes of product: equal up to float rounding, not bit for bit.
    assert "".join(texts) == whole["text"]
    assert_close(numbers, whole["logprobs"]["token_logprobs"])


def test_chat_logprobs_streamed_and_not(server) -> None:
    """OpenAI's chat shape: content[] with token, logprob, bytes and top_logprobs; the same numbers
    as /v1/completions gives for the same rendered prompt, and the same streamed."""
    messages = [{"role": "user", "content": "你好"}]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    said = post(server, "/v1/chat/completions", body)["choices"][0]
    content = said["logprobs"]["content"]
    assert len(content) >= 1
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"]
    rendered = "<用户>你好<AI>"
    plain = post(server, "/v1/completions", {"prompt": rendered, "max_tokens": 5, "temperature": 0, "logprobs": 0})
    numbers = plain["choices"][0]["logprobs"]["token_logprobs"][: len(content)]
    assert_close([e["logprob"] for e in content], numbers)  # the prompt reused from the cache: rounding
    streamed = requests.post(
        server.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=300
    )
    pieces = []
    for line in streamed.iter_lines():
        if line.startswith(b"data: {"):
            choice = json.loads(line[6:])["choices"][0]
            pieces.extend((choice.get("logprobs") or {}).get("content") or [])
    assert [p["token"] for p in pieces] == [e["token"] for e in content]
    assert_close([p["logprob"] for p in pieces], [e["logprob"] for e in content])


def test_scoring_only_and_many_prompts(server) -> None:
    """max_tokens 0 with echo scores without generating; a list of prompts gives one choice each, in order."""
    ids = [[5, 6, 7, 8, 9], [10, 11, 12]]
    scored = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert [c["index"] for c in scored["choices"]] == [0, 1]
    assert scored["usage"] == {"prompt_tokens": 8, "completion_tokens": 0, "total_tokens": 8}
    for choice, prompt in zip(scored["choices"], ids, strict=True):
        alone = lm_eval_request(server, prompt)
        # batched with another prompt: the same numbers up to float32 rounding (padding changes the shapes)
        assert_close(choice["logprobs"]["token_logprobs"], alone["logprobs"]["token_logprobs"][:-1])
    texts = post(server, "/v1/completions", {"prompt": ["a b", "c d"], "max_tokens": 4, "temperature": 0})
    for choice, prompt in zip(texts["choices"], ["a b", "c d"], strict=True):
        single = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert choice["text"] == single["choices"][0]["text"]


def test_openai_sdk_reads_logprobs(server) -> None:
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    done = client.completions.create(model="m", prompt=[[5, 6, 7]], max_tokens=1, logprobs=1, echo=True, temperature=0)
    assert done.choices[0].logprobs.token_logprobs[0] is None and len(done.choices[0].logprobs.tokens) == 4
    said = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, top_logprobs=1
    )
    assert said.choices[0].logprobs.content[0].top_logprobs[0].logprob <= 0


# --------------------------------------------------------------------------- the prefix cache


def test_scores_are_the_same_with_a_cached_prefix(tiny_dir) -> None:
    """A scored prompt is computed whole even when its prefix is cached (cached blocks hold keys
    and values, not logits): the numbers equal an engine's that never cached anything."""
    loaded = load_checkpoint(tiny_dir, device="cpu", dtype="float32")
    prompt = loaded.tokenizer.encode("the river city of code " * 12)

    async def score(engine: NativeEngine, warm: bool) -> tuple[list, int]:
        engine.start()
        try:
            if warm:  # a generation over the same prompt leaves its blocks cached
                plain = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=2, do_sample=False)))
                async for _ in plain.events():
                    pass
            hits = engine.kv_stats.prefix_hit_tokens
            params = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
            events = [e async for e in engine.submit(GenerationRequest(prompt, params)).events()]
            first = next(e for e in events if isinstance(e, TextDelta))
            return [(s.token_id, s.logprob, s.top) if s else None for s in first.prompt_logprobs], (
                engine.kv_stats.prefix_hit_tokens - hits
            )
        finally:
            engine.stop()

    def engine(caching: bool) -> NativeEngine:
        return NativeEngine(loaded.model, loaded.tokenizer, context_window=1024, eos_token_id=2, prefix_caching=caching)

    cached, hits = asyncio.run(score(engine(True), warm=True))
    fresh, _ = asyncio.run(score(engine(False), warm=False))
    assert cached == fresh and hits == 0
    assert len(prompt) > 2 * 16  # long enough that whole blocks were cached


# --------------------------------------------------------------------------- bad input

USER_X = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": [], "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": [[]], "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": ["a", [1]], "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2, "x"]], "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": [[1, 2], [3, 99999999]], "max_tokens": 1}, "prompt"),
        ("/detokenize", {"tokens": [1, 99999999]}, "tokens"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ],
)
def test_bad_evaluation_input_is_a_400_naming_the_field(server, path: str, body: dict, param: str) -> None:
    r = requests.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param.split(".")[0]), error
    assert requests.get(server.url + "/health", timeout=30).status_code == 200


def test_out_of_range_token_names_its_position(server) -> None:
    error = post(server, "/v1/completions", {"prompt": [[1, 2], [3, 99999999]], "max_tokens": 1}, 400)["error"]
    assert "prompt[1][1]" in error["message"] and "99999999" in error["message"]


# --------------------------------------------------------------------------- tokenizer endpoints


def test_tokenize_detokenize_and_info(server, tiny_dir) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    text = "hello there 你好"
    got = post(server, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert got["tokens"] == tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["token_strs"] == [tokenizer.token_text(i) for i in got["tokens"]]
    assert post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"] == got["tokens"][1:]
    # lm-eval's remote tokenizer takes EOS and BOS from the control tokens' names.
    assert post(server, "/tokenize", {"prompt": "</s>", "add_special_tokens": False})["tokens"] == [2]
    assert post(server, "/tokenize", {"prompt": "<s>", "add_special_tokens": False})["tokens"] == [1]
    messages = [{"role": "user", "content": "hi </s> there"}]
    rendered = post(server, "/tokenize", {"messages": messages})
    assert rendered["tokens"] == tokenizer.encode(chat.render_chat(tokenizer, messages))
    assert 2 not in rendered["tokens"]  # in a chat, "</s>" is text, never the end of the sequence
    said = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert said["usage"]["prompt_tokens"] == rendered["count"]
    assert post(server, "/detokenize", {"tokens": got["tokens"]})["prompt"] == text
    info = requests.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["eos_token_id"] == 2
    assert info["model_max_length"] == got["max_model_len"] and "<用户>" in info["chat_template"]


def test_real_tokenizer_ids_are_sentencepieces(start_server, real_dir) -> None:
    import sentencepiece

    server = start_server("--model-path", real_dir, "--device", "cpu")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(real_dir / "tokenizer.model"))
    for text in ["山东省最高的山是哪座山？", "<用户>你好<AI>", "\n\tx = 1", "𝔘 rare"]:
        got = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
        assert got == sp.encode(text)
        assert post(server, "/detokenize", {"tokens": got})["prompt"] == text
    server.stop()


def test_tokenizer_endpoints_need_the_key(start_server, tiny_dir) -> None:
    server = start_server("--model-path", tiny_dir, "--device", "cpu", "--api-key", "sekrit")
    for method, path, body in [
        ("post", "/tokenize", {"prompt": "a"}),
        ("post", "/detokenize", {"tokens": [5]}),
        ("get", "/tokenizer_info", None),
    ]:
        r = requests.request(method, server.url + path, json=body, timeout=30)
        assert r.status_code == 401
        r = requests.request(
            method, server.url + path, json=body, timeout=30, headers={"Authorization": "Bearer sekrit"}
        )
        assert r.status_code == 200
    server.stop()


# --------------------------------------------------------------------------- the vLLM backend


@pytest.mark.vllm
@NEEDS_VLLM
def test_vllm_logprobs_agree_with_native(vllm_and_native, tiny_dir) -> None:
    """vLLM's logprobs and prompt logprobs, mapped to our tokens, equal the native engine's."""
    vllm, native = vllm_and_native
    ids = [5, 6, 7, 8, 9, 10, 11]
    body = {"prompt": [ids], "max_tokens": 3, "logprobs": 2, "echo": True, "temperature": 0}
    a = post(vllm, "/v1/completions", body)["choices"][0]
    b = post(native, "/v1/completions", body)["choices"][0]
    assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
    assert_close(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"])
    for x, y in zip(a["logprobs"]["top_logprobs"][1:], b["logprobs"]["top_logprobs"][1:], strict=True):
        assert set(x) == set(y)
    scored = {"prompt": [ids], "max_tokens": 0, "logprobs": 1, "echo": True}
    assert_close(
        post(vllm, "/v1/completions", scored)["choices"][0]["logprobs"]["token_logprobs"],
        Reference(tiny_dir).scores(ids),
    )
    chat_body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "temperature": 0,
        "logprobs": True,
    }
    x = post(vllm, "/v1/chat/completions", chat_body)["choices"][0]["logprobs"]["content"]
    y = post(native, "/v1/chat/completions", chat_body)["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in x] == [e["token"] for e in y]
    assert_close([e["logprob"] for e in x], [e["logprob"] for e in y])
