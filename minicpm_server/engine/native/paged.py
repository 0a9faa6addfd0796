"""Paged KV memory: one fixed pool of token slots per layer, and the per-step views the model reads.

Why paged and not one left-padded batch: a left-padded cache is as long as the longest row for
every row, so one 2,000-token prompt beside fifteen short ones holds about eight times the KV its
tokens need, and memory cannot be bounded by tokens. Here every row owns whole blocks of
`block_size` slots (blocks.py decides which); what a row wastes is the unused tail of its last
block.

The model (ours, model/architecture.py, or transformers' Granite through `TransformersCache`)
calls `update(keys, values, layer)` once per layer. This cache
writes the step's new keys and values into their rows' slots, then gathers each row's slots into
a dense, right-padded [batch, heads, time, head_dim] tensor for attention. The gathered tensor is
transient (one layer at a time); padding in it points at the null block, which is all zeros, and
the step's 4-D boolean mask hides it. The model's SDPA attention runs on that mask, so no custom
kernel is needed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from minicpm_server.engine.native.blocks import NULL_BLOCK, blocks_for


@dataclass
class StepLayout:
    """Where one forward pass writes and reads, and what each query may see."""

    write_rows: torch.Tensor  # [N] long: which of the flattened [batch * queries] positions are real tokens
    write_slots: torch.Tensor  # [N] long: the slot each of them is written to
    read_slots: torch.Tensor  # [batch, time] long: the slots gathered for attention (padding -> null block)
    mask: torch.Tensor  # [batch, 1, queries, time] bool: True = may attend
    all_rows_write: bool = False  # every position is a real token (a decode step): skip the selection


def slot_ids(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slot of each token position (any shape [batch, ...]) through the rows' block tables."""
    flat = positions.reshape(positions.shape[0], -1)
    blocks = table.gather(1, torch.div(flat, block_size, rounding_mode="floor"))
    return (blocks * block_size + flat % block_size).reshape(positions.shape)


def decode_layout(table: torch.Tensor, lengths: torch.Tensor, width: int, block_size: int) -> StepLayout:
    """One new token per row at position `lengths[b]`; keys 0..lengths[b] are visible.
    `width` >= max(lengths) + 1 is the gathered time axis (a bucket, for static shapes)."""
    keys = torch.arange(width, device=table.device)[None, :]
    visible = keys <= lengths[:, None]
    read = torch.where(visible, slot_ids(table, keys.expand(len(lengths), -1), block_size), NULL_BLOCK)
    write = slot_ids(table, lengths[:, None], block_size)[:, 0]
    rows = torch.arange(len(lengths), device=table.device)
    return StepLayout(rows, write, read, visible[:, None, None, :], all_rows_write=True)


@dataclass
class BlockDecodeLayout:
    """A decode step that reads whole blocks (the lean decoder, lean.py): one gather per block
    instead of one per token slot. Slots past a row's length are hidden by the mask; they hold
    zeros or earlier keys and values, never NaN (blocks are zeroed when reserved)."""

    write_slots: torch.Tensor  # [B] long: where each row's new token goes
    read_blocks: torch.Tensor  # [B, blocks] long: each row's first blocks (null block past its table)
    mask: torch.Tensor  # [B, 1, 1, blocks * block_size] bool: True = may attend
    visible: torch.Tensor  # [B] long: how many keys each row attends to (its length + 1)


def block_decode_layout(table: torch.Tensor, lengths: torch.Tensor, width: int, block_size: int) -> BlockDecodeLayout:
    """One new token per row at position `lengths[b]`; `width` >= max(lengths) + 1."""
    blocks = blocks_for(width, block_size)
    keys = torch.arange(blocks * block_size, device=table.device)
    visible = keys[None, :] <= lengths[:, None]
    write = slot_ids(table, lengths[:, None], block_size)[:, 0]
    # contiguous once per step: every layer's attention (or gather) reads it
    return BlockDecodeLayout(write, table[:, :blocks].contiguous(), visible[:, None, None, :], lengths + 1)


def prefill_layout(table: torch.Tensor, cached: torch.Tensor, new: torch.Tensor, block_size: int) -> StepLayout:
    """Rows computing `new[b]` tokens after `cached[b]` reused ones. Queries are LEFT-padded to
    the longest, so the last query of every row is a real token (its logits give the first
    answer token); a padding query sees only key 0, which keeps its softmax finite."""
    batch, queries = len(new), int(new.max())
    ends = cached + new  # tokens in each row once this step is done
    width = int(ends.max())
    q = torch.arange(queries, device=table.device)[None, :]
    real_query = q >= (queries - new)[:, None]
    query_pos = cached[:, None] + q - (queries - new)[:, None]  # [B, Q]; meaningless where not real
    keys = torch.arange(width, device=table.device)[None, :]
    causal = keys[:, None, :] <= query_pos[:, :, None]  # [B, Q, T]
    mask = torch.where(real_query[:, :, None], causal, keys[:, None, :] == 0)
    filled = keys < ends[:, None]
    read = torch.where(filled, slot_ids(table, keys.expand(batch, -1), block_size), NULL_BLOCK)
    write_rows = real_query.reshape(-1).nonzero().squeeze(-1)
    write_slots = slot_ids(table, query_pos.clamp(min=0), block_size).reshape(-1)[write_rows]
    return StepLayout(write_rows, write_slots, read, mask[:, None])


class PagedKVCache:
    """The KV pool of every layer; `layout` must be set before each forward pass."""

    def __init__(
        self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        # torch.empty: on CPU the pages are only touched when written, so an idle budget costs nothing.
        self.keys = [torch.empty(num_slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty_like(k) for k in self.keys]
        self.layout: StepLayout | None = None
        self._workspace = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]  # gather_blocks' keys, values

    def zero_null_block(self, block_size: int) -> None:
        for pool in (*self.keys, *self.values):
            pool[NULL_BLOCK * block_size : (NULL_BLOCK + 1) * block_size] = 0

    def zero_blocks(self, blocks: list[int], block_size: int) -> None:
        """Zero newly reserved blocks: the lean decoder reads whole blocks, and attention turns a
        NaN in a masked-out value (what never-written memory may hold) into NaN output."""
        if not blocks:
            return
        index = torch.tensor(blocks, device=self.keys[0].device)
        for pool in (*self.keys, *self.values):
            self._blocks(pool, block_size).index_fill_(0, index, 0)

    def copy_block(self, source: int, target: int, block_size: int) -> None:
        """Every layer's keys and values of block `source` into block `target` (a prefix reused
        past a block boundary, blocks.py): all its slots, so that the ones past the reused tokens
        hold finite values, as the lean decoder reads whole blocks."""
        for pool in (*self.keys, *self.values):
            blocks = self._blocks(pool, block_size)
            blocks[target].copy_(blocks[source])

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store one token per slot: keys and values are [N, kv_heads, head_dim]."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)

    def gather_blocks(self, layer: int, blocks: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's blocks, as dense keys and values [B, kv_heads, blocks * block_size, head_dim].

        The result lives in a workspace reused by every layer and step (it is read before the
        next layer gathers): on CPU a fresh tensor of this size per layer came from newly
        mapped pages each time, and faulting them in cost more than the copy."""
        rows, width = blocks.shape
        flat = blocks.reshape(-1)

        def gather(pool: torch.Tensor, slot: int) -> torch.Tensor:
            source = self._blocks(pool, block_size)
            out = self._workspace_view(slot, flat.numel(), source.shape[1], pool)
            torch.index_select(source, 0, flat, out=out)
            return out.view(rows, width * block_size, *pool.shape[1:]).transpose(1, 2)

        return gather(self.keys[layer], 0), gather(self.values[layer], 1)

    def _workspace_view(self, slot: int, rows: int, row_size: int, like: torch.Tensor) -> torch.Tensor:
        needed = rows * row_size
        if self._workspace[slot].numel() < needed:  # grows to the largest step seen, then stays
            self._workspace[slot] = torch.empty(needed, dtype=like.dtype, device=like.device)
        return self._workspace[slot][:needed].view(rows, row_size)

    @staticmethod
    def _blocks(pool: torch.Tensor, block_size: int) -> torch.Tensor:
        """The pool as [blocks, block_size * heads * head_dim] (a view; the spare slot left out)."""
        whole = pool.shape[0] // block_size * block_size
        return pool[:whole].view(whole // block_size, -1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layout = self.layout
        assert layout is not None, "PagedKVCache.layout is set by the engine before each forward pass"
        batch, heads, queries, dim = key_states.shape

        def tokens(states: torch.Tensor) -> torch.Tensor:  # [N, heads, dim]: the real tokens only
            flat = states.transpose(1, 2).reshape(batch * queries, heads, dim)
            return flat if layout.all_rows_write else flat.index_select(0, layout.write_rows)

        self.write(layer_idx, layout.write_slots, tokens(key_states), tokens(value_states))
        width = layout.read_slots.shape[1]
        index = layout.read_slots.reshape(-1)

        def gather(pool: torch.Tensor) -> torch.Tensor:
            return pool.index_select(0, index).view(batch, width, heads, dim).transpose(1, 2)

        return gather(self.keys[layer_idx]), gather(self.values[layer_idx])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.layout is None else int(self.layout.read_slots.shape[1])


class PagedForward:
    """The model's forward over the paged cache: the one place it is called (every prefill, and
    the decode step when neither the lean nor the compiled step runs). Our own MiniCPM
    (model/architecture.py) takes the cache as it is; transformers' Granite takes it wrapped in
    their Cache class (transformers_cache.py, imported only then)."""

    def __init__(self, model: Any, cache: PagedKVCache) -> None:
        from minicpm_server.model.architecture import MiniCPMForCausalLM

        self.model = model
        self.cache = cache
        self._cache_kwarg = cache_argument_name(model)
        if isinstance(model, MiniCPMForCausalLM):
            self._given: Any = cache
        else:
            from minicpm_server.engine.native.transformers_cache import TransformersCache

            self._given = TransformersCache(cache)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, layout: StepLayout, **kwargs: Any) -> Any:
        """The model's output for `ids` [B, Q] at `positions` [B, Q]; `layout` says where each
        token's keys and values go and which slots each query reads."""
        self.cache.layout = layout
        return self.model(
            input_ids=ids,
            attention_mask=layout.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: self._given},
            **kwargs,
        )

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        """The last layer's normed hidden states [B, Q, hidden] (no output head): for scoring
        every prompt position without holding [Q, vocabulary] logits at once."""
        self.cache.layout = layout
        out = self.model.model(
            input_ids=ids,
            attention_mask=layout.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: self._given},
        )
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from hidden states, as the model's forward computes them (Granite divides by
        logits_scaling; MiniCPM's hidden_size / dim_model_base)."""
        return self.model.lm_head(hidden) / getattr(self.model.config, "logits_scaling", 1.0)


def cache_argument_name(model: Any) -> str:
    """transformers 5 renamed forward's `past_key_values` to `cache` part-way through the 5.x
    releases (5.19 has the old name, 5.24 the new), and an unknown keyword is silently swallowed,
    so ask the model which one it takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
