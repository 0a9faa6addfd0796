"""download.py end to end: the real ModelScope and Hugging Face clients against fake hubs on loopback."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from tests.fakehub import FakeHuggingFaceHub, FakeModelScopeHub
from tests.harness import REPO

MODEL_ID = "OpenBMB/MiniCPM-2B-sft-fp32"


def run_download(env_var: str, hub_url: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{env_var: hub_url}, HF_HUB_DISABLE_TELEMETRY="1")
    if cache is not None:  # keep the clients' own caches inside the test's directory
        env.update(MODELSCOPE_CACHE=str(cache / "ms-cache"), HF_HOME=str(cache / "hf-home"))
    return subprocess.run(
        [sys.executable, str(REPO / "download.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )


def last_line(result: subprocess.CompletedProcess) -> Path:
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(result.stdout.strip().splitlines()[-1])


def file_gets(hub: FakeModelScopeHub) -> list[str]:
    return [r for r in hub.requests if "FilePath=" in r]


def same_files(a: Path, b: Path) -> bool:
    names = ("config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer.model")
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_modelscope_download_then_serve(tmp_path: Path, tiny_dir: Path, start_server) -> None:
    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub:
        result = run_download("MODELSCOPE_ENDPOINT", hub.url, "--cache-dir", str(tmp_path), cache=tmp_path)
    path = last_line(result)
    assert path == tmp_path / "OpenBMB" / "MiniCPM-2B-sft-fp32"  # api.py's default layout under the cache dir
    assert "verified" in result.stderr and same_files(path, tiny_dir)
    served = start_server("--model-path", path, "--device", "cpu")
    answer = requests.post(served.url, json={"prompt": "hi", "max_new_tokens": 5})
    assert answer.status_code == 200 and "response" in answer.json()


def test_huggingface_download(tmp_path: Path, tiny_dir: Path) -> None:
    with FakeHuggingFaceHub({"openbmb/MiniCPM-2B-dpo-bf16": tiny_dir}) as hub:
        result = run_download(
            "HF_ENDPOINT", hub.url, "--source", "hf", "--variant", "dpo-bf16", "--cache-dir", str(tmp_path)
        )
    path = last_line(result)
    assert path == tmp_path / "openbmb" / "MiniCPM-2B-dpo-bf16" and same_files(path, tiny_dir)


def test_variant_ids_per_source(tmp_path: Path, tiny_dir: Path) -> None:
    with FakeModelScopeHub({"OpenBMB/miniCPM-bf16": tiny_dir}) as hub:  # ModelScope's name for the sft bf16
        result = run_download(
            "MODELSCOPE_ENDPOINT", hub.url, "--variant", "sft-bf16", "--cache-dir", str(tmp_path), cache=tmp_path
        )
    assert last_line(result) == tmp_path / "OpenBMB" / "miniCPM-bf16"


def test_second_run_downloads_nothing_and_corruption_is_fetched_again(tmp_path: Path, tiny_dir: Path) -> None:
    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub:
        path = last_line(run_download("MODELSCOPE_ENDPOINT", hub.url, "--cache-dir", str(tmp_path), cache=tmp_path))
        before = len(file_gets(hub))
        last_line(run_download("MODELSCOPE_ENDPOINT", hub.url, "--cache-dir", str(tmp_path), cache=tmp_path))
        assert len(file_gets(hub)) == before  # everything verified in place: no file requested again
        weights = path / "pytorch_model.bin"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the sha256 can tell
        weights.write_bytes(bytes(data))
        last_line(run_download("MODELSCOPE_ENDPOINT", hub.url, "--cache-dir", str(tmp_path), cache=tmp_path))
    assert same_files(path, tiny_dir)  # detected by its sha256 and replaced (from the hub or the client's cache)


def test_corrupt_file_on_the_hub_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub:
        hub.corrupt.add("pytorch_model.bin")
        result = run_download("MODELSCOPE_ENDPOINT", hub.url, "--cache-dir", str(tmp_path), cache=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "pytorch_model.bin" in result.stderr
    target = tmp_path / "OpenBMB" / "MiniCPM-2B-sft-fp32"
    assert not (target / "pytorch_model.bin").exists()
    refused = subprocess.run(
        [sys.executable, str(REPO / "api.py"), "--model-path", str(target), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "no weights" in refused.stderr  # never mistaken for a complete model


def test_interrupted_download_resumes(tmp_path: Path, tiny_dir: Path) -> None:
    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub:
        hub.cut_after["pytorch_model.bin"] = 1_000_000  # the connection drops a quarter of the way in
        path = last_line(run_download("MODELSCOPE_ENDPOINT", hub.url, "--cache-dir", str(tmp_path), cache=tmp_path))
    assert [r for r in hub.ranges if r[0] == "pytorch_model.bin"], "the client did not resume with a Range request"
    assert same_files(path, tiny_dir)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_not_enough_disk_space_is_refused_before_downloading(tmp_path: Path, tiny_dir: Path) -> None:
    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub, small_filesystem(tmp_path / "small", "2M") as small:
        result = run_download("MODELSCOPE_ENDPOINT", hub.url, "--cache-dir", str(small))
        assert result.returncode != 0
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: not enough disk space") and "MB" in line
        assert not file_gets(hub)


def test_unknown_model_id(tmp_path: Path, tiny_dir: Path) -> None:
    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub:
        result = run_download(
            "MODELSCOPE_ENDPOINT", hub.url, "--cache-dir", str(tmp_path), "--model-id", "OpenBMB/NoSuchModel"
        )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model OpenBMB/NoSuchModel")
    with FakeHuggingFaceHub({}) as hub:
        result = run_download("HF_ENDPOINT", hub.url, "--source", "hf", "--cache-dir", str(tmp_path))
    assert result.stderr.strip().splitlines()[-1].startswith("error: model openbmb/MiniCPM-2B-sft-fp32")


def test_unreachable_hub(tmp_path: Path) -> None:
    result = run_download("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9", "--cache-dir", str(tmp_path))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach ModelScope") and "Traceback" not in result.stderr


def test_convert_to_bf16_safetensors(tmp_path: Path, tiny_dir: Path, start_server) -> None:
    from safetensors.torch import load_file

    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub:
        converted = last_line(
            run_download(
                "MODELSCOPE_ENDPOINT",
                hub.url,
                "--cache-dir",
                str(tmp_path),
                "--convert",
                "bf16-safetensors",
                cache=tmp_path,
            )
        )
    assert converted == tmp_path / "OpenBMB" / "MiniCPM-2B-sft-fp32-bf16-safetensors"
    assert not list(converted.glob("*.py")) and (converted / "model.safetensors").is_file()
    original = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    copy = load_file(str(converted / "model.safetensors"))
    assert set(copy) == set(original)
    assert all(
        copy[k].dtype == torch.bfloat16 and torch.equal(copy[k], original[k].to(torch.bfloat16)) for k in original
    )
    served = start_server("--model-path", converted, "--device", "cpu", "--dtype", "bfloat16")
    assert requests.post(served.url, json={"prompt": "hi", "max_new_tokens": 4}).status_code == 200
