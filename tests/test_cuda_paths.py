"""The native engine's CUDA-only branches, run on this CPU where a real part can run and faked
where none can (no GPU here; tests/test_gpu.py runs them for real when one is lent). Each test
names the branch; docs/architecture.md lists them all and where each is covered.

* A stand-in device: the decode step's forward pass and the sampler run on PyTorch's `meta`
  device, which has shapes and dtypes but no data. A tensor made on the CPU by mistake (a
  missing `device=`) meets a meta tensor and raises, as it would meet a CUDA one, and reading a
  value back to the host raises too. PyTorch's FakeTensorMode with CUDA tensors was tried first:
  on a CPU-only torch build it cannot even index a fake CUDA tensor.
* The KV budget from free GPU memory runs with `torch.cuda.mem_get_info` faked.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from minicpm_server.engine.native import budget
from minicpm_server.engine.native.budget import GIB, KvShape, pool_blocks
from minicpm_server.engine.native.compiled import compile_options
from minicpm_server.engine.native.engine import _use_sdpa
from minicpm_server.engine.native.mixed import MixedStep, prompt_part
from minicpm_server.engine.native.paged import PagedKVCache, block_decode_layout
from minicpm_server.engine.native.runner import DecodeForward, ModelRunner
from minicpm_server.engine.native.sampling import BatchSampling, draw_tokens
from minicpm_server.engine.protocol import SamplingParams
from minicpm_server.exceptions import StartupError
from minicpm_server.model.architecture import empty_minicpm, model_config
from minicpm_server.model.checkpoint import (
    attention_implementation,
    granite_config,
    load_checkpoint,
    model_implementation,
)

BLOCK = 16
META = torch.device("meta")


def meta_decoder(path, *, lean: bool, implementation: str = "transformers") -> DecodeForward:
    """The tiny checkpoint's shape on the meta device (no weights read), with its KV pool; the
    module tree transformers' Granite (the CUDA default) or our own MiniCPM (--model-impl minicpm)."""
    from transformers import GraniteForCausalLM

    checkpoint_config = json.loads((path / "config.json").read_text())
    if implementation == "minicpm":
        model = empty_minicpm(model_config(checkpoint_config), torch.float32).eval()
    else:
        config = granite_config(checkpoint_config)
        config._attn_implementation = "sdpa"
        with META:
            model = GraniteForCausalLM(config).eval()
    shape = KvShape.of(model)
    blocks = 32
    cache = PagedKVCache(shape.num_layers, blocks * BLOCK + 1, shape.kv_heads, shape.head_dim, shape.dtype, META)
    return DecodeForward(
        model, cache, block_size=BLOCK, scratch_slot=blocks * BLOCK, max_batch=4, context_window=256,
        compile=False, lean=lean,
    )  # fmt: skip


SAMPLING_MIXES = [
    [SamplingParams(max_new_tokens=4, temperature=0.5, top_p=0.8, repetition_penalty=1.02)] * 3,  # nucleus
    [
        SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1.0, min_p=0.1, presence_penalty=0.3),
        SamplingParams(max_new_tokens=4, top_k=20, frequency_penalty=0.2),
        SamplingParams(max_new_tokens=4, do_sample=False),
    ],
    [SamplingParams(max_new_tokens=4, do_sample=False)] * 3,
]


@pytest.mark.parametrize(
    ("lean", "implementation"),
    [(True, "transformers"), (False, "transformers"), (False, "minicpm")],
    ids=["lean", "transformers", "minicpm-forward"],
)
def test_the_decode_step_keeps_every_tensor_on_the_models_device(tiny_dir, lean: bool, implementation: str) -> None:
    """Branch: any device other than the CPU (no oneDNN packing, the fused weight layout, the
    step's layout and sampling tensors made on the model's device), through either module tree."""
    decoder = meta_decoder(tiny_dir, lean=lean, implementation=implementation)
    assert (decoder.lean is not None) == lean
    with torch.inference_mode():
        last = torch.zeros(3, dtype=torch.long, device=META)
        lengths = torch.full((3,), 20, dtype=torch.long, device=META)
        table = torch.zeros(3, 16, dtype=torch.long, device=META)
        logits = decoder(last, lengths, table, 21)
        assert logits.device == META and logits.shape == (3, decoder.model.config.vocab_size)
        vocab = logits.shape[-1]
        for params in SAMPLING_MIXES:
            sampling = BatchSampling.build(params, [None] * 3, META)
            seen = torch.zeros(3, vocab, dtype=torch.bool, device=META)
            counts = torch.zeros(3, vocab, dtype=torch.int32, device=META)
            for guess in (True, False):  # the candidates' shortcut guessed, then the full sort
                sampling.nucleus_fits = [guess] * 3
                draw = draw_tokens(logits.float(), seen, sampling, torch.Generator(), counts)
                assert draw.tokens.device == META
                if draw.exact is not None:
                    assert draw.exact().device == META


def test_the_mixed_prefill_pass_keeps_every_tensor_on_the_models_device(tiny_dir) -> None:
    """The same for newcomers' prompts computed in the decode pass (mixed.py), with and without
    running rows, after a cached prefix and from scratch."""
    decoder = meta_decoder(tiny_dir, lean=True)
    assert decoder.lean is not None
    mixed = MixedStep(decoder.lean)
    with torch.inference_mode():
        table = torch.arange(1, 17, device=META)
        prompts = [
            prompt_part(torch.zeros(n, dtype=torch.long, device=META), table, cached, BLOCK, META)
            for n, cached in ((7, 0), (20, 32))
        ]
        lengths = torch.full((2,), 20, dtype=torch.long, device=META)
        layout = block_decode_layout(torch.zeros(2, 16, dtype=torch.long, device=META), lengths, 21, BLOCK)
        last = torch.zeros(2, dtype=torch.long, device=META)
        running, first = mixed(last, lengths, layout, prompts)
        assert running.shape[0] == 2 and first.shape[0] == 2 and first.device == running.device == META
        empty = last[:0]
        running, first = mixed(empty, empty, None, prompts[:1])
        assert running.shape[0] == 0 and first.shape[0] == 1 and first.device == META


def test_a_cpu_tensor_in_the_step_is_caught() -> None:
    """What the meta device stands in for: mixing devices fails loudly, as it does on CUDA."""
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros(3, device=META) + torch.zeros(3)


def test_kv_budget_from_free_gpu_memory(monkeypatch) -> None:
    """Branch: on CUDA without --kv-cache-gb, the pool is the free memory after the weights times
    --gpu-memory-utilization, less one step's gathered keys and values."""
    shape = KvShape(num_layers=40, kv_heads=36, head_dim=64, dtype=torch.bfloat16)
    free = 20 * GIB
    asked: list[torch.device] = []

    def mem_get_info(device):
        asked.append(device)
        return free, 24 * GIB

    monkeypatch.setattr(budget.torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda", 0)
    blocks, source = pool_blocks(shape, cuda, block_size=16, context_window=4096, max_batch=32)
    gather = 2 * 32 * 4096 * 36 * 64 * 2
    assert asked == [cuda]
    assert blocks == (int(free * 0.9) - gather) // (shape.bytes_per_token * 16) + 1
    assert "0.9 of the 20.0 GiB free" in source
    free = 1 * GIB  # a pool below one context window is refused with what to change
    with pytest.raises(StartupError, match="gpu-memory-utilization"):
        pool_blocks(shape, cuda, block_size=16, context_window=4096, max_batch=32)


def test_idle_release_empties_the_cuda_cache(monkeypatch) -> None:
    """Branch: the runner's release of cached memory calls torch.cuda.empty_cache on CUDA only
    (the engine's idle and failure paths that call it run on CPU in test_engine/test_faults)."""
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    ModelRunner.release_cached_memory(types.SimpleNamespace(device=torch.device("cuda", 0)))  # type: ignore[arg-type]
    ModelRunner.release_cached_memory(types.SimpleNamespace(device=torch.device("cpu")))  # type: ignore[arg-type]
    assert calls == [1]


def test_compile_records_cuda_graphs_on_cuda() -> None:
    """Branch: --compile on CUDA is reduce-overhead (CUDA graphs) with static shapes; on CPU one
    dynamic graph (test_compiled runs that one)."""
    assert compile_options(torch.device("cuda", 0)) == {"mode": "reduce-overhead", "dynamic": False}
    assert compile_options(torch.device("cpu")) == {"dynamic": True}


def test_flash_attention_is_chosen_on_cuda_and_the_engine_switches_it_to_sdpa(tiny_dir, monkeypatch) -> None:
    """Branch: checkpoint loading picks FlashAttention-2 on CUDA in half precision when flash-attn
    is installed; the native engine then switches the model to SDPA (the paged cache's 4-D mask)."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    cuda = torch.device("cuda", 0)
    assert attention_implementation(cuda, torch.bfloat16) == "flash_attention_2"
    assert attention_implementation(cuda, torch.float32) == "sdpa"
    assert attention_implementation(torch.device("cpu"), torch.bfloat16) == "sdpa"
    monkeypatch.undo()
    assert model_implementation("auto", cuda) == "transformers"  # our own MiniCPM has only SDPA
    model = load_checkpoint(tiny_dir, device="cpu", dtype="float32", implementation="transformers").model
    switched: list[str] = []
    model.config._attn_implementation = "flash_attention_2"
    monkeypatch.setattr(model, "set_attn_implementation", switched.append)
    _use_sdpa(model)
    assert switched == ["sdpa"]
