"""The lean decode step computes what transformers' forward computes, on the same weights."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch

from minicpm_server.engine.native import kernels as kernels_module
from minicpm_server.engine.native.blocks import BlockPool, blocks_for
from minicpm_server.engine.native.budget import KvShape
from minicpm_server.engine.native.lean import LeanDecoder
from minicpm_server.engine.native.packed import MIN_HIDDEN_SIZE, PackedLinear, packing_available
from minicpm_server.engine.native.paged import PagedKVCache
from minicpm_server.engine.native.runner import DecodeForward
from minicpm_server.model.checkpoint import load_checkpoint
from tests.harness import PROMPTS, greedy, result, run, submit

BLOCK = 16
needs_kernels = pytest.mark.skipif(
    kernels_module.cpu_products() is None, reason="our CPU kernels are not available here"
)
needs_packing = pytest.mark.skipif(
    not packing_available(), reason="this torch build has no oneDNN packed linear operators"
)


def decoder_pair(path, dtype: str, prepare: Callable[[Any], None] | None = None):
    """Two copies of one checkpoint, each with a KV pool holding the same random context: one
    decodes through transformers' forward, the other through the lean decoder. `prepare` is
    applied to both models first (quantizing them, say)."""
    runners = []
    for lean in (False, True):
        model = load_checkpoint(path, device="cpu", dtype=dtype).model
        if prepare is not None:
            prepare(model)
        shape = KvShape.of(model)
        blocks = 4 * blocks_for(200, BLOCK) + 1
        cache = PagedKVCache(
            shape.num_layers, blocks * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device
        )
        generator = torch.Generator().manual_seed(0)
        for pool in (*cache.keys, *cache.values):
            pool.copy_(torch.randn(pool.shape, generator=generator))
        cache.zero_null_block(BLOCK)
        runner = DecodeForward(
            model,
            cache,
            block_size=BLOCK,
            scratch_slot=blocks * BLOCK,
            max_batch=4,
            context_window=1024,
            compile=False,
            lean=lean,
        )
        runners.append(runner)
    return runners


def step_inputs(rows: int, vocab: int):
    pool = BlockPool(4 * blocks_for(200, BLOCK) + 1, BLOCK, prefix_caching=False)
    tables = [pool.reserve([0], 200)[0] for _ in range(rows)]
    width = blocks_for(1024, BLOCK)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    generator = torch.Generator().manual_seed(rows)
    last = torch.randint(0, vocab, (rows,), generator=generator)
    lengths = torch.randint(1, 180, (rows,), generator=generator)
    return last, lengths, table, int(lengths.max()) + 1


@pytest.mark.parametrize(
    ("fixture", "dtype"), [("tiny_dir", "float32"), ("gqa_dir", "float32"), ("tiny_dir", "bfloat16")]
)
def test_lean_logits_match_transformers(request, fixture: str, dtype: str) -> None:
    """In float32 the two agree to rounding. In bfloat16 each path rounds differently (our
    attention kernel computes in float32 and rounds once; PyTorch's bfloat16 attention rounds on
    the way), so each is held to the float32 computation instead: the lean step must be no
    further from it than transformers' bfloat16 forward is (tiny checkpoint: both about 0.05-0.09
    on the logits and 0.15-0.27 on deeper layers' keys)."""
    path = request.getfixturevalue(fixture)
    eager, lean = decoder_pair(path, dtype)
    assert eager.lean is None and lean.lean is not None
    reference = lean if dtype == "float32" else decoder_pair(path, "float32")[1]
    with torch.inference_mode():
        for rows in (1, 3, 4):  # ragged lengths: rows read different numbers of blocks
            inputs = step_inputs(rows, eager.model.config.vocab_size)
            expected, got, exact = eager(*inputs).float(), lean(*inputs).float(), reference(*inputs).float()
            assert got.shape == expected.shape
            # both wrote this step's keys into the same slots
            slots = inputs[2].gather(1, (inputs[1] // BLOCK)[:, None])[:, 0] * BLOCK + inputs[1] % BLOCK
            if dtype == "float32":
                assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
                assert torch.equal(got.argmax(-1), expected.argmax(-1))
                for a, b in zip(eager.cache.keys, lean.cache.keys, strict=True):
                    assert torch.allclose(a[slots], b[slots], atol=1e-4, rtol=1e-4)
                continue
            assert (got - exact).abs().max() <= 1.25 * (expected - exact).abs().max() + 1e-2
            for a, b, c in zip(eager.cache.keys, lean.cache.keys, reference.cache.keys, strict=True):
                ours, theirs = (b[slots].float() - c[slots]).abs().max(), (a[slots].float() - c[slots]).abs().max()
                assert ours <= 1.25 * theirs + 2e-2


def test_relayout_shares_storage_and_keeps_transformers_forward(tiny_dir) -> None:
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        parameters_before = sum(p.numel() for p in model.parameters())
        shape = KvShape.of(model)
        cache = PagedKVCache(
            shape.num_layers, 64 * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device
        )
        lean = LeanDecoder(model, cache, BLOCK, pack_weights=False, kernels=False)
        after = model(input_ids=ids).logits
    attention = model.model.layers[0].self_attn
    fused = lean.layers[0].qkv.right
    for module in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert module.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: one copy
    assert sum(p.numel() for p in model.parameters()) == parameters_before
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)


@needs_packing
def test_packed_layers_replace_the_weights_and_keep_transformers_forward(tiny_dir) -> None:
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    dense_layer_weights = sum(p.numel() for p in model.model.layers.parameters())
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        shape = KvShape.of(model)
        cache = PagedKVCache(
            shape.num_layers, 64 * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device
        )
        lean = LeanDecoder(model, cache, BLOCK, pack_weights=True)
        after = model(input_ids=ids).logits  # transformers' forward through the packed layers
    assert lean.packed
    first = model.model.layers[0]
    assert isinstance(first.self_attn.q_proj, PackedLinear) and isinstance(first.mlp.down_proj, PackedLinear)
    # the dense copies are gone: only the norms' weights are left as parameters in the layers
    left = sum(p.numel() for p in model.model.layers.parameters())
    assert left == sum(layer.input_layernorm.weight.numel() * 2 for layer in model.model.layers) < dense_layer_weights
    # the output head is a packed copy; the embedding table it was tied to stays dense
    assert isinstance(model.lm_head, PackedLinear) and model.model.embed_tokens.weight.is_contiguous()
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    LeanDecoder(model, cache, BLOCK, pack_weights=True)  # packing a packed model changes nothing
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)


def test_lean_reads_only_finite_memory_after_zeroing(tiny_dir) -> None:
    """Reserved blocks are zeroed: NaN left in a never-written slot past a row's length would
    otherwise turn attention's output into NaN, mask or no mask."""
    _, lean = decoder_pair(tiny_dir, "float32")
    inputs = step_inputs(2, lean.model.config.vocab_size)
    table = inputs[2]
    with torch.inference_mode():
        for pool in (*lean.cache.values, *lean.cache.keys):
            pool.fill_(float("nan"))
        assert torch.isnan(lean(*inputs)).all()  # the control: NaN memory does poison the step
        used = sorted({int(b) for b in table.flatten() if b != 0})
        lean.cache.zero_blocks(used, BLOCK)
        assert torch.isfinite(lean(*inputs)).all()


def test_unsupported_configs_decode_through_transformers(tiny_dir) -> None:
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    assert LeanDecoder.supports(model)
    model.config.mlp_bias = True
    assert not LeanDecoder.supports(model)
    model.config.mlp_bias = False
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "linear"}
    assert not LeanDecoder.supports(model)


@pytest.mark.parametrize(
    "products", ["dense", pytest.param("packed", marks=needs_packing), pytest.param("kernels", marks=needs_kernels)]
)
def test_engine_answers_equal_with_and_without_lean(tiny_dir, monkeypatch: pytest.MonkeyPatch, products: str) -> None:
    """Greedy answers through the whole engine, alone and batched, are the same either way: the
    lean step on PyTorch's dense products, on oneDNN-packed layers, or on our CPU kernels (the
    prefill then also runs on the packed layers or the kernels)."""

    def answers(lean: bool):
        loaded = load_checkpoint(tiny_dir, device="cpu", dtype="float32")

        async def body(engine):
            if lean:  # the tiny model is too narrow to be packed by default
                engine.runner.decode.lean = LeanDecoder(
                    loaded.model, engine.runner.cache, engine.block_size, pack_weights=products == "packed"
                )
            alone = [(await result(submit(engine, loaded, p, greedy(24)))).text for p in PROMPTS]
            together = await asyncio.gather(*(result(submit(engine, loaded, p, greedy(24))) for p in PROMPTS))
            decoder = engine.runner.decode.lean
            chosen = decoder is not None and {"packed": decoder.packed, "kernels": decoder.kernels}.get(
                products, not (decoder.packed or decoder.kernels)
            )
            return alone, [c.text for c in together], chosen

        return run(loaded, body, lean=lean)

    plain_alone, plain_together, _ = answers(False)
    monkeypatch.setattr(kernels_module, "_enabled", products == "kernels")
    alone, together, as_asked = answers(True)
    assert as_asked
    assert alone == plain_alone and together == plain_together


def test_packing_is_chosen_by_width(tiny_dir) -> None:
    """Narrow models (per-call overhead dominates) stay unpacked; wide ones are packed on CPU."""
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    shape = KvShape.of(model)
    cache = PagedKVCache(shape.num_layers, 64 * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device)
    assert model.config.hidden_size < MIN_HIDDEN_SIZE
    assert not LeanDecoder(model, cache, BLOCK).packed
