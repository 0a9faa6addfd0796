"""How many tokens of KV the native engine may hold: the size of its block pool, fixed at start-up.

* `--kv-cache-gb`, when given, is the pool's size in GiB on any device.
* On CUDA otherwise: the memory free once the weights are loaded, times `--gpu-memory-utilization`,
  less what one decode step needs beside the pool (each layer gathers its rows' keys and values
  into a dense tensor for attention, one layer at a time). The rest of the free memory is left
  for activations and PyTorch's allocator.
* On CPU otherwise: 2 GiB, or one full context window when that is more, so a request the window
  allows always fits (engine/base.py's rule, which the vLLM backend follows too). Pages are touched only when written, so an idle pool
  costs no RAM.

A pool smaller than one context window could never admit a request the window allows, so that
is refused at start-up with what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm_server.engine.base import GIB, default_cpu_kv_bytes
from minicpm_server.engine.native.blocks import blocks_for
from minicpm_server.exceptions import StartupError


@dataclass(frozen=True)
class KvShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> KvShape:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # the dtype the model computes in: its final norm's (the first parameter, the embedding
        # table, may be bfloat16 in a float32 model under int8: quantized.table_in)
        norm = getattr(getattr(model, "model", None), "norm", None)
        dtype = norm.weight.dtype if norm is not None else next(model.parameters()).dtype
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def pool_blocks(
    shape: KvShape,
    device: torch.device,
    *,
    block_size: int,
    context_window: int,
    max_batch: int,
    kv_cache_gb: float | None = None,
    gpu_memory_utilization: float = 0.9,
) -> tuple[int, str]:
    """Blocks in the pool (the null block included) and a phrase saying where the size came from."""
    if kv_cache_gb is not None:
        budget, source = int(kv_cache_gb * GIB), f"--kv-cache-gb {kv_cache_gb:g}"
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gather = 2 * max_batch * context_window * shape.kv_heads * shape.head_dim * shape.dtype.itemsize
        budget = int(free * gpu_memory_utilization) - gather
        source = f"{gpu_memory_utilization:g} of the {free / GIB:.1f} GiB free after the weights"
    else:
        window_bytes = context_window * shape.bytes_per_token
        budget = default_cpu_kv_bytes(window_bytes)
        source = "CPU default" if budget > window_bytes else "one context window (more than the 2 GiB CPU default)"
    blocks = budget // (shape.bytes_per_token * block_size)
    needed = blocks_for(context_window, block_size)
    if blocks < needed:
        raise StartupError(
            f"the KV cache ({source}) holds {blocks * block_size} tokens, less than one context window "
            f"({context_window} tokens, {needed * block_size * shape.bytes_per_token / GIB:.2f} GiB): raise "
            "--kv-cache-gb or --gpu-memory-utilization, or lower --max-model-len"
        )
    return blocks + 1, source
