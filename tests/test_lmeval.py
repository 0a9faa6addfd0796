"""lm-evaluation-harness against a running server, checked number by number.

lm-eval (its own venv; scripts/test-lmeval.sh makes it and sets MINICPM_LMEVAL_BIN) runs the local
tasks in tests/lmeval/tasks through `local-completions` with the server's own tokenizer over HTTP,
and through `local-chat-completions`. Each multiple-choice sample's log-likelihoods and is_greedy
flags must match tests/reference.py's forward pass on the very token ids lm-eval sent; each
generation must match the server's own greedy answer to the same prompt. tests/lmeval/PROTOCOL.md
says what lm-eval sends and reads.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from minicpm_server.model.tokenizer import load_tokenizer
from tests.harness import REPO
from tests.reference import load_raw, logits

LMEVAL_BIN = os.environ.get("MINICPM_LMEVAL_BIN")
pytestmark = [
    pytest.mark.lmeval,
    pytest.mark.skipif(not LMEVAL_BIN, reason="MINICPM_LMEVAL_BIN is not set (bash scripts/test-lmeval.sh sets it)"),
]

TASKS_DIR = "tests/lmeval/tasks"  # relative to REPO, where lm_eval runs: the task files name their data so
MC_TASK = "minicpm_lmeval_mc"
GEN_TASK = "minicpm_lmeval_gen"
LMEVAL_TIMEOUT = 900  # seconds per lm_eval run; a few seconds on the tiny model, but the CI machine is shared
TOLERANCE = 1e-3  # nats, on a continuation's summed log-probability


@pytest.fixture(scope="module", params=["tiny", "real-tokenizer"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    """The tiny checkpoint, and where MINICPM_REAL_TOKENIZER is set, one on MiniCPM-2B's real tokenizer."""
    return request.getfixturevalue("tiny_dir" if request.param == "tiny" else "real_dir")


@pytest.fixture(scope="module")
def lm_server(start_server, checkpoint: Path):
    return start_server("--model-path", checkpoint, "--device", "cpu")


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return load_raw(checkpoint)


def served_model(base_url: str) -> str:
    return requests.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"]


def run_lmeval(
    out: Path, model: str, model_args: dict[str, Any], tasks: list[str], *extra: str
) -> dict[str, list[dict]]:
    """Run lm_eval as a program; the samples it logged, per task. No hub access: local tasks only."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # were anything to try the hub after all, it fails at once
        "HF_DATASETS_CACHE": str(out / "hf-datasets"),  # the jsonl files' Arrow copies, away from ~/.cache
        "OPENAI_API_KEY": "",
    }
    cmd = [
        str(LMEVAL_BIN),
        "run",
        "--model",
        model,
        "--model_args",
        ",".join(f"{k}={v}" for k, v in model_args.items()),
        "--tasks",
        ",".join(tasks),
        "--include_path",
        TASKS_DIR,
        "--log_samples",
        "--output_path",
        str(out / "results"),
        "--batch_size",
        "1",
        *extra,
    ]
    done = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LMEVAL_TIMEOUT, stdin=subprocess.DEVNULL
    )
    output = done.stdout + done.stderr
    (out / "lm_eval.log").write_text(output)
    assert done.returncode == 0, f"lm_eval exited with {done.returncode}:\n{output[-4000:]}"
    # A request that failed and then succeeded on a retry is a bug too.
    assert "API request failed" not in output, output[-4000:]
    samples = {}
    for task in tasks:
        files = sorted((out / "results").rglob(f"samples_{task}_*.jsonl"))
        assert len(files) == 1, f"expected one samples file for {task}, found {files}:\n{output[-2000:]}"
        samples[task] = sorted(
            (json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines() if line.strip()),
            key=lambda s: s["doc_id"],
        )
    return samples


def completions_args(base_url: str, checkpoint: Path) -> dict[str, Any]:
    """`local-completions` on the server's tokenizer (GET /tokenizer_info, POST /tokenize) with
    token-id prompts; max_length is the server's window, which lm-eval has no way to ask for."""
    window = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    return {
        "base_url": base_url + "/v1/completions",
        "model": served_model(base_url),
        "tokenizer_backend": "remote",
        "tokenized_requests": True,
        "max_length": window,
        "num_concurrent": 1,
        "max_retries": 1,
    }


@pytest.fixture(scope="module")
def completion_samples(lm_server, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("lmeval-completions")
    return run_lmeval(out, "local-completions", completions_args(lm_server.url, checkpoint), [MC_TASK, GEN_TASK])


class RemoteTokens:
    """The ids lm-eval's remote tokenizer gets: POST /tokenize, add_special_tokens false."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.info = requests.get(base_url + "/tokenizer_info", timeout=30).json()

    def __call__(self, text: str) -> list[int]:
        body = {"prompt": text, "add_special_tokens": False}
        answer = requests.post(self.base_url + "/tokenize", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["tokens"]

    def prefix_token_id(self) -> int:
        """What lm-eval puts before a continuation whose context is empty: the first id of
        /tokenize(bos_token), or failing that of /tokenize(eos_token) (`bos or eos`, as it writes it)."""
        bos = self(self.info["bos_token"])[0] if self.info.get("bos_token") is not None else None
        eos = self(self.info["eos_token"])[0] if self.info.get("eos_token") is not None else None
        return bos or eos

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split of a loglikelihood request into context and continuation ids."""
        if context == "":
            continuation_ids = self(continuation)
            prefix = self.prefix_token_id()
            if prefix != continuation_ids[0]:
                return [prefix], continuation_ids
            return continuation_ids[:1], continuation_ids[1:]
        spaces = len(context) - len(context.rstrip())
        if spaces:  # trailing whitespace moves to the continuation
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = self(context + continuation), self(context)
        return context_ids, whole[len(context_ids) :]


def reference_score(model: tuple[dict, dict[str, torch.Tensor]], context: list[int], continuation: list[int]):
    """(sum of the continuation's log-probabilities, whether each of its tokens is the argmax)."""
    ids = context + continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(logits(*model, ids).double(), dim=-1)
    positions = range(len(context), len(ids))
    total = sum(logprobs[i - 1, ids[i]].item() for i in positions)
    greedy = all(int(logprobs[i - 1].argmax()) == ids[i] for i in positions)
    return total, greedy


def request_args(sample: dict) -> list[dict]:
    """A sample's requests' arguments, in order: lm-eval logs them as gen_args_0.. / arg_0.."""
    args = sample["arguments"]
    return [args[f"gen_args_{i}"] for i in range(len(args))]


def test_lmeval_multiple_choice_matches_reference(lm_server, completion_samples, reference) -> None:
    tokens = RemoteTokens(lm_server.url)
    samples = completion_samples[MC_TASK]
    docs = [json.loads(line) for line in (REPO / "tests/lmeval/data/mc.jsonl").read_text("utf-8").splitlines()]
    assert len(samples) == len(docs)
    for sample in samples:
        args = request_args(sample)
        assert len(args) == len(sample["doc"]["choices"]) == len(sample["resps"])
        for arg, resp in zip(args, sample["resps"], strict=True):
            context, continuation = arg["arg_0"], arg["arg_1"]
            logged_ll, logged_greedy = resp[0]  # lm-eval logs them as strings: ["-12.3", "False"]
            context_ids, continuation_ids = tokens.encode_pair(context, continuation)
            assert context_ids and continuation_ids, (context, continuation)
            want_ll, want_greedy = reference_score(reference, context_ids, continuation_ids)
            where = f"doc {sample['doc_id']}, {context!r} + {continuation!r}"
            assert abs(float(logged_ll) - want_ll) < TOLERANCE, f"{where}: lm-eval {logged_ll}, reference {want_ll}"
            assert logged_greedy == str(want_greedy), f"{where}: is_greedy {logged_greedy}, reference {want_greedy}"


def test_lmeval_remote_tokenizer_matches_checkpoint(lm_server, checkpoint: Path, completion_samples) -> None:
    """/tokenize without special tokens is the checkpoint's tokenizer less its BOS, for every
    string lm-eval tokenized; and the BOS/EOS ids lm-eval derives from /tokenizer_info's strings
    (the first id /tokenize gives for each) are the real ones."""
    tokens, ours = RemoteTokens(lm_server.url), load_tokenizer(checkpoint)
    texts = []
    for sample in completion_samples[MC_TASK]:
        for arg in request_args(sample):
            texts += [arg["arg_0"], arg["arg_0"] + arg["arg_1"]] if arg["arg_0"] else [arg["arg_1"]]
    texts += [request_args(sample)[0]["arg_0"] for sample in completion_samples[GEN_TASK]]
    for text in texts:
        assert tokens(text) == ours.encode(text)[1:], text
    assert tokens.info["bos_token"] == ours.bos_token and tokens.info["eos_token"] == ours.eos_token
    assert tokens(ours.bos_token)[0] == ours.bos_token_id, "lm-eval's prefix token for an empty context"
    assert tokens(ours.eos_token)[0] == ours.eos_token_id, "lm-eval's eot_token_id"


def test_lmeval_generation_matches_server_greedy(lm_server, completion_samples) -> None:
    tokens = RemoteTokens(lm_server.url)
    samples = completion_samples[GEN_TASK]
    assert len(samples) == 4
    for sample in samples:
        [arg] = request_args(sample)
        context, gen_kwargs = arg["arg_0"], arg["arg_1"]
        # What lm-eval sent: the context's ids (no BOS), its stop strings plus the EOS text.
        stop = [*gen_kwargs["until"], tokens.info["eos_token"]]
        body = {"prompt": tokens(context), "max_tokens": gen_kwargs["max_gen_toks"], "temperature": 0, "stop": stop}
        answer = requests.post(lm_server.url + "/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        want = answer.json()["choices"][0]["text"]
        [got] = sample["filtered_resps"]
        assert got == want, f"doc {sample['doc_id']} {context!r}: lm-eval {got!r}, server {want!r}"
        assert not any(s in got for s in stop), got


def test_lmeval_chat_generation_matches_server_greedy(lm_server, tmp_path: Path) -> None:
    """local-chat-completions with --apply_chat_template: the messages go to /v1/chat/completions
    as JSON (no tokenizer on lm-eval's side); every answer is the server's greedy one."""
    args = {
        "base_url": lm_server.url + "/v1/chat/completions",
        "model": served_model(lm_server.url),
        "num_concurrent": 1,
        "max_retries": 1,
    }
    samples = run_lmeval(tmp_path, "local-chat-completions", args, [GEN_TASK], "--apply_chat_template")[GEN_TASK]
    assert len(samples) == 4
    for sample in samples:
        [arg] = request_args(sample)
        chat, gen_kwargs = arg["arg_0"], arg["arg_1"]
        # The chat travels as a JSON string (logged as a one-item list, the tuple that holds it).
        messages = json.loads(chat[0] if isinstance(chat, list) else chat)
        assert messages == [{"role": "user", "content": sample["doc"]["prompt"]}]
        body = {
            "messages": messages,
            "max_tokens": gen_kwargs["max_gen_toks"],
            "temperature": 0,
            "stop": gen_kwargs["until"][:4],
        }
        answer = requests.post(lm_server.url + "/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        want = answer.json()["choices"][0]["message"]["content"]
        [got] = sample["filtered_resps"]
        assert got == want, f"doc {sample['doc_id']}: lm-eval {got!r}, server {want!r}"
