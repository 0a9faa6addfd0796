"""Loading: what is accepted, what is refused (one line, exit 2), and that no checkpoint code runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minicpm_server.model.checkpoint import CheckpointError, granite_config, inspect_checkpoint, load_checkpoint
from minicpm_server.model.tiny import EXECUTED_MARKER
from tests.harness import REPO


def run_api(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "api.py"), "--host", "127.0.0.1", "--port", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_granite_mapping_matches_design() -> None:
    real = json.loads((Path(__file__).parent / "data" / "minicpm-2b-sft-config.json").read_text())
    cfg = granite_config(real)
    assert cfg.embedding_multiplier == 12
    assert abs(cfg.residual_multiplier - 0.2213594362) < 1e-9
    assert cfg.logits_scaling == 9.0
    assert cfg.attention_multiplier == 0.125
    assert cfg.tie_word_embeddings is True
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (2304, 40, 36, 122753)


def test_missing_path_says_to_download(tmp_path: Path) -> None:
    result = run_api("--model-path", str(tmp_path / "nowhere"))
    assert_one_line_refusal(result, "does not exist", "python download.py", "/root/autodl-tmp")


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("minicpm3", {}),
        ("minicpmv", {}),
        ("llama", {"architectures": ["LlamaForCausalLM"]}),
        ("minicpm", {"num_experts": 8}),
    ],
)
def test_wrong_model_family_is_refused(tmp_path: Path, tiny_dir: Path, model_type: str, extra: dict) -> None:
    ckpt = copy_checkpoint(tiny_dir, tmp_path / "other")
    config = json.loads((ckpt / "config.json").read_text())
    config.update({"model_type": model_type, **extra})
    (ckpt / "config.json").write_text(json.dumps(config))
    result = run_api("--model-path", str(ckpt))
    assert_one_line_refusal(result, model_type if model_type != "minicpm" else "experts")


def test_missing_weights_refused(tmp_path: Path, tiny_dir: Path) -> None:
    ckpt = copy_checkpoint(tiny_dir, tmp_path / "noweights")
    (ckpt / "pytorch_model.bin").unlink()
    assert_one_line_refusal(run_api("--model-path", str(ckpt)), "no weights")


def test_missing_tokenizer_refused(tmp_path: Path, tiny_dir: Path) -> None:
    ckpt = copy_checkpoint(tiny_dir, tmp_path / "notok")
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.model").unlink()
    assert_one_line_refusal(run_api("--model-path", str(ckpt)), "tokenizer")


def test_missing_shard_refused(tmp_path: Path, gqa_dir: Path) -> None:
    ckpt = copy_checkpoint(gqa_dir, tmp_path / "partial")
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        inspect_checkpoint(ckpt)


def test_corrupt_weights_refused_at_load(tmp_path: Path, tiny_dir: Path) -> None:
    ckpt = copy_checkpoint(tiny_dir, tmp_path / "corrupt")
    data = (ckpt / "pytorch_model.bin").read_bytes()
    (ckpt / "pytorch_model.bin").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_checkpoint(ckpt, device="cpu")
    assert_one_line_refusal(run_api("--model-path", str(ckpt)), "cannot read the weights")


def test_incomplete_weights_refused(tmp_path: Path, tiny_dir: Path) -> None:
    ckpt = copy_checkpoint(tiny_dir, tmp_path / "incomplete")
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(ckpt, device="cpu")
    assert_one_line_refusal(run_api("--model-path", str(ckpt)), "incomplete", "up_proj")


def test_checkpoint_code_is_never_executed(tmp_path: Path, tiny_dir: Path) -> None:
    ckpt = copy_checkpoint(tiny_dir, tmp_path / "decoy")
    # Loading runs with stdin closed: a prompt asking whether to trust remote code would fail it.
    ours = load_checkpoint(ckpt, device="cpu")
    assert ours.model.__class__.__name__ == "MiniCPMForCausalLM"  # the default on CPU (model/architecture.py)
    theirs = load_checkpoint(ckpt, device="cpu", implementation="transformers")
    assert theirs.model.__class__.__name__ == "GraniteForCausalLM"
    assert not (ckpt / EXECUTED_MARKER).exists()
    assert not any(name.startswith("modeling_minicpm") for name in sys.modules)


def test_tokenizer_model_only_checkpoint_loads(tmp_path: Path, tiny_dir: Path) -> None:
    """Older copies ship only the sentencepiece model: the same ids as with tokenizer.json beside it."""
    ckpt = copy_checkpoint(tiny_dir, tmp_path / "spm-only")
    (ckpt / "tokenizer.json").unlink()
    full = load_checkpoint(tiny_dir, device="cpu").tokenizer
    spm = load_checkpoint(ckpt, device="cpu").tokenizer
    text = "<用户>hello 你好 world<AI>"
    assert spm.encode(text) == full.encode(text)
    assert spm.encode(text)[0] == 1  # BOS


def test_sharded_safetensors_gqa_loads(gqa_dir: Path) -> None:
    loaded = load_checkpoint(gqa_dir, device="cpu")
    assert loaded.model.config.num_key_value_heads == 2
    assert loaded.dtype == torch.float32 and loaded.attn_implementation == "sdpa"


def test_dtype_choice_on_cpu(tiny_dir: Path) -> None:
    loaded = load_checkpoint(tiny_dir, device="cpu", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_cuda_requested_without_gpu_is_refused(tiny_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_refusal(run_api("--model-path", str(tiny_dir), "--device", "cuda"), "CUDA")


def test_port_in_use_is_one_line_and_exit_1(tiny_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "api.py"),
                "--model-path",
                str(tiny_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already in use" in errors[0] and "--port" in errors[0]
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr


def test_demo_honours_device_choice(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(REPO / "api.py"), "--demo", "--device", "cuda", "--host", "127.0.0.1", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert result.returncode == 2 and "CUDA" in result.stderr.splitlines()[-1]
