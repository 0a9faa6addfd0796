"""Weight-only int8 (`--quantization int8`, engine/native/quantized.py) and bfloat16 on CPU.

Tolerances, and where they come from:
* rounding to the nearest grid point moves a weight by at most half a step (its channel's scale);
* the int8 kernel takes bfloat16 activations and returns bfloat16, so a product is exact up to
  one bfloat16 rounding of its inputs and one of its output: relative 2^-8 each;
* a whole quantized model is compared with a float32 twin holding the dequantized weights, so the
  quantization error cancels and only those roundings remain: fewer than a bfloat16 model makes,
  so its distance from its twin is bounded by the bfloat16 model's from float32, measured beside it;
* the lean step against transformers' forward on the same int8 model: the tolerance
  tests/test_lean.py uses for bfloat16 (3e-2 on logits of order 1), as both round the same way.
How far int8 and bfloat16 move the next-token distributions from float32 is measured, not
asserted: `python -m bench.accuracy` (BENCHMARKS.md), beside llama.cpp's Q8_0 and BF16.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import requests
import torch

from minicpm_server.engine import check_quantization, linear_form
from minicpm_server.engine.native import kernels as kernels_module
from minicpm_server.engine.native import packed as packed_module
from minicpm_server.engine.native import quantized as quantized_module
from minicpm_server.engine.native.budget import KvShape
from minicpm_server.engine.native.kernels import KernelLinear, cpu_products
from minicpm_server.engine.native.lean import LeanDecoder
from minicpm_server.engine.native.packed import PackedProjection, packing_available
from minicpm_server.engine.native.paged import PagedKVCache
from minicpm_server.engine.native.quantized import (
    Int8Embedding,
    Int8Linear,
    TableEmbedding,
    packed_int8_product,
    quantize_int8,
    quantize_linear,
    quantize_model,
    table_in,
    weight_bytes,
    widening_product,
)
from minicpm_server.exceptions import StartupError
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.loading import LinearForm
from minicpm_server.settings import Settings
from tests.harness import PROMPTS, REPO, greedy, result, run, submit
from tests.test_lean import BLOCK, decoder_pair, step_inputs

BF16_STEP = 2.0**-8  # bfloat16's relative rounding error (8 significant bits, round to nearest)
IDS = torch.tensor([[5, 17, 99, 3, 250, 7, 1000, 42, 8, 64]])


def test_rounding_moves_each_weight_at_most_half_a_step() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=generator) * 0.02
    weight[3, 5] = 0.5  # an outlier: its channel's step grows, the others' do not
    q, scales = quantize_int8(weight, torch.bfloat16)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (64,)
    steps = scales.float()[:, None]
    error = (q.float() * steps - weight).abs()
    assert bool((error <= steps / 2 * (1 + 1e-6)).all())
    assert int(q.abs().amax(dim=1).min()) >= 126  # each channel's grid spans its largest weight
    assert int(q[3, 5]) == 127
    assert abs(float(steps[3]) - 0.5 / 127) <= 0.5 / 127 * BF16_STEP  # the outlier's channel: its own step
    assert abs(float(steps[4]) - float(weight[4].abs().max()) / 127) <= float(steps[4]) * BF16_STEP


@pytest.mark.usefixtures("pytorch_products")
def test_int8_product_is_the_dequantized_product_up_to_bfloat16_rounding() -> None:
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(96, 40, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=generator))
    layer = quantize_linear(linear)
    assert isinstance(layer, Int8Linear) and quantize_linear(layer) is layer
    x = torch.randn(2, 3, 96, generator=generator)  # any leading shape, as prefill passes [1, T, hidden]
    got = layer(x)
    assert got.shape == (2, 3, 40) and got.dtype == torch.float32
    expected = x.to(torch.bfloat16).double() @ layer.dequantized().double().t()
    # the output's own rounding (2^-8 of it) plus float32 accumulation of 96 terms
    assert torch.allclose(got.double(), expected, rtol=BF16_STEP, atol=1e-5 * float(expected.abs().max()))


def test_cuda_formulation_computes_the_cpu_kernels_product() -> None:
    """The CUDA path's product (widening_product) runs on CPU too: it must agree with the kernel
    up to the two ways of rounding to bfloat16 (a GPU is not lent here; the math is what we check)."""
    generator = torch.Generator().manual_seed(2)
    q, scales = quantize_int8(torch.randn(48, 64, generator=generator), torch.bfloat16)
    x = torch.randn(5, 64, generator=generator).to(torch.bfloat16)
    kernel, widened = packed_int8_product(x, q, scales).float(), widening_product(x, q, scales).float()
    # each rounds its output to bfloat16 (2^-8 of it); the widened one also rounds before the scale
    assert torch.allclose(widened, kernel, rtol=3 * BF16_STEP, atol=1e-3 * float(kernel.abs().max()))


def test_biased_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="bias"):
        quantize_linear(torch.nn.Linear(8, 8, bias=True))
    with pytest.raises(ValueError, match="int4"):
        quantize_linear(torch.nn.Linear(8, 8, bias=False), "int4")


def dequantized_twin(path, quantized) -> torch.nn.Module:
    """The float32 model with each weight replaced by what the int8 model multiplies by."""
    twin = load_checkpoint(path, device="cpu", dtype="float32").model
    with torch.no_grad():
        for layer, qlayer in zip(twin.model.layers, quantized.model.layers, strict=True):
            for block in ("self_attn", "mlp"):
                for name, module in getattr(layer, block).named_children():
                    source = getattr(getattr(qlayer, block), name)
                    if isinstance(source, Int8Linear):
                        module.weight.copy_(source.dequantized())
        twin.lm_head.weight.copy_(quantized.lm_head.dequantized())  # tied: the embedding too
    return twin


def test_quantized_model_computes_its_dequantized_twin(tiny_dir) -> None:
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    before = weight_bytes(model)
    quantize_model(model)
    # one int8 table serves the tied head and the embedding's lookups
    assert isinstance(model.model.embed_tokens, Int8Embedding) and model.model.embed_tokens.table is model.lm_head
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    # a quarter of float32, plus the per-channel scales and the norms (float32, as loaded)
    assert before / 4 < weight_bytes(model) < before / 4 * 1.1
    twin = dequantized_twin(tiny_dir, model)
    float32 = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    bfloat16 = load_checkpoint(tiny_dir, device="cpu", dtype="bfloat16").model
    with torch.inference_mode():
        error = (model(input_ids=IDS).logits - twin(input_ids=IDS).logits).abs()
        bf16_error = (bfloat16(input_ids=IDS).logits.float() - float32(input_ids=IDS).logits).abs()
    # int8 rounds each product's input and output to bfloat16; a bfloat16 model rounds those and
    # its weights and residual stream too, so it must drift from float32 at least as far
    assert 0 < error.max() <= bf16_error.max() and error.mean() <= bf16_error.mean()


@pytest.mark.parametrize("head", [False, True], ids=["head-dense", "quantize-head"])
def test_int8_quantized_as_read_equals_quantized_after_loading(
    tiny_dir, monkeypatch: pytest.MonkeyPatch, head: bool
) -> None:
    """The server's path (each matrix quantized from the file as it is read, a block of rows at a
    time) gives the very tables that quantizing a loaded float32 model gives; the output head
    and the embedding tied to it stay one dense table unless --quantize-head."""
    monkeypatch.setattr(quantized_module, "CHUNK_ROWS", 48)  # several blocks per matrix, a ragged last one
    form = LinearForm("int8", quantize_head=head)
    streamed = load_checkpoint(tiny_dir, device="cpu", dtype="float32", form=form).model
    late = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    quantize_model(late, head=head)
    dense_layers = [m for m in streamed.modules() if isinstance(m, torch.nn.Linear)]
    if head:
        assert isinstance(streamed.model.embed_tokens, Int8Embedding)
        assert streamed.model.embed_tokens.table is streamed.lm_head  # one table, tied
        assert dense_layers == []  # no dense layer was made
    else:
        assert dense_layers == [streamed.lm_head]
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # one table, tied
        assert torch.equal(streamed.lm_head.weight, late.lm_head.weight)
    ours, theirs = dict(streamed.named_buffers()), dict(late.named_buffers())
    quantized_names = [name for name in theirs if name.endswith(("qweight", "scales"))]
    assert quantized_names and set(quantized_names) <= set(ours)
    for name in quantized_names:
        assert torch.equal(ours[name], theirs[name]), name
    with torch.inference_mode():
        assert torch.equal(streamed(input_ids=IDS).logits, late(input_ids=IDS).logits)


@pytest.mark.parametrize("head", ["int8", "float32 packed", "float32 kernels"])
def test_int8_lean_step_matches_transformers_forward(tiny_dir, monkeypatch: pytest.MonkeyPatch, head: str) -> None:
    """The lean step fuses the int8 q/k/v and gate/up layers; transformers' forward (prefill)
    calls them one by one; both read one copy of the weights. The output head is the int8 table
    (--quantize-head) or, by default, float32: read from the embedding table by our CPU kernels
    where they are built, else a oneDNN-packed copy where the model is wide enough to pack
    (forced here for the tiny model), as the float32 engine's head."""
    if head == "float32 kernels" and cpu_products() is None:
        pytest.skip("our CPU kernels are not available here")
    if head == "float32 packed":
        if not packing_available(torch.float32):
            pytest.skip("this torch build or CPU cannot pack float32 weights for oneDNN")
        monkeypatch.setattr(packed_module, "MIN_HIDDEN_SIZE", 0)
        monkeypatch.setattr(kernels_module, "_enabled", False)  # PyTorch's products; restored after the test
    eager, lean = decoder_pair(tiny_dir, "float32", prepare=lambda m: quantize_model(m, head=head == "int8"))
    assert lean.lean is not None and lean.lean.quantized
    expected = {"int8": Int8Linear, "float32 packed": PackedProjection, "float32 kernels": KernelLinear}[head]
    assert isinstance(lean.lean.lm_head, expected)
    fused = lean.lean.layers[0].qkv
    q_proj = lean.model.model.layers[0].self_attn.q_proj
    assert q_proj.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
    with torch.inference_mode():
        for rows in (1, 3, 4):
            inputs = step_inputs(rows, eager.model.config.vocab_size)
            assert torch.allclose(lean(*inputs), eager(*inputs), atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(cpu_products() is None, reason="needs our CPU kernels (g++ and AVX2)")
def test_int8_keeps_the_tied_table_in_bfloat16_on_cpu(tiny_dir) -> None:
    """What the server loads for --quantization int8 on CPU: the embedding table the head is tied
    to is read in bfloat16, once; the embedding returns float32 rows and the head, our kernel over
    the same table, float32 logits. The same as converting a loaded int8 model, and within
    bfloat16's rounding of the model with a float32 table."""
    settings = Settings(model_path=tiny_dir, device="cpu", quantization="int8")
    form = linear_form(settings, "cpu")
    assert form.table_dtype == torch.bfloat16
    assert linear_form(settings.model_copy(update={"quantize_head": True}), "cpu").table_dtype is None
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32", form=form).model
    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, TableEmbedding) and isinstance(head, KernelLinear)
    assert head.weight is embedding.weight and head.weight.dtype == torch.bfloat16 and not head.tile
    assert embedding(torch.tensor([3, 4])).dtype == torch.float32
    late = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    quantize_model(late, head=False)
    with torch.inference_mode():
        float32_table = late(input_ids=IDS).logits
        assert table_in(late, torch.bfloat16)
        logits = model(input_ids=IDS).logits
        assert logits.dtype == torch.float32 and torch.equal(logits, late(input_ids=IDS).logits)
    assert torch.allclose(logits, float32_table, atol=3e-2, rtol=3e-2)
    assert not table_in(late, torch.bfloat16)  # once: the head is no longer a plain tied nn.Linear
    shape = KvShape.of(model)
    cache = PagedKVCache(shape.num_layers, 64 * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device)
    lean = LeanDecoder(model, cache, BLOCK)
    assert lean.quantized and lean.lm_head is head and lean.embed_tokens is embedding


def test_int8_engine_answers_alone_and_batched_alike(tiny_dir) -> None:
    loaded = load_checkpoint(tiny_dir, device="cpu", dtype="float32")
    quantize_model(loaded.model)
    prompts = PROMPTS[:3]

    async def body(engine):
        alone = [(await result(submit(engine, loaded, p, greedy(12)))).text for p in prompts]
        together = await asyncio.gather(*(result(submit(engine, loaded, p, greedy(12))) for p in prompts))
        return alone, [c.text for c in together]

    alone, together = run(loaded, body)
    assert all(alone) and alone == together


@pytest.mark.usefixtures("pytorch_products")
def test_bfloat16_packs_only_where_onednn_can(
    tiny_dir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """bfloat16 weights go to oneDNN only on CPUs it packs them for (AVX512-BF16 class); elsewhere
    (this AVX2 machine) the lean step keeps them dense instead of failing, and warns that they
    are slow there."""
    monkeypatch.setattr(packed_module, "MIN_HIDDEN_SIZE", 0)  # the tiny model is too narrow otherwise
    model = load_checkpoint(tiny_dir, device="cpu", dtype="bfloat16").model
    with torch.inference_mode():
        before = model(input_ids=IDS).logits
        shape = KvShape.of(model)
        cache = PagedKVCache(shape.num_layers, 64 * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, "cpu")
        decoder = LeanDecoder(model, cache, BLOCK)
        after = model(input_ids=IDS).logits
    assert decoder.packed == packing_available(torch.bfloat16)
    assert torch.allclose(before.float(), after.float(), atol=3e-2, rtol=3e-2)
    warned = any("bfloat16 weights on this CPU have no fast product" in r.getMessage() for r in caplog.records)
    assert warned == (not packing_available(torch.bfloat16))


def test_quantization_is_checked_against_the_engine() -> None:
    check_quantization("native", "int8")
    check_quantization("native", "int8", quantize_head=True)
    for backend, method in (("native", None), ("vllm", "fp8")):
        with pytest.raises(StartupError, match="--quantize-head is for --quantization int8"):
            check_quantization(backend, method, quantize_head=True)
    check_quantization("vllm", "fp8")
    check_quantization("vllm", None)
    with pytest.raises(StartupError, match="int8 is not available on the vllm engine"):
        check_quantization("vllm", "int8")
    with pytest.raises(StartupError, match="fp8 is not available on the native engine"):
        check_quantization("native", "fp8")


def test_server_refuses_fp8_on_the_native_engine(tiny_dir) -> None:
    argv = [sys.executable, "api.py", "--model-path", str(tiny_dir), "--device", "cpu", "--engine", "native"]
    out = subprocess.run(
        [*argv, "--quantization", "fp8", "--port", "6399"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0 and "fp8 is not available on the native engine" in out.stderr


def test_server_serves_int8(start_server, tiny_dir) -> None:
    server = start_server("--model-path", tiny_dir, "--device", "cpu", "--quantization", "int8")
    body = {"prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    tags = requests.get(server.url + "/api/tags", timeout=30).json()["models"][0]
    assert tags["details"]["quantization_level"] == "INT8"
    assert "int8 weights" in server.log() and "quantizing" in server.log()  # quantized as read
    # not quantized without --quantize-head; in bfloat16 where our CPU kernels read it (quantized.table_in)
    assert f"output head in torch.{'bfloat16' if cpu_products() else 'float32'}" in server.log()
