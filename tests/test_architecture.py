"""Our own MiniCPM module tree (model/architecture.py) computes what transformers' Granite
computes on the same weights, over the paged KV pool as the engine drives it; and the native
engine on CPU runs without importing transformers' modelling code (the start-up time it saves)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from minicpm_server.engine.native.blocks import BlockPool, blocks_for
from minicpm_server.engine.native.budget import KvShape
from minicpm_server.engine.native.paged import PagedForward, PagedKVCache, prefill_layout
from minicpm_server.model.architecture import MiniCPMForCausalLM, model_config
from minicpm_server.model.checkpoint import inspect_checkpoint, load_checkpoint
from tests.harness import PROMPTS, REPO, greedy, result, run, submit

BLOCK = 16
IMPLEMENTATIONS = ("minicpm", "transformers")


def paged_pair(path, dtype: str) -> list[PagedForward]:
    """The same checkpoint through each module tree, each over a KV pool with the same contents."""
    forwards = []
    for implementation in IMPLEMENTATIONS:
        model = load_checkpoint(path, device="cpu", dtype=dtype, implementation=implementation).model
        shape = KvShape.of(model)
        cache = PagedKVCache(
            shape.num_layers, 64 * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device
        )
        generator = torch.Generator().manual_seed(0)
        for pool in (*cache.keys, *cache.values):  # a cached prefix's keys and values: the same random numbers
            pool.copy_(torch.randn(pool.shape, generator=generator))
        cache.zero_null_block(BLOCK)
        forwards.append(PagedForward(model, cache))
    assert isinstance(forwards[0].model, MiniCPMForCausalLM)
    assert type(forwards[1].model).__name__ == "GraniteForCausalLM"
    return forwards


def prefill_inputs(vocab: int, cached: list[int], new: list[int]):
    """Rows computing `new[b]` tokens after `cached[b]` cached ones, left-padded as the runner pads them."""
    pool = BlockPool(64, BLOCK, prefix_caching=False)
    tables = [pool.reserve([0], c + n).table for c, n in zip(cached, new, strict=True)]
    width = blocks_for(256, BLOCK)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    cached_t, new_t = torch.tensor(cached), torch.tensor(new)
    queries = max(new)
    ids = torch.randint(3, vocab, (len(new), queries), generator=torch.Generator().manual_seed(1))
    offsets = torch.arange(queries)[None, :] - (queries - new_t)[:, None]
    positions = (cached_t[:, None] + offsets).clamp(min=0)
    return ids, positions, prefill_layout(table, cached_t, new_t, BLOCK)


@pytest.mark.parametrize(
    ("fixture", "dtype"), [("tiny_dir", "float32"), ("gqa_dir", "float32"), ("tiny_dir", "bfloat16")]
)
def test_prefill_over_the_paged_cache_matches_transformers(request, fixture: str, dtype: str) -> None:
    ours, theirs = paged_pair(request.getfixturevalue(fixture), dtype)
    tolerance = 1e-4 if dtype == "float32" else 3e-2
    vocab = ours.model.config.vocab_size
    with torch.inference_mode():
        # ragged rows, cached prefixes of 0, 5 and 20 tokens (one reuses past a block boundary)
        inputs = prefill_inputs(vocab, cached=[0, 5, 20], new=[9, 3, 14])
        expected = theirs(*inputs, logits_to_keep=1).logits
        got = ours(*inputs, logits_to_keep=1).logits
        assert got.shape == expected.shape == (3, 1, vocab)
        assert torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
        if dtype == "float32":
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
        for mine, reference in zip(ours.cache.keys, theirs.cache.keys, strict=True):  # the same slots written
            assert torch.allclose(mine.float(), reference.float(), atol=tolerance, rtol=tolerance)
        # prompt scoring reads every position's hidden state, then the head
        hidden, reference_hidden = ours.hidden(*inputs), theirs.hidden(*inputs)
        assert torch.allclose(hidden.float(), reference_hidden.float(), atol=tolerance, rtol=tolerance)
        assert torch.allclose(
            ours.head(hidden).float(), theirs.head(reference_hidden).float(), atol=tolerance, rtol=tolerance
        )


def test_the_forward_without_a_cache_is_causal(tiny_dir) -> None:
    """Alone (as tests and benchmarks call it), a prompt's logits do not depend on later tokens."""
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.inference_mode():
        whole = model(ids).logits
        first_half = model(ids[:, :3]).logits
    assert torch.allclose(whole[:, :3], first_half, atol=1e-5, rtol=1e-5)


def test_a_malformed_call_is_refused(tiny_dir) -> None:
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32").model
    ids = torch.tensor([[1, 5, 9]])
    with pytest.raises(ValueError, match="4-D boolean"):
        model(ids, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="needs attention_mask and position_ids"):
        model(ids, cache=object())


def test_config_mapping_matches_transformers_granite_config(tiny_dir) -> None:
    """The one mapping from MiniCPM's config.json, read by both module trees."""
    from minicpm_server.model.checkpoint import granite_config

    raw = inspect_checkpoint(tiny_dir).config
    ours, theirs = model_config(raw), granite_config(raw)
    for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "embedding_multiplier",
        "residual_multiplier", "logits_scaling", "attention_multiplier", "tie_word_embeddings",
    ):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.head_dim == theirs.hidden_size // theirs.num_attention_heads


def test_engine_answers_equal_through_either_module_tree(tiny_dir) -> None:
    """Greedy answers through the whole engine, alone and batched, whichever tree runs the prefill."""

    def answers(implementation: str):
        loaded = load_checkpoint(tiny_dir, device="cpu", dtype="float32", implementation=implementation)

        async def body(engine):
            alone = [(await result(submit(engine, loaded, p, greedy(24)))).text for p in PROMPTS]
            together = await asyncio.gather(*(result(submit(engine, loaded, p, greedy(24))) for p in PROMPTS))
            return alone, [c.text for c in together]

        return run(loaded, body)

    assert answers("minicpm") == answers("transformers")


LOADS_WITHOUT_TRANSFORMERS = """
import os, sys
import minicpm_server.api.app  # the HTTP side, imported before the model loads
from minicpm_server.api.service import warm_up
from minicpm_server.engine import create_engine
from minicpm_server.model.checkpoint import preflight
from minicpm_server.settings import parse_settings

settings = parse_settings(["--model-path", sys.argv[1], "--device", "cpu"])
engine = create_engine(settings, preflight(settings.model_path, settings.device))
engine.start()
warm_up(engine)  # what the server does before it says ready
print("imported:", sorted(m for m in sys.modules if m.startswith(("transformers", "torch._dynamo"))), flush=True)
os._exit(0)
"""


def test_the_cpu_engine_never_imports_transformers(tiny_dir) -> None:
    """What makes the CPU server ready seconds sooner: building the native engine on CPU (load,
    KV pool, lean step, warm-up) imports nothing of transformers."""
    done = subprocess.run(
        [sys.executable, "-c", LOADS_WITHOUT_TRANSFORMERS, str(tiny_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported: []" in done.stdout, done.stdout
