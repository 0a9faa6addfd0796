"""The decode step's forward pass: lean (lean.py), or compiled for a few static shapes.

Without --compile the step runs the lean decoder, our own forward over the model's weights,
when the model is one it supports; otherwise, and whenever compiling fails, transformers'
forward ("eager").

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

If compiling or running the compiled step fails, the failure is logged once and every later
step runs eagerly: compilation is an optimisation, never a reason to fail a request. Compilation
happens lazily, on the first step of each new shape, and is logged with its duration. What a
measured CUDA run would show could not be checked here (no GPU); the CPU path is tested.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from minicpm_server.engine.native.blocks import NULL_BLOCK
from minicpm_server.engine.native.lean import LeanDecoder
from minicpm_server.engine.native.paged import (
    PagedKVCache,
    StepLayout,
    block_decode_layout,
    cache_argument_name,
    decode_layout,
)

log = logging.getLogger("minicpm_server.engine.native.compiled")

KEY_BUCKET = 256


def batch_bucket(rows: int, max_batch: int) -> int:
    """Powers of two from 2: a batch of 1 would be compiled apart (dynamo specialises size 1)."""
    return max(rows, min(max_batch, max(2, 1 << (rows - 1).bit_length())))


def key_bucket(width: int, limit: int) -> int:
    return min(limit, -(-width // KEY_BUCKET) * KEY_BUCKET)


class DecodeForward:
    """`logits = runner(last, lengths, table, width)`: one decode step's forward pass."""

    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        *,
        block_size: int,
        scratch_slot: int,
        max_batch: int,
        context_window: int,
        compile: bool,
        lean: bool = True,
        pack_weights: bool | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        self.max_batch = max_batch
        self.context_window = context_window
        self.compiled: Any = None
        self._cache_kwarg = cache_argument_name(model)
        self._shapes: set[tuple[int, int]] = set()
        # Compiling traces transformers' forward, whose layers must then stay plain nn.Linear.
        packing = False if compile else pack_weights
        self.lean = (
            LeanDecoder(model, cache, block_size, pack_weights=packing)
            if lean and LeanDecoder.supports(model)
            else None
        )
        if compile:
            self.compiled = self._compile()

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, last: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor, width: int) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self._compiled_step(last, lengths, table, width)
            except Exception as exc:  # compilation is an optimisation: fall back, once, for good
                log.warning(
                    "compiled decode step failed (%s: %s); decoding eagerly from now on", type(exc).__name__, exc
                )
                self.compiled = None
        if self.lean is not None:
            return self.lean(last, lengths, block_decode_layout(table, lengths, width, self.block_size))
        layout = decode_layout(table, lengths, width, self.block_size)
        return self._forward(last[:, None], lengths[:, None], layout)

    # ----------------------------------------------------------------- internals

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        self.cache.layout = layout
        out = self.model(
            input_ids=ids,
            attention_mask=layout.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: self.cache},
        )
        return out.logits[:, -1]

    def _compile(self) -> Any:
        device = next(self.model.parameters()).device
        for pool in (*self.cache.keys, *self.cache.values):
            torch._dynamo.mark_static_address(pool)
        if device.type == "cuda":
            # Each bucket is recorded as its own CUDA graph; static shapes keep those graphs simple.
            log.info("decode step: torch.compile (reduce-overhead: CUDA graphs), on the first step of each shape")
            return torch.compile(self._static_step, mode="reduce-overhead", dynamic=False)
        # On CPU compiling is slow (minutes for a deep model on a small machine): one graph with
        # symbolic sizes serves every bucket, instead of one compilation per bucket.
        log.info("decode step: torch.compile (inductor, dynamic shapes), on the first step")
        return torch.compile(self._static_step, dynamic=True)

    def _static_step(
        self, ids: torch.Tensor, positions: torch.Tensor, write: torch.Tensor, read: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        layout = StepLayout(write, write, read, mask, all_rows_write=True)
        return self._forward(ids, positions, layout)

    def _compiled_step(
        self, last: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor, width: int
    ) -> torch.Tensor:
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
        if self.cache.keys[0].device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        logits = self.compiled(last[:, None], lengths[:, None], write, layout.read_slots, layout.mask)
        if shape not in self._shapes:
            self._shapes.add(shape)
            log.info("decode step compiled for %d rows x %d keys in %.1f s", *shape, time.perf_counter() - start)
        return logits[:rows]
