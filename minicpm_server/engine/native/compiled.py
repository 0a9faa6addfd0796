"""The decode step compiled for a few static shapes (--compile).

Why: a decode step feeds one token per row, so on a deep model with small matrices most of its
time is Python and kernel-launch overhead, not arithmetic (MiniCPM-2B has 40 layers). Compiling
the forward pass fuses that away: torch.compile (inductor) on CPU, and on CUDA the same with
`mode="reduce-overhead"`, which replays each shape as a CUDA graph.

Static shapes: the batch is padded up to a bucket (powers of two from 2 up to --max-batch) and
the gathered key axis up to a multiple of KEY_BUCKET slots, so a handful of shapes serve every
step. On CUDA each bucket is its own CUDA graph. On CPU, where inductor takes minutes to compile
a 40-layer model on a small machine, one graph with symbolic sizes serves every bucket. Padding
rows read only the null block (all zeros) and write into a scratch slot at the end of the pool
that no row ever reads. The pools are marked as static addresses so that CUDA graphs may write
into them in place.

A failure here propagates: the decode step (runner.py) logs it once and runs the lean step (or
transformers' forward) from then on, since compilation is an optimisation, never a reason to
fail a request. Compilation happens lazily, on the first step of each new shape, and is logged
with its duration. What a measured CUDA run would show could not be checked here (no GPU); the
CPU path is tested.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from minicpm_server.engine.native.blocks import NULL_BLOCK
from minicpm_server.engine.native.paged import PagedForward, StepLayout, decode_layout

log = logging.getLogger("minicpm_server.engine.native.compiled")

KEY_BUCKET = 256


def batch_bucket(rows: int, max_batch: int) -> int:
    """Powers of two from 2: a batch of 1 would be compiled apart (dynamo specialises size 1)."""
    return max(rows, min(max_batch, max(2, 1 << (rows - 1).bit_length())))


def key_bucket(width: int, limit: int) -> int:
    return min(limit, -(-width // KEY_BUCKET) * KEY_BUCKET)


def compile_options(device: torch.device) -> dict[str, Any]:
    """torch.compile's arguments for the decode step on `device`."""
    if device.type == "cuda":
        # Each bucket is recorded as its own CUDA graph; static shapes keep those graphs simple.
        return {"mode": "reduce-overhead", "dynamic": False}
    # On CPU compiling is slow (minutes for a deep model on a small machine): one graph with
    # symbolic sizes serves every bucket, instead of one compilation per bucket.
    return {"dynamic": True}


class CompiledDecode:
    """`logits = step(last, lengths, table, width)` through torch.compile; raises when compiling fails."""

    def __init__(
        self, forward: PagedForward, *, block_size: int, scratch_slot: int, max_batch: int, context_window: int
    ) -> None:
        self.forward = forward
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        self.max_batch = max_batch
        self.context_window = context_window
        self._shapes: set[tuple[int, int]] = set()
        self._compiled = self._compile()

    def _compile(self) -> Any:
        cache = self.forward.cache
        for pool in (*cache.keys, *cache.values):
            torch._dynamo.mark_static_address(pool)
        options = compile_options(cache.keys[0].device)
        log.info("decode step: torch.compile %s, on the first step of each shape", options)
        return torch.compile(self._static_step, **options)

    def _static_step(
        self, ids: torch.Tensor, positions: torch.Tensor, write: torch.Tensor, read: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        layout = StepLayout(write, write, read, mask, all_rows_write=True)
        return self.forward(ids, positions, layout).logits[:, -1]

    def __call__(self, last: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor, width: int) -> torch.Tensor:
        rows = len(last)
        padded_rows = batch_bucket(rows, self.max_batch)
        padded_width = key_bucket(width, self.context_window)
        extra = padded_rows - rows
        if extra:
            last = torch.cat([last, last.new_zeros(extra)])
            lengths = torch.cat([lengths, lengths.new_zeros(extra)])
            table = torch.cat([table, table.new_full((extra, table.shape[1]), NULL_BLOCK)])
        layout = decode_layout(table, lengths, padded_width, self.block_size)
        write = layout.write_slots
        if extra:
            write = torch.cat([write[:rows], write.new_full((extra,), self.scratch_slot)])
        shape = (padded_rows, padded_width)
        start = time.perf_counter()
        if last.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        logits = self._compiled(last[:, None], lengths[:, None], write, layout.read_slots, layout.mask)
        if shape not in self._shapes:
            self._shapes.add(shape)
            log.info("decode step compiled for %d rows x %d keys in %.1f s", *shape, time.perf_counter() - start)
        return logits[:rows]
