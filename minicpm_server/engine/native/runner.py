"""The model runner: prefill and decode over the paged KV pool, and sampling; it knows tensors,
not queues or requests' lifetimes (scheduler.py decides who runs, engine.py drives both).

* `Batch` is the running rows' state on the model's device, one entry per row in every field
  (rows.py joins and selects them without naming the fields).
* `ModelRunner.prefill` computes the newcomers' uncached prompt tokens together and returns their
  joining rows with the logits of each row's last prompt token, and the prompt's scores for the
  rows that asked for them (logprobs.py; those rows bypass the prefix cache, scheduler.py).
* `ModelRunner.decode` runs one decode step for every row through `DecodeForward`, the one
  wrapper of the three ways a step can run: compiled (compiled.py, with --compile), lean (lean.py,
  our own forward over the model's weights), or transformers' forward (`PagedForward`, which
  every prefill also runs). A compiled step that fails falls back to lean, once, for good.
* `ModelRunner.sample` draws each row's next token (sampling.py), `logprobs` scores it for the
  rows that asked (free rows pay nothing), and `record` notes it in the rows' penalty state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from minicpm_server.engine.native.blocks import NULL_BLOCK, blocks_for
from minicpm_server.engine.native.compiled import CompiledDecode
from minicpm_server.engine.native.kernels import KernelLinear
from minicpm_server.engine.native.lean import LeanDecoder
from minicpm_server.engine.native.logprobs import score_prompt, token_logprobs
from minicpm_server.engine.native.mixed import MixedStep, prompt_part
from minicpm_server.engine.native.packed import DeferredPacking, PackedLinear
from minicpm_server.engine.native.paged import (
    PagedForward,
    PagedKVCache,
    block_decode_layout,
    decode_layout,
    prefill_layout,
)
from minicpm_server.engine.native.rows import RowState
from minicpm_server.engine.native.sampling import BatchSampling, draw_tokens, host_to_device, settle
from minicpm_server.engine.protocol import TokenLogprob

if TYPE_CHECKING:
    from minicpm_server.engine.native.scheduler import Sequence

log = logging.getLogger("minicpm_server.engine.native.runner")


@dataclass
class Batch(RowState):
    """The running sequences; every field holds one entry per row."""

    seqs: list[Sequence]
    last: torch.Tensor  # [B] long, the token fed into the next step
    lengths: torch.Tensor  # [B] long, tokens in the cache: the position id of `last`
    table: torch.Tensor  # [B, W] long, block ids (padded with the null block)
    seen: torch.Tensor  # [B, V] bool, tokens in each context (repetition penalty)
    counts: torch.Tensor  # [B, V] int32, times each token was generated (presence/frequency penalties)
    sampling: BatchSampling


class DecodeForward:
    """`logits = step(last, lengths, table, width)`: one decode step's forward pass, compiled,
    lean or transformers' (see the module docstring)."""

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
        self.forward = PagedForward(model, cache)
        # Compiling traces transformers' forward, whose layers must then stay plain nn.Linear.
        packing = False if compile else pack_weights
        self.lean = (
            LeanDecoder(model, cache, block_size, pack_weights=packing, kernels=not compile)
            if lean and LeanDecoder.supports(model)
            else None
        )
        self.compiled: Any = None
        if compile:
            self.compiled = CompiledDecode(
                self.forward,
                block_size=block_size,
                scratch_slot=scratch_slot,
                max_batch=max_batch,
                context_window=context_window,
            )

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, last: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor, width: int) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(last, lengths, table, width)
            except Exception as exc:  # compilation is an optimisation: fall back, once, for good
                fallback = "the lean step" if self.lean is not None else "transformers' forward"
                log.warning(
                    "compiled decode step failed (%s: %s); decoding with %s from now on",
                    type(exc).__name__,
                    exc,
                    fallback,
                )
                self.compiled = None
        if self.lean is not None:
            return self.lean(last, lengths, block_decode_layout(table, lengths, width, self.block_size))
        layout = decode_layout(table, lengths, width, self.block_size)
        return self.forward(last[:, None], lengths[:, None], layout).logits[:, -1]


class ModelRunner:
    """Runs the model for the engine thread: prefill, decode and sampling over one KV pool."""

    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        *,
        block_size: int,
        scratch_slot: int,
        max_batch: int,
        context_window: int,
        compile: bool = False,
        lean: bool = True,
        mixed_prefill: bool = False,
        seed: int | None = 0,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device: torch.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.block_size = block_size
        self.table_width = blocks_for(context_window, block_size)
        self.decode = DecodeForward(
            model,
            cache,
            block_size=block_size,
            scratch_slot=scratch_slot,
            max_batch=max_batch,
            context_window=context_window,
            compile=compile,
            lean=lean,
        )
        self.forward = self.decode.forward  # transformers' forward over the cache: prefill when not mixed
        lean_step = self.decode.lean
        self.mixed = MixedStep(lean_step) if mixed_prefill and lean_step is not None and not compile else None
        # Layers loaded to be packed after start-up (model/loading.py) in the model's order, so the
        # output head's copy comes last: dense, the full-size head took 86 ms at one row against
        # 72 packed and the same at 4 rows, while the layers' prompts are 2-3x slower dense.
        self.packing = DeferredPacking([m for m in model.modules() if isinstance(m, (PackedLinear, KernelLinear))])
        self.max_batch = max_batch
        self._bitmask: torch.Tensor | None = None  # grammar masks, one row per batch row (engine/grammar.py)
        self.shared_generator = torch.Generator(device=self.device)
        if seed is not None:
            self.shared_generator.manual_seed(seed)

    # ----------------------------------------------------------------- prefill

    def can_mix(self, seqs: list[Sequence]) -> bool:
        """Whether these newcomers' prompts can share the decode step's pass (mixed.py): not when
        one asks for its prompt's scores (those need every position's hidden state)."""
        return self.mixed is not None and all(seq.handle.params.prompt_logprobs is None for seq in seqs)

    def prefill_with_decode(
        self, seqs: list[Sequence], batch: Batch | None
    ) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """The newcomers' uncached prompt tokens and one decode step of the running `batch`, in one
        pass (mixed.py): the newcomers' joining rows, the logits [P, V] of each one's last prompt
        token, and the running rows' next-token logits [B, V] (B = 0 without a batch)."""
        assert self.mixed is not None
        self._zero_fresh_blocks(seqs)
        table = self._table([seq.table for seq in seqs])
        prompts = [
            prompt_part(
                self._to_device(seq.tokens[seq.computed :]), table[row], seq.computed, self.block_size, self.device
            )
            for row, seq in enumerate(seqs)
        ]
        if batch is None:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            decode_logits, logits = self.mixed(empty, empty, None, prompts)
        else:
            width = max(seq.computed for seq in batch.seqs) + 1
            layout = block_decode_layout(batch.table, batch.lengths, width, self.block_size)
            decode_logits, logits = self.mixed(batch.last, batch.lengths, layout, prompts)
            batch.lengths = batch.lengths + 1
        last = torch.stack([p.ids[-1] for p in prompts])
        return self._joining(seqs, last, table), logits, decode_logits

    def prefill(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor, list[list[TokenLogprob | None] | None]]:
        """Compute each sequence's uncached prompt tokens (all rows in one left-padded pass) and
        return their rows, the logits [B, V] of each row's last prompt token, and each row's
        prompt scores (None where the request did not ask)."""
        prompts = [seq.tokens for seq in seqs]
        self._zero_fresh_blocks(seqs)
        new_counts = [len(p) - seq.computed for p, seq in zip(prompts, seqs, strict=True)]
        width = max(new_counts)  # from the host's numbers: reading it off the device would wait for it
        cached = self._to_device([seq.computed for seq in seqs])
        new = self._to_device(new_counts)
        ids = self._to_device(
            [[0] * (width - len(p) + seq.computed) + p[seq.computed :] for p, seq in zip(prompts, seqs, strict=True)]
        )
        table = self._table([seq.table for seq in seqs])
        layout = prefill_layout(table, cached, new, self.block_size)
        offsets = torch.arange(width, device=self.device)[None, :] - (width - new)[:, None]
        positions = (cached[:, None] + offsets).clamp(min=0)
        wanted = [seq.handle.params.prompt_logprobs for seq in seqs]
        scores: list[list[TokenLogprob | None] | None] = [None] * len(seqs)
        if all(top is None for top in wanted):
            logits = self.forward(ids, positions, layout, logits_to_keep=1).logits[:, -1]
        else:
            hidden = self.forward.hidden(ids, positions, layout)
            logits = self.forward.head(hidden[:, -1:])[:, -1]  # the shapes logits_to_keep=1 computes with
            for row, (seq, top) in enumerate(zip(seqs, wanted, strict=True)):
                if top is not None:  # admitted without a cached prefix: the whole prompt is in this pass
                    scores[row] = score_prompt(
                        hidden[row, width - len(seq.tokens) :], seq.tokens, top, self.forward.head
                    )
        return self._joining(seqs, ids[:, -1], table), logits, scores

    def _zero_fresh_blocks(self, seqs: list[Sequence]) -> None:
        """Zero the blocks past each sequence's computed tokens; a block partly computed was
        copied whole from a cached one (blocks.py), so holds no NaN."""
        fresh = [block for seq in seqs for block in seq.table[blocks_for(seq.computed, self.block_size) :]]
        self.cache.zero_blocks(fresh, self.block_size)

    def _joining(self, seqs: list[Sequence], last: torch.Tensor, table: torch.Tensor) -> Batch:
        """The newcomers' rows, their prompts in the cache and `last` their last prompt tokens."""
        prompts = [seq.tokens for seq in seqs]
        seen = torch.zeros(len(prompts), self.vocab_size, dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            seen[row, self._to_device(prompt)] = True
        generators = [self._request_generator(seq.handle.params.seed) for seq in seqs]
        return Batch(
            seqs=seqs,
            last=last,
            lengths=self._to_device([len(p) for p in prompts]),
            table=table,
            seen=seen,
            counts=torch.zeros(len(prompts), self.vocab_size, dtype=torch.int32, device=self.device),
            sampling=BatchSampling.build([seq.handle.params for seq in seqs], generators, self.device),
        )

    def _table(self, tables: list[list[int]]) -> torch.Tensor:
        return self._to_device([t + [NULL_BLOCK] * (self.table_width - len(t)) for t in tables])

    def _to_device(self, values: list) -> torch.Tensor:
        """Host integers as a long tensor on the model's device, copied without waiting for it."""
        return host_to_device(torch.tensor(values, dtype=torch.long), self.device)

    def _request_generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    # ----------------------------------------------------------------- decode and sample

    def decode_step(self, batch: Batch) -> torch.Tensor:
        """One new token's logits [B, V] for every row; the rows' `last` tokens enter the cache."""
        width = max(seq.computed for seq in batch.seqs) + 1
        logits = self.decode(batch.last, batch.lengths, batch.table, width)
        batch.lengths = batch.lengths + 1
        return logits

    def sample(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """Each row's next token from its logits, with its own sampling parameters; a constrained
        row only from the tokens its grammar allows next. The tokens on the device and as ids:
        the step's one read of the device (sampling.py)."""
        logits = logits.float()
        constrained = [i for i, seq in enumerate(batch.seqs) if seq.matcher is not None]
        if constrained:
            logits = self._mask_to_grammars(logits, batch, constrained)
        draw = draw_tokens(logits, batch.seen, batch.sampling, self.shared_generator, batch.counts)
        return settle(draw, batch.sampling)

    def _mask_to_grammars(self, logits: torch.Tensor, batch: Batch, rows: list[int]) -> torch.Tensor:
        """A copy of the logits where each constrained row's disallowed tokens are -inf (the raw
        logits stay as they are: log-probabilities are the model's own). Free rows pay nothing."""
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < len(batch.seqs):
            self._bitmask = xgr.allocate_token_bitmask(max(len(batch.seqs), self.max_batch), self.vocab_size)
        for row in rows:
            batch.seqs[row].matcher.fill_next_token_bitmask(self._bitmask, row)
        masked = logits.clone()
        bitmask = self._bitmask[: len(batch.seqs)].to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(masked, bitmask, vocab_size=self.vocab_size, indices=rows)
        return masked

    def logprobs(self, logits: torch.Tensor, batch: Batch, tokens: torch.Tensor) -> list[TokenLogprob | None]:
        """The sampled tokens' log-probabilities for the rows that asked; None for the others."""
        rows = [i for i, seq in enumerate(batch.seqs) if seq.handle.params.logprobs is not None]
        found: list[TokenLogprob | None] = [None] * len(batch.seqs)
        if rows:
            index = torch.tensor(rows, device=logits.device)
            tops = [batch.seqs[i].handle.params.logprobs or 0 for i in rows]
            for row, entry in zip(rows, token_logprobs(logits[index], tokens[index], tops), strict=True):
                found[row] = entry
        return found

    def record(self, batch: Batch, tokens: torch.Tensor) -> None:
        """The sampled tokens become the next step's input and count in each row's penalties."""
        batch.last = tokens
        every_row = torch.arange(len(tokens), device=self.device)
        batch.seen[every_row, tokens] = True
        batch.counts[every_row, tokens] += 1

    def release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
