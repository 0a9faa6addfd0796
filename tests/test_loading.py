"""Streamed loading (model/loading.py): the same weights as transformers' from_pretrained, in
every format and dtype; no mapping of the checkpoint left afterwards; one copy's peak."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from minicpm_server.engine.native import packed as packed_module
from minicpm_server.engine.native.budget import KvShape
from minicpm_server.engine.native.kernels import cpu_products
from minicpm_server.engine.native.lean import LeanDecoder
from minicpm_server.engine.native.packed import DeferredPacking, PackedLinear, packing_available
from minicpm_server.engine.native.paged import PagedKVCache
from minicpm_server.engine.native.quantized import CHUNK_ROWS
from minicpm_server.model.checkpoint import granite_config, inspect_checkpoint, load_checkpoint
from minicpm_server.model.loading import LinearForm, load_streaming
from minicpm_server.model.tiny import SIZES, TinySize, build_tiny_checkpoint
from tests.harness import PROMPTS, REPO, greedy, result, run, submit

CPU = torch.device("cpu")
# (size, weights format, shards, dtype the file stores)
LAYOUTS = {
    "bin-fp32": ("tiny", "bin", 1, torch.float32),
    "bin-bf16-sharded": ("tiny", "bin", 2, torch.bfloat16),
    "safetensors-fp32": ("tiny", "safetensors", 1, torch.float32),
    "safetensors-gqa-sharded": ("tiny-gqa", "safetensors", 3, torch.float32),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    size, fmt, shards, dtype = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp("layout") / f"MiniCPM-{request.param}"
    return build_tiny_checkpoint(out, size, seed=4, dtype=dtype, weights_format=fmt, shards=shards)


def from_pretrained(path: Path, dtype: torch.dtype):
    from transformers import GraniteForCausalLM

    files = inspect_checkpoint(path)
    return GraniteForCausalLM.from_pretrained(
        str(path), config=granite_config(files.config), dtype=dtype, attn_implementation="sdpa", local_files_only=True
    ).eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_streamed_weights_equal_from_pretrained(layout_dir: Path, dtype: str) -> None:
    ours = load_checkpoint(layout_dir, device="cpu", dtype=dtype).model
    theirs = from_pretrained(layout_dir, getattr(torch, dtype))
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    for name, tensor in reference.items():
        assert mine[name].dtype == tensor.dtype, name
        assert torch.equal(mine[name], tensor), name
    expected = dict(theirs.named_buffers())
    for name, buffer in ours.named_buffers():
        assert torch.equal(buffer, expected[name]), name  # the rotary table's frequencies, made again
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied: one tensor, not two
    assert not any(p.is_meta for p in ours.parameters())
    assert not ours.training
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def checkpoint_mappings(path: Path) -> list[str]:
    """Lines of /proc/self/maps that map a file of the checkpoint directory."""
    root = str(path.resolve())
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if root in line]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_mapping_of_the_checkpoint_remains(layout_dir: Path, dtype: str) -> None:
    loaded = load_checkpoint(layout_dir, device="cpu", dtype=dtype)
    assert checkpoint_mappings(layout_dir) == []
    assert loaded.model.model.embed_tokens.weight.abs().sum() > 0  # the weights are here, not in the file


# A model big enough that its weights dwarf the allocator's noise: 8 layers, 512 wide, ~120 MB in
# float32. Loaded as bfloat16 from the float32 file in a fresh process, the resident peak above
# what the process held before may be the bfloat16 weights plus about one tensor, not those plus
# the float32 file's pages (what from_pretrained's path held: 1.5x the bfloat16 size, or more).
PEAK_SHAPE = TinySize(512, 8, 8, 8, 1408, 8192, 512)
_PEAK_PROBE = """
import json, sys
from pathlib import Path
import torch
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.loading import LinearForm
load_checkpoint(sys.argv[2], device="cpu", dtype="bfloat16")  # imports and one-time set-up
def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
form = LinearForm(sys.argv[4]) if sys.argv[4] != "none" else LinearForm()
model = load_checkpoint(sys.argv[1], device="cpu", dtype=sys.argv[3], form=form).model
print(json.dumps({"peak_rise": status("VmHWM") - before, "rise": status("VmRSS") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_load_peak_is_one_copy_plus_a_tensor(tmp_path: Path, tiny_dir: Path) -> None:
    path = build_tiny_checkpoint(tmp_path / "MiniCPM-peak", PEAK_SHAPE, seed=5, tokenizer_json=False)
    weights = path / "pytorch_model.bin"
    shape = SIZES["tiny"]
    assert PEAK_SHAPE.hidden_size > shape.hidden_size
    measured = _load_peak(path, tiny_dir, "bfloat16", "none")
    bf16_bytes = weights.stat().st_size // 2
    largest = PEAK_SHAPE.vocab_size * PEAK_SHAPE.hidden_size * 2  # the embedding, in bfloat16
    assert measured["peak_rise"] < bf16_bytes + largest + (16 << 20), measured
    assert measured["rise"] < bf16_bytes * 1.1 + (16 << 20), measured


def _load_peak(path: Path, tiny_dir: Path, dtype: str, quantize: str) -> dict[str, int]:
    """The resident rise while `path` loads in a fresh process (its peak and where it ends)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(path), str(tiny_dir), dtype, quantize],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 and "clear_refs" in done.stderr:
        pytest.skip("resetting VmHWM is not permitted here")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_int8_load_peak_is_the_int8_weights_plus_a_block(tmp_path: Path, tiny_dir: Path) -> None:
    """--quantization int8 quantizes each matrix as it is read: the float32 model never exists,
    so the load peaks at the int8 layers (and the float32 output head) plus a block of rows'
    temporaries, not at float32's size (what loading dense and quantizing after held)."""
    path = build_tiny_checkpoint(tmp_path / "MiniCPM-peak", PEAK_SHAPE, seed=5, tokenizer_json=False)
    fp32_bytes = (path / "pytorch_model.bin").stat().st_size
    table = PEAK_SHAPE.vocab_size * PEAK_SHAPE.hidden_size * 4  # embedding = output head, kept in float32
    loaded = (fp32_bytes - table) / 4 + table
    measured = _load_peak(path, tiny_dir, "float32", "int8")
    block = CHUNK_ROWS * PEAK_SHAPE.intermediate_size * 4 * 3  # the float32 buffer of a block, with room to spare
    # ... plus the largest tensor's pages of the file mapping while it is read (the table)
    assert measured["peak_rise"] < loaded * 1.1 + table + block + (16 << 20), measured
    assert measured["peak_rise"] < fp32_bytes * 0.7, measured  # the float32 model never existed
    assert measured["rise"] < loaded * 1.1 + (16 << 20), measured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_while_reading_gives_the_packed_engine_model(tiny_dir: Path, dtype: torch.dtype) -> None:
    """Packed as read (the server's path on a wide model on CPU) equals loaded dense, then packed
    by the lean decoder (what the engine did before), and holds no dense copy of the layers."""
    if not packing_available(dtype):
        pytest.skip(f"this torch build or CPU cannot pack {dtype} weights for oneDNN")
    files = inspect_checkpoint(tiny_dir)
    config = granite_config(files.config)
    packed_early, missing, report = load_streaming(config, files.weight_files, CPU, dtype, "sdpa", LinearForm("packed"))
    assert missing == [] and report.seconds["packing"] > 0
    packed_late = load_checkpoint(tiny_dir, device="cpu", dtype=str(dtype).removeprefix("torch.")).model
    for model in (packed_early, packed_late):
        shape = KvShape.of(model)
        cache = PagedKVCache(shape.num_layers, 8 * 16 + 1, shape.kv_heads, shape.head_dim, shape.dtype, CPU)
        LeanDecoder(model, cache, 16, pack_weights=True)
    layer = packed_early.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, PackedLinear) and isinstance(layer.mlp.down_proj, PackedLinear)
    assert sum(p.numel() for p in packed_early.model.layers.parameters()) == sum(
        p.numel() for p in packed_late.model.layers.parameters()
    )  # the norms only
    early = dict(packed_early.named_modules())
    for name, module in packed_late.named_modules():
        if isinstance(module, PackedLinear):  # packed tensors are opaque: compare W^T = I @ W^T
            identity = torch.eye(module.in_features, dtype=dtype)
            assert torch.equal(early[name](identity), module(identity)), name
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.inference_mode():
        assert torch.equal(packed_early(ids).logits, packed_late(ids).logits)
    assert checkpoint_mappings(tiny_dir) == []


@pytest.mark.skipif(not packing_available(torch.float32), reason="this torch build or CPU cannot pack for oneDNN")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_layers_packed_after_start_compute_from_the_mapping_until_packed(tiny_dir: Path) -> None:
    """--packing after-start: the layers are views into the checkpoint's mapping (no copy) and
    compute with PyTorch's default product; packing them later gives the very layers packed as
    read, and once the last is packed nothing of the file stays mapped."""
    files = inspect_checkpoint(tiny_dir)
    config = granite_config(files.config)
    later, missing, report = load_streaming(
        config, files.weight_files, CPU, torch.float32, "sdpa", LinearForm("packed", later=True)
    )
    dense = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    now, _, _ = load_streaming(config, files.weight_files, CPU, torch.float32, "sdpa", LinearForm("packed"))
    assert missing == [] and report.bytes_mapped > 0 and "mapped to pack after start-up" in report.summary()
    layers = [m for m in later.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 7 * config.num_hidden_layers and not any(layer.is_packed for layer in layers)
    assert checkpoint_mappings(tiny_dir) != []  # computed from the file's pages, not from a copy
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.inference_mode():
        # the same numbers; the products differ from nn.Linear's in rounding only (packed.dense_product)
        assert torch.allclose(later(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
        packing = DeferredPacking(layers)
        steps = 0
        while packing.pack_next():
            steps += 1
        assert steps == len(layers) - 1 and packing.left == 0 and all(layer.is_packed for layer in layers)
        assert torch.equal(later(ids).logits, now(ids).logits)  # packed later = packed as read
    del layers, packing
    assert checkpoint_mappings(tiny_dir) == []


@pytest.mark.skipif(not packing_available(torch.float32), reason="this torch build or CPU cannot pack for oneDNN")
def test_a_layer_that_cannot_be_packed_keeps_its_dense_product(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packing after start-up must never take the server down: a failure (out of memory, say)
    stops it, and the layer that failed and those left compute as they did."""
    weight = torch.randn(8, 4)
    layers = [PackedLinear(weight.clone(), later=True) for _ in range(3)]
    reorder = packed_module._reorder
    calls = []

    def second_one_fails(dense: torch.Tensor) -> torch.Tensor:
        calls.append(dense)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return reorder(dense)

    monkeypatch.setattr(packed_module, "_reorder", second_one_fails)
    packing = DeferredPacking(layers)
    assert packing.pack_next() is True and layers[0].is_packed
    assert packing.pack_next() is False and packing.left == 0
    assert not layers[1].is_packed and not layers[2].is_packed
    assert "packing stopped (out of memory): 1 layers keep" in caplog.text
    x = torch.randn(2, 4)
    for layer in layers:
        assert torch.allclose(layer(x), x @ weight.t(), atol=1e-5), layer


@pytest.mark.skipif(not packing_available(torch.float32), reason="this torch build or CPU cannot pack for oneDNN")
@pytest.mark.usefixtures("pytorch_products")
def test_the_engine_packs_after_its_first_step_and_answers_throughout(tmp_path: Path) -> None:
    """Packing after start-up never delays the warm-up: nothing is packed before the engine's
    first step; after it, every layer is packed (the output head's copy last) while the engine
    stays free to answer."""
    path = build_tiny_checkpoint(tmp_path / "MiniCPM-wide", PEAK_SHAPE, seed=6, tokenizer_json=False)
    loaded = load_checkpoint(path, device="cpu", dtype="float32", form=LinearForm("packed", later=True))

    async def body(engine):
        packing = engine.runner.packing
        assert packing.total == 57 and packing.order[-1] is loaded.model.lm_head  # 7 per layer, and the head
        await asyncio.sleep(0.5)  # an engine idle from the start has packed nothing
        assert packing.left == packing.total
        first = await result(submit(engine, loaded, PROMPTS[0], greedy(4)))
        deadline = time.monotonic() + 300
        while packing.left and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        second = await result(submit(engine, loaded, PROMPTS[0], greedy(4)))
        return first, second, packing.left

    first, second, left = run(loaded, body)
    assert left == 0 and first.completion_tokens == second.completion_tokens == 4
    assert all(m.is_packed for m in loaded.model.modules() if isinstance(m, PackedLinear))
    assert checkpoint_mappings(path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("packing", ["kernels", "after-start", "at-load"])
def test_server_answers_from_weights_packed_as_read_and_maps_no_checkpoint(
    start_server, tmp_path: Path, packing: str
) -> None:
    """The server's own path: a model wide enough to be packed, real requests answered, and in
    the end no mapping of any checkpoint file. By default our CPU kernels read the weights where
    they are, in the file's mapping, and the engine copies them into memory of its own after
    start-up (nothing packed). Without them (--no-cpu-kernels, on a CPU that packs float32):
    at-load packs as the weights are read; after-start is ready with the layers still in the
    file's mapping and packs them while idle."""
    path = build_tiny_checkpoint(tmp_path / "MiniCPM-wide", PEAK_SHAPE, seed=6, tokenizer_json=False)
    choice = ["--cpu-kernels"] if packing == "kernels" else ["--no-cpu-kernels", "--packing", packing]
    server = start_server("--model-path", path, "--device", "cpu", "--log-level", "info", *choice, wait=False)
    server.wait_ready(timeout=600)  # a 120 MB model: a shared, busy machine can take minutes
    body = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    answer = requests.post(server.url + "/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    [weights_line] = server.log_lines("weights: ")
    packs = packing_available(torch.float32)
    ours = packing == "kernels" and cpu_products() is not None  # built in this process too, from the same source
    if packing == "kernels":
        assert ("mapped and read where they are" in weights_line) == ours, weights_line
        assert ("through our CPU kernels" in server.log()) == ours
        if ours:  # then copied out of the mapping between steps: 7 per layer and the embedding table
            [done] = server.log_lines("weight matrices out of the checkpoint's mapping after start-up", timeout=300)
            assert "copied 57 weight matrices" in done
    elif packing == "at-load":
        assert ("packing" in weights_line) == packs, weights_line
    else:
        assert ("mapped to pack after start-up" in weights_line) == packs, weights_line
        if packs:
            [done] = server.log_lines("linear layers for oneDNN after start-up in", timeout=300)
            assert "packed 57 linear layers" in done  # 7 per layer and the output head's copy
    again = requests.post(server.url + "/v1/completions", json=body, timeout=120)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
    assert again.json()["choices"][0]["text"] == answer.json()["choices"][0]["text"]
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert str(path.resolve()) not in maps
