"""Newcomers' prompts and the running rows' decode tokens in one forward pass.

Why: with unique prompts, requests arrive one or two at a time while others decode, and each
prompt was computed in a pass of its own: a 30-token prompt alone runs the weights' products at
a few dozen rows, far from what the machine can do (68 GFLOP/s for one prompt on the benchmark
CPU), and the decode step that follows reads every weight again. Here every token of the
iteration, one per running row plus each newcomer's uncached prompt tokens, goes through each
matrix product together: the weights are read once per iteration, and the products run on more
rows at once.

Only attention is per group: the running rows attend as in the lean step (lean.py: their blocks
gathered whole, one query each), and each newcomer's prompt attends causally over its own blocks
(its cached prefix and its new tokens). Keys and values of every token are written to the paged
pool first, so each query reads its own.

Off by default (`--mixed-prefill` turns it on): on the shared 2-core machine it was measured
at 0.92-1.02x the separate prefill in tokens per CPU second (BENCHMARKS.md), no clear gain, so
the measured path stays the default until a quiet run says otherwise.

The math is the lean decoder's (the same weights, norms, rotary table and head), so a prompt's
logits equal the separate prefill's up to float rounding; tests/test_mixed.py checks them
against transformers' forward, and greedy answers through the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minicpm_server.engine.native.blocks import blocks_for
from minicpm_server.engine.native.lean import LeanDecoder
from minicpm_server.engine.native.paged import BlockDecodeLayout, slot_ids
from minicpm_server.model.architecture import rotate


@dataclass
class PromptPart:
    """One newcomer's uncached prompt tokens and where they go."""

    ids: torch.Tensor  # [n] long, the new tokens
    positions: torch.Tensor  # [n] long: cached + 0..n-1
    write_slots: torch.Tensor  # [n] long
    read_blocks: torch.Tensor  # [1, blocks] long: the row's blocks covering its whole prompt
    mask: torch.Tensor  # [1, 1, n, blocks * block_size] bool: causal over cached + new keys


def prompt_part(
    ids: torch.Tensor, table: torch.Tensor, cached: int, block_size: int, device: torch.device
) -> PromptPart:
    """`ids` [n] on the device follow `cached` tokens already in the row's blocks `table` [W]."""
    n = len(ids)
    positions = torch.arange(cached, cached + n, device=device)
    blocks = blocks_for(cached + n, block_size)
    keys = torch.arange(blocks * block_size, device=device)
    causal = keys[None, :] <= positions[:, None]
    write = slot_ids(table[None, :], positions[None, :], block_size)[0]
    return PromptPart(ids, positions, write, table[None, :blocks], causal[None, None])


class MixedStep:
    """`decode_logits, prompt_logits = step(last, lengths, layout, prompts)`: the running rows'
    next-token logits [B, V] (B may be 0) and each prompt's last-token logits [P, V]."""

    def __init__(self, lean: LeanDecoder) -> None:
        self.lean = lean

    def __call__(
        self,
        last: torch.Tensor,
        lengths: torch.Tensor,
        layout: BlockDecodeLayout | None,
        prompts: list[PromptPart],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lean = self.lean
        rows = len(last)
        ids = torch.cat([last, *(p.ids for p in prompts)])
        positions = torch.cat([lengths, *(p.positions for p in prompts)])
        slots = torch.cat([layout.write_slots if layout is not None else last[:0], *(p.write_slots for p in prompts)])
        x = lean.embed_tokens(ids) * lean.embedding_multiplier  # [N, hidden] (dense or int8 lookups)
        cos = lean.cos[positions][:, None, :]
        sin = lean.sin[positions][:, None, :]
        heads, kv_heads, dim = lean.heads, lean.kv_heads, lean.head_dim
        tokens = len(ids)
        for index, layer in enumerate(lean.layers):
            h = lean._rms_norm(x, layer.input_norm)
            qkv = layer.qkv(h).view(tokens, heads + 2 * kv_heads, dim)
            qk, v = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :]
            qk = rotate(qk, cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            lean.cache.write(index, slots, k, v)
            parts = []
            if rows:
                assert layout is not None
                parts.append(self._decode_attention(index, q[:rows], layout))
            start = rows
            for prompt in prompts:
                end = start + len(prompt.ids)
                parts.append(self._prompt_attention(index, q[start:end], prompt))
                start = end
            attended = torch.cat(parts) if len(parts) > 1 else parts[0]
            x = x + layer.o(attended) * lean.residual_multiplier
            gate, up = layer.gate_up(lean._rms_norm(x, layer.post_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up) * lean.residual_multiplier
        ends = torch.tensor([len(p.ids) for p in prompts]).cumsum(0) + rows - 1
        keep = torch.cat([torch.arange(rows), ends]).to(x.device)
        logits = lean.lm_head(lean._rms_norm(x[keep], lean.norm)) / lean.logits_scaling
        return logits[:rows], logits[rows:]

    def _decode_attention(self, index: int, q: torch.Tensor, layout: BlockDecodeLayout) -> torch.Tensor:
        """The running rows' attention, as the lean decode step computes it."""
        return self.lean._attend(index, q, layout).reshape(len(q), self.lean.heads * self.lean.head_dim)

    def _prompt_attention(self, index: int, q: torch.Tensor, prompt: PromptPart) -> torch.Tensor:
        lean = self.lean
        n, heads, kv_heads, dim = len(q), lean.heads, lean.kv_heads, lean.head_dim
        keys, values = lean.cache.gather_blocks(index, prompt.read_blocks, lean.block_size)  # [1, kv, T, dim]
        attended = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, heads, n, dim]
            keys,
            values,
            attn_mask=prompt.mask,
            scale=lean.attention_multiplier,
            enable_gqa=heads != kv_heads,
        )
        return attended[0].transpose(0, 1).reshape(n, heads * dim)
