"""Our own CPU matrix products (engine/native/kernels): built with the system's compiler, equal
to PyTorch's products within float rounding, independent of the batch and the thread count, and
what the lean decoder computes with on CPU, without copying a weight."""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from minicpm_server.engine import half_weights, linear_form
from minicpm_server.engine.native import kernels
from minicpm_server.engine.native.budget import KvShape
from minicpm_server.engine.native.kernels import CAPABLE, KernelLinear, KernelProjection, cpu_products
from minicpm_server.engine.native.lean import LeanDecoder
from minicpm_server.engine.native.packed import DeferredPacking
from minicpm_server.engine.native.paged import PagedKVCache
from minicpm_server.engine.native.quantized import Int8Embedding, Int8Linear, fuse, weight_bytes, weights_in
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.loading import LinearForm
from minicpm_server.settings import Settings
from tests.harness import PROMPTS, greedy, result, run, submit

BLOCK = 16
buildable = shutil.which("g++") is not None and torch.backends.cpu.get_cpu_capability() in CAPABLE
needs_kernels = pytest.mark.skipif(not buildable, reason="needs g++ and an AVX2 CPU")


def test_kernels_build_wherever_they_can() -> None:
    """Where g++ and AVX2 are present the kernels must build and pass their own check: a build
    that broke would otherwise only show as slower products."""
    if buildable:
        assert cpu_products() is not None
    else:
        assert cpu_products() is None


@functools.cache
def build_for(isa: str) -> kernels.CpuProducts | None:
    return kernels.load_products(isa)


# Every build this CPU runs (AVX-512 and AVX2 on an AVX-512 CPU): the one not chosen by
# cpu_products() must stay right too, for the machines where it is the best.
@pytest.fixture(params=kernels.isas_here() if buildable else ["none"])
def products(request) -> kernels.CpuProducts:
    built = build_for(request.param) if buildable else None
    assert built is not None, f"the {request.param} build failed here"
    return built


def test_the_best_build_is_chosen() -> None:
    if buildable:
        assert cpu_products().isa == kernels.isas_here()[0]


def reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    dense = weight.double() if scales is None else weight.double() * scales.double()[:, None]
    return (x.double() @ dense.t()).float()


def stored(dtype: torch.dtype, out: int, inner: int, generator: torch.Generator):
    weight = torch.randn(out, inner, generator=generator)
    if dtype == torch.int8:
        return torch.randint(-127, 128, (out, inner), generator=generator, dtype=torch.int8), torch.rand(out) / 50
    return weight.to(dtype), None


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize(("out", "inner"), [(1, 8), (5, 16), (33, 64), (122, 2304)])
def test_products_equal_pytorchs(products, dtype: torch.dtype, out: int, inner: int) -> None:
    generator = torch.Generator().manual_seed(out * inner)
    weight, scales = stored(dtype, out, inner, generator)
    for rows in (0, 1, 2, 3, 4, 5, 6, 7, 16, 17):  # every group shape and tail: 6s or 3s, 2 + 2, 2, 1
        x = torch.randn(rows, inner, generator=generator)
        got = products.linear(x, weight, scales)
        assert got.shape == (rows, out) and got.dtype == torch.float32
        expected = reference(x, weight, scales)
        largest = expected.abs().max().item() if rows else 0.0
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * (1 + largest))


@needs_kernels
def test_a_rows_result_does_not_depend_on_the_batch_or_the_threads(products) -> None:
    """Each output is summed by one thread in one order: alone, in any batch, with one thread or
    two, a row's result is the same to the bit (what lets a request's answer not depend on the
    others running beside it)."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(301, 512, generator=generator)
    batch = torch.randn(11, 512, generator=generator)
    alone = torch.cat([products.linear(batch[i : i + 1], weight) for i in range(11)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = products.linear(batch, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(products.linear(batch, weight), alone)
    assert torch.equal(one_thread, alone)


@needs_kernels
def test_bad_operands_are_refused_not_read() -> None:
    products = cpu_products()
    with pytest.raises(ValueError, match="features"):
        products.linear(torch.ones(2, 16), torch.ones(4, 8))
    with pytest.raises(ValueError, match="scales"):
        products.linear(torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8))
    assert not products.supports(torch.ones(4, 12))  # not a multiple of 8 wide
    assert not products.supports(torch.ones(8, 4).t())  # not row-major
    assert not products.supports(torch.ones(4, 8, dtype=torch.float16))


def test_a_failed_build_falls_back_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    """No working compiler: the engine hears why once and keeps PyTorch's products."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    kernels._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="minicpm_server.engine.native.kernels"):
            products = cpu_products()
        assert products is None
        if torch.backends.cpu.get_cpu_capability() in CAPABLE:
            assert "unavailable" in caplog.text and "false exited with" in caplog.text
    finally:
        kernels._load.cache_clear()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_long_prompts_products_are_taken_in_blocks_and_pieces_to_the_same_bits(products, dtype) -> None:
    """Inputs too many for the cache (300 rows of 1,032: 1.2 MB) go through the weights in blocks
    and through the inputs in pieces of 1,024 (the last one 8 wide, a half register for
    AVX-512), keeping partial sums between pieces: each row's result is still the one it gets
    alone, in either layout, and PyTorch's within rounding."""
    generator = torch.Generator().manual_seed(300)
    inner = 1032 if dtype == torch.float32 else 1024 + kernels.TILE_BLOCK[dtype]
    weight, scales = stored(dtype, 68, inner, generator)
    x = torch.randn(300, inner, generator=generator)
    got = products.linear(x, weight, scales)
    expected = reference(x, weight, scales)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))
    for i in (0, 5, 6, 7, 299):
        assert torch.equal(products.linear(x[i : i + 1], weight, scales)[0], got[i])
    if dtype != torch.float32:
        assert torch.equal(products.linear(x, kernels.tiled(weight), scales), got)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "dim"), [(36, 36, 64), (4, 2, 32), (2, 1, 40)])
def test_decode_attention_reads_the_block_pool_as_pytorchs_attention_reads_a_copy(
    products, dtype, q_heads: int, kv_heads: int, dim: int
) -> None:
    """Each row's query against its visible tokens, wherever its blocks lie in the pool (out of
    order, shared, past its table the null block): PyTorch's attention on a gathered copy within
    rounding, and each row's result the one it gets alone."""
    block, rows = 16, 5
    generator = torch.Generator().manual_seed(q_heads * dim)
    keys = torch.randn(40 * block, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(40 * block, kv_heads, dim, generator=generator).to(dtype)
    tables = torch.stack([torch.randperm(39, generator=generator)[:9] + 1 for _ in range(rows)])
    tables[1, :] = tables[0, :]  # two rows sharing a prefix's blocks
    visible = torch.tensor([1, 17, 144, 33, 100])
    tables[0, 1:] = 0  # the null block past a short row's table
    q = torch.randn(rows, q_heads, dim, generator=generator)
    got = products.decode_attention(q, keys, values, tables, block, visible, 0.2)
    for r in range(rows):
        slots = (tables[r, :, None] * block + torch.arange(block)).reshape(-1)[: int(visible[r])]
        k, v = (t[slots].float().transpose(0, 1) for t in (keys, values))
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[r].view(kv_heads, q_heads // kv_heads, dim), k, v, scale=0.2
        ).reshape(q_heads, dim)
        assert torch.allclose(got[r], expected, rtol=1e-4, atol=1e-5)
        alone = products.decode_attention(q[r : r + 1], keys, values, tables[r : r + 1], block, visible[r : r + 1], 0.2)
        assert torch.equal(alone[0], got[r])
    with pytest.raises(ValueError, match="do not match"):
        products.decode_attention(q, keys, values, tables, block, visible[:2], 0.2)
    assert not products.attention_supports(keys.half(), dim)


@needs_kernels
def test_the_lean_step_attends_from_the_pool_without_gathering(tiny_dir, monkeypatch) -> None:
    """With the kernels, the engine's decode steps read the block pool in place (nothing is
    gathered into a dense copy) and answer as the gathering path does without the kernels."""

    def answer(loaded) -> str:
        async def body(engine):
            return (await result(submit(engine, loaded, PROMPTS[0], greedy(8)))).text

        return run(loaded, body)

    kernels.use_cpu_kernels(False)
    try:
        gathered = answer(load_checkpoint(tiny_dir, device="cpu", dtype="float32"))
    finally:
        kernels.use_cpu_kernels(True)

    def refuse(*args, **kwargs):
        raise AssertionError("the lean step gathered the pool")

    monkeypatch.setattr(PagedKVCache, "gather_blocks", refuse)
    loaded = load_checkpoint(tiny_dir, device="cpu", dtype="float32")
    assert lean_decoder(loaded.model).attention is not None
    assert answer(loaded) == gathered


@needs_kernels
def test_a_build_is_cached_by_its_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = kernels.build()
    assert first.is_file() and first.parent == tmp_path / "minicpm-server" / "kernels"
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert list(first.parent.iterdir()) == [first]  # no staging left behind


def test_the_switch_turns_them_off() -> None:
    kernels.use_cpu_kernels(False)
    try:
        assert cpu_products() is None
    finally:
        kernels.use_cpu_kernels(True)


def lean_decoder(model) -> LeanDecoder:
    shape = KvShape.of(model)
    cache = PagedKVCache(shape.num_layers, 64 * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device)
    return LeanDecoder(model, cache, BLOCK)


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_decoder_computes_with_the_kernels_on_the_weights_as_stored(tiny_dir, dtype: str) -> None:
    """Every linear layer becomes a KernelLinear over its own weight (nothing fused, nothing
    copied), q/k/v and gate/up are projections over those layers, the output head reads the
    embedding table itself, and transformers' forward (the prefill) computes the same logits
    through them."""
    model = load_checkpoint(tiny_dir, device="cpu", dtype=dtype).model
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    table = model.model.embed_tokens.weight
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    addresses = [m.weight.data_ptr() for m in (attention.q_proj, attention.k_proj, attention.v_proj)]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        held = weight_bytes(model)
        lean = lean_decoder(model)
        after = model(input_ids=ids).logits
    assert lean.kernels and not lean.packed
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    parts = [attention.q_proj, attention.k_proj, attention.v_proj]
    assert isinstance(lean.layers[0].qkv, KernelProjection) and lean.layers[0].qkv.parts == parts
    assert all(isinstance(m, KernelLinear) for m in parts)
    assert [m.weight.data_ptr() for m in parts] == addresses  # the weights where they were
    assert isinstance(mlp.down_proj, KernelLinear) and lean.layers[0].down is mlp.down_proj
    assert isinstance(model.lm_head, KernelLinear) and lean.lm_head is model.lm_head
    assert model.lm_head.weight is table  # the tied table itself
    assert weight_bytes(model) == held  # no weight held twice
    tolerance = 1e-4 if dtype == "float32" else 3e-2
    assert torch.allclose(before.float(), after.float(), atol=tolerance, rtol=tolerance)
    if dtype == "float32":
        assert torch.equal(before.argmax(-1), after.argmax(-1))
    again = lean_decoder(model)  # a second decoder on the same model keeps the same layers
    assert again.kernels and again.layers[0].qkv.parts == parts


@needs_kernels
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mapped_form_leaves_the_matrices_in_the_files_mapping(tiny_dir, caplog) -> None:
    """The form the server loads with where the kernels run: every matrix (linear layers, the
    embedding table) is a view into the checkpoint file's mapping, read where it is; vectors
    (the norms) are copied. The logits equal those of a plain copy."""
    with caplog.at_level(logging.INFO, logger="minicpm_server"):
        mapped = load_checkpoint(tiny_dir, device="cpu", dtype="float32", form=LinearForm("mapped"))
    assert "mapped and read where they are until copied after start-up" in caplog.text
    copied = load_checkpoint(tiny_dir, device="cpu", dtype="float32")
    ranges = [
        [int(bound, 16) for bound in line.split()[0].split("-")]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if str(tiny_dir.resolve()) in line
    ]

    def in_file(tensor: torch.Tensor) -> bool:
        return any(low <= tensor.data_ptr() < high for low, high in ranges)

    model = mapped.model
    layer = model.model.layers[0]
    assert in_file(model.model.embed_tokens.weight) and in_file(layer.self_attn.q_proj.weight)
    assert in_file(layer.mlp.down_proj.weight)
    assert not in_file(layer.input_layernorm.weight)  # copied
    with torch.inference_mode():
        ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
        assert torch.equal(model(input_ids=ids).logits, copied.model(input_ids=ids).logits)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minicpm_server"):
        load_checkpoint(tiny_dir, device="cpu", dtype="bfloat16", form=LinearForm("mapped"))
    assert "weights: " in caplog.text and "mapped" not in caplog.text  # a float32 file converted: copies


@needs_kernels
def test_lean_decoder_without_kernels_when_asked(tiny_dir) -> None:
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    kernels.use_cpu_kernels(False)
    try:
        lean = lean_decoder(model)
    finally:
        kernels.use_cpu_kernels(True)
    assert not lean.kernels
    assert not any(isinstance(m, KernelLinear) for m in model.modules())


@needs_kernels
@pytest.mark.parametrize("inner", [64, 72])
def test_int8_layers_use_the_kernel_with_float32_scales(inner: int) -> None:
    """64 wide: tiled as quantized (kernels.tiled()); 72: not a whole block, left in rows. Switched
    off afterwards, rows go to PyTorch's kernel and tiled weights still to ours."""
    generator = torch.Generator().manual_seed(3)
    layer = Int8Linear.from_weight(torch.randn(40, inner, generator=generator), torch.float32)
    assert layer.scales.dtype == torch.float32  # our kernel keeps them exact; PyTorch's wants bfloat16
    assert layer.tiled == (inner == 64) and layer.dequantized().shape == (40, inner)
    x = torch.randn(5, inner, generator=generator)
    got = layer(x)
    assert torch.allclose(got, x @ layer.dequantized().t(), rtol=1e-4, atol=1e-4)
    kernels.use_cpu_kernels(False)
    try:
        assert torch.allclose(layer(x), got, rtol=1e-4, atol=1e-4)  # PyTorch's kernel, same scales
    finally:
        kernels.use_cpu_kernels(True)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize(("out", "inner"), [(4, 64), (12, 128), (124, 2304)])
def test_the_tiled_layout_gives_the_same_bits(dtype: torch.dtype, out: int, inner: int) -> None:
    """Tiled weights (4 outputs, a cache line of each in turn) are summed in the same order as
    rows: every row count gives the same bits, written into a column slice too."""
    products = cpu_products()
    generator = torch.Generator().manual_seed(out + inner)
    weight, scales = stored(dtype, out, inner, generator)
    tiles = kernels.tiled(weight)
    assert kernels.is_tiled(tiles) and kernels.matrix_shape(tiles) == (out, inner) and products.supports(tiles)
    assert torch.equal(kernels.untiled(tiles), weight)
    for rows in (1, 2, 3, 4, 5, 7, 16):
        x = torch.randn(rows, inner, generator=generator)
        assert torch.equal(products.linear(x, tiles, scales), products.linear(x, weight, scales))
    wide = torch.zeros(rows, out + 3)
    products.linear_into(wide[:, 3:], products.rows(x, inner), tiles, scales)
    assert torch.equal(wide[:, 3:], products.linear(x, weight, scales)) and not wide[:, :3].any()


def test_only_whole_tiles_are_tiled() -> None:
    assert kernels.can_tile(torch.ones(8, 64, dtype=torch.int8))
    assert not kernels.can_tile(torch.ones(6, 64, dtype=torch.int8))  # not a multiple of 4 outputs
    assert not kernels.can_tile(torch.ones(8, 32, dtype=torch.int8))  # not a whole 64-byte block
    assert kernels.can_tile(torch.ones(8, 32, dtype=torch.bfloat16))
    assert not kernels.can_tile(torch.ones(8, 64))  # float32 rows stay rows
    with pytest.raises(ValueError, match="no tiled layout"):
        kernels.tiled(torch.ones(6, 64, dtype=torch.int8))


@needs_kernels
def test_tiled_int8_parts_fuse_and_a_table_read_by_rows_is_not_tiled() -> None:
    generator = torch.Generator().manual_seed(5)
    parts = [Int8Linear.from_weight(torch.randn(rows, 128, generator=generator), torch.float32) for rows in (8, 12)]
    x = torch.randn(3, 128, generator=generator)
    alone = [part(x) for part in parts]
    fused = fuse(parts)
    assert fused.tiled and all(part.tiled for part in parts)
    assert torch.equal(fused(x), torch.cat(alone, dim=-1))
    assert all(torch.equal(part(x), y) for part, y in zip(parts, alone, strict=True))  # slices of the fused
    with pytest.raises(ValueError, match="by rows"):
        Int8Embedding(parts[0])
    table = Int8Linear.from_weight(torch.randn(8, 128, generator=generator), torch.float32, tile=False)
    assert not table.tiled and Int8Embedding(table)(torch.tensor([1, 2])).shape == (2, 128)


@needs_kernels
def test_bfloat16_layers_are_tiled_after_start_up(tiny_dir, caplog) -> None:
    """bfloat16 layers start in rows (converted from the float32 file as read) and are laid out
    in tiles between steps (DeferredPacking); the tied head stays the embedding table, in rows.
    The logits do not move by a bit."""
    model = load_checkpoint(tiny_dir, device="cpu", dtype="bfloat16").model
    lean = lean_decoder(model)
    layers = [m for m in model.modules() if isinstance(m, KernelLinear)]
    waiting = [layer for layer in layers if not layer.is_packed]
    assert len(waiting) == 7 * len(model.model.layers) and model.lm_head not in waiting
    assert "tiled layout" in waiting[0].SETTLED
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        packing = DeferredPacking(layers)
        with caplog.at_level(logging.INFO, logger="minicpm_server"):
            while packing.pack_next():
                pass
        after = model(input_ids=ids).logits
    assert f"copied {len(waiting)} weight matrices into our kernels' tiled layout" in caplog.text
    assert all(layer.is_packed for layer in layers)
    assert kernels.is_tiled(model.model.layers[0].mlp.down_proj.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dim() == 2
    assert torch.equal(before, after)
    assert lean.kernels


@needs_kernels
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_engine_copies_mapped_weights_after_its_first_step(tiny_dir) -> None:
    """Served from the mapping at first, the weights are copied into memory of our own one
    matrix at a time after the warm-up (DeferredPacking): the tied table once, for the head and
    the embedding both, answers the same throughout, and no mapping of the file left."""
    loaded = load_checkpoint(tiny_dir, device="cpu", dtype="float32", form=LinearForm("mapped"))

    async def body(engine):
        packing = engine.runner.packing
        assert packing.total == 7 * len(loaded.model.model.layers) + 1  # and the tied table, last
        assert packing.order[-1] is loaded.model.lm_head
        first = await result(submit(engine, loaded, PROMPTS[0], greedy(6)))
        deadline = time.monotonic() + 300
        while packing.left and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        second = await result(submit(engine, loaded, PROMPTS[0], greedy(6)))
        return first.text, second.text, packing.left

    first, second, left = run(loaded, body)
    assert left == 0 and first == second
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one table
    assert str(tiny_dir.resolve()) not in Path("/proc/self/maps").read_text()


@needs_kernels
def test_bfloat16_weights_in_a_float32_model(tiny_dir) -> None:
    """--dtype bfloat16 on CPU with the kernels: the linear layers and the tied table are
    bfloat16, read as converted from the float32 file; norms, activations and the KV cache are
    float32. The logits are a float32 model's on the same bfloat16-rounded weights, and a loaded
    model converted with weights_in() gives the same bits."""
    settings = Settings(model_path=tiny_dir, device="cpu", dtype="bfloat16")
    form = linear_form(settings, "cpu")
    assert half_weights(settings, "cpu") and form.kind == "kernel" and form.later
    assert not half_weights(settings.model_copy(update={"quantization": "int8"}), "cpu")
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32", form=form).model
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, KernelLinear) and layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert not layer.self_attn.q_proj.is_packed  # tiled by the engine after start-up
    assert layer.input_layernorm.weight.dtype == torch.float32 and KvShape.of(model).dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.bfloat16
    rounded = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear):  # the head is the tied table
                module.weight.copy_(module.weight.bfloat16().float())
    converted = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    weights_in(converted, torch.bfloat16)
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        assert logits.dtype == torch.float32
        assert torch.allclose(logits, rounded(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(logits, converted(input_ids=ids).logits)
        packing = DeferredPacking([m for m in model.modules() if isinstance(m, KernelLinear)])
        while packing.pack_next():
            pass
        assert kernels.is_tiled(layer.mlp.down_proj.weight)
        assert torch.equal(model(input_ids=ids).logits, logits)


@needs_kernels
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_bfloat16_layers_are_served_from_a_bfloat16_files_mapping(tmp_path) -> None:
    """A bfloat16 safetensors checkpoint (download.py --convert bf16-safetensors) with --dtype
    bfloat16: the linear layers and the tied table compute from the file's mapping, no copy at
    load (as llama.cpp serves a BF16 GGUF), until the engine tiles (or, the table, copies) them
    after start-up; the logits equal a copy made at load, before and after, and nothing of the
    file stays mapped."""
    from minicpm_server.model.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(
        tmp_path / "MiniCPM-bf16", "tiny", seed=0, dtype=torch.bfloat16, weights_format="safetensors"
    )
    settings = Settings(model_path=path, device="cpu", dtype="bfloat16")
    form = linear_form(settings, "cpu")
    model = load_checkpoint(path, device="cpu", dtype="float32", form=form).model
    copied = load_checkpoint(
        path, device="cpu", dtype="float32", form=LinearForm("kernel", table_dtype=torch.bfloat16)
    ).model
    lean_decoder(model)  # the output head becomes a KernelLinear over the tied table, as in the engine
    layers = [m for m in model.modules() if isinstance(m, KernelLinear)]
    mapped = [layer for layer in layers if getattr(layer.weight, "in_mapping", False)]
    assert len(mapped) == 7 * len(model.model.layers) + 1  # every linear layer, and the tied table
    assert model.lm_head in mapped and model.lm_head.weight is model.model.embed_tokens.weight
    assert str(path.resolve()) in Path("/proc/self/maps").read_text()
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.inference_mode():
        expected = copied(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, expected)
        packing = DeferredPacking(layers)
        while packing.pack_next():
            pass
        assert all(layer.is_packed for layer in layers) and kernels.is_tiled(model.model.layers[0].mlp.down_proj.weight)
        assert torch.equal(model(input_ids=ids).logits, expected)
    del mapped
    assert str(path.resolve()) not in Path("/proc/self/maps").read_text()
