"""The Granite-format copy that the vLLM backend loads (model/export.py), and how a backend is chosen.

These need no vLLM: the copy is checked by loading it with transformers' own Granite class, by
name from config.json and without remote code, and comparing its logits with our loader's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minicpm_server.engine import choose_backend, vllm_installed
from minicpm_server.exceptions import StartupError
from minicpm_server.model.checkpoint import inspect_checkpoint, load_checkpoint
from minicpm_server.model.export import STAMP_FILE, default_export_dir, granite_directory
from tests.harness import REPO, free_port


def exported(source: Path, tmp_path: Path) -> Path:
    return granite_directory(inspect_checkpoint(source), tmp_path / f"{source.name}-granite")


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("fixture", ["tiny_dir", "gqa_dir"])  # pickled .bin, and sharded safetensors
def test_copy_loads_as_granite_with_the_same_logits(fixture: str, request, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = request.getfixturevalue(fixture)
    out = exported(source, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "granite" and config["architectures"] == ["GraniteForCausalLM"]
    assert "auto_map" not in config and config["tie_word_embeddings"] is True
    assert not list(out.glob("*.py")) and not list(out.glob("*.bin"))
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()

    granite = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    ours = load_checkpoint(source, device="cpu", dtype="float32").model
    ids = [1, 5, 17, 300, 42, 9, 2]
    torch.testing.assert_close(logits(granite, ids), logits(ours, ids), rtol=0, atol=0)


def test_pickled_weights_become_safetensors_unchanged(tiny_dir: Path, tmp_path: Path) -> None:
    out = exported(tiny_dir, tmp_path)
    source = torch.load(tiny_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    with safe_open(str(out / "model.safetensors"), framework="pt") as copy:
        assert set(copy.keys()) == set(source) - {"lm_head.weight"}
        for name in sorted(copy.keys()):
            assert torch.equal(copy.get_tensor(name), source[name]), name


def test_safetensors_sources_are_linked_not_copied(gqa_dir: Path, tmp_path: Path) -> None:
    out = exported(gqa_dir, tmp_path)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 3 and all(p.is_symlink() for p in shards)
    assert (out / "model.safetensors.index.json").is_file()


def test_copy_is_reused_while_up_to_date_and_rebuilt_when_stale(tiny_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(tiny_dir, source)
    out = exported(source, tmp_path)
    first = (out / STAMP_FILE).stat().st_mtime_ns
    assert exported(source, tmp_path) == out and (out / STAMP_FILE).stat().st_mtime_ns == first

    weights = source / "pytorch_model.bin"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    exported(source, tmp_path)
    assert (out / STAMP_FILE).stat().st_mtime_ns != first
    assert json.loads((out / STAMP_FILE).read_text())["files"]["pytorch_model.bin"][1] == weights.stat().st_mtime_ns


def test_copy_goes_beside_the_checkpoint_or_into_the_cache(tmp_path: Path) -> None:
    checkpoint = tmp_path / "MiniCPM-2B"
    checkpoint.mkdir()
    assert default_export_dir(checkpoint) == tmp_path / "MiniCPM-2B-granite"
    if os.geteuid() != 0:  # root may write anywhere
        tmp_path.chmod(0o555)
        try:
            assert ".cache" in default_export_dir(checkpoint).parts
        finally:
            tmp_path.chmod(0o755)


def test_backend_choice() -> None:
    assert choose_backend("auto", "cpu") == "native"
    assert choose_backend("native", "cuda") == "native"
    assert choose_backend("auto", "cuda") == ("vllm" if vllm_installed() else "native")
    if not vllm_installed():
        with pytest.raises(StartupError, match="vLLM is not installed"):
            choose_backend("vllm", "cpu")


@pytest.mark.skipif(vllm_installed(), reason="checks the message for a machine without vLLM")
def test_engine_vllm_without_vllm_is_one_line_and_exit_2(tiny_dir: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "api.py"),
            "--model-path",
            str(tiny_dir),
            "--engine",
            "vllm",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-500:]
    assert "vLLM is not installed" in done.stderr and "pip install vllm" in done.stderr
    assert "Traceback" not in done.stderr
