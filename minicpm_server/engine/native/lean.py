"""The decode step's forward pass written straight against the model's weights.

Why: a decode step feeds one token per row. Going through transformers' module tree, every
layer pays for module calls, keyword plumbing, mask preparation, output records and a dozen
small tensor operations that a single-token step does not need, and gathers the paged KV token
by token. This runs the same math with about half the tensor operations and no module calls;
on CPU (`python -m bench.decode_step`) a step ran 1.5x faster than transformers' forward at one
row of the 8-layer benchmark model, 1.8x at 16-32 rows, and 1.9x at one row of the 40-layer,
128-wide `deep` model, where per-operation overhead is nearly all of the cost:

* q, k and v come from one matrix product, and so do the MLP's gate and up projections: the
  model's own weights are re-laid out once into fused tensors, and the modules' parameters
  become views into them, so no weight is held twice and transformers' forward (which still
  runs every prefill) reads the same numbers;
* on CPU, for models too narrow to pack (packed.py), matrices with more outputs than inputs
  (q/k/v, gate/up, the output head) are stored input-major: for one row, MKL's product with
  the usual [out, in] layout ran 1.4-4x slower than with [in, out] here (the output head
  most), and at 16 or more rows the two were equal;
* with `--quantization int8` the layers are Int8Linear (quantized.py), fused the same way (q/k/v
  and gate/up each one int8 matrix, the modules' buffers views into it), and the embedding rows
  come from the output head's int8 table;
* rotary cos/sin come from a table computed once for every position, by the same formula as
  transformers' rotary embedding;
* keys and values go into the paged pool directly and come out of it by whole blocks (one
  gather per block, not per token: at 32 rows the per-token gather was 38% of the step);
* attention is PyTorch's SDPA with the step's mask, as transformers' "sdpa" attention calls it.

The math is Granite's (what MiniCPM is loaded as; see model/checkpoint.py): embeddings times
`embedding_multiplier`, residual branches times `residual_multiplier`, attention scaled by
`attention_multiplier`, logits divided by `logits_scaling`. tests/test_lean.py checks the logits
against transformers' forward on every tiny shape, and greedy answers through the engine.

Only configurations this code knows are accepted (`LeanDecoder.supports`): default RoPE, SiLU,
no biases, RMSNorm. Anything else decodes through transformers, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from minicpm_server.engine.native.kernels import (
    CpuProducts,
    KernelLinear,
    KernelProjection,
    cpu_products,
    kernel_projection,
)
from minicpm_server.engine.native.packed import (
    PackedLinear,
    PackedProjection,
    pack,
    packs_weights,
    warn_if_slow_half_precision,
)
from minicpm_server.engine.native.paged import BlockDecodeLayout, PagedKVCache
from minicpm_server.engine.native.quantized import Int8Linear, fuse
from minicpm_server.model.architecture import rms_norm, rotate

log = logging.getLogger("minicpm_server.engine.native.lean")

Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Layer:
    """One decoder layer: norms' weights, and its matrix products as functions of the input."""

    input_norm: torch.Tensor
    qkv: Projection  # -> [..., (heads + 2 * kv_heads) * head_dim]
    o: Projection
    post_norm: torch.Tensor
    gate_up: Projection  # -> [..., 2 * intermediate]
    down: Projection


class _Dense:
    """x @ right, with `right` from relayout()."""

    def __init__(self, right: torch.Tensor) -> None:
        self.right = right

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.right


def relayout(modules: list[torch.nn.Linear], *, input_major: bool) -> torch.Tensor:
    """Fuse the modules' weights along the output axis and return the right operand R of
    y = x @ R. `input_major` stores R contiguously ([in, out]); otherwise R is the transpose
    view of the usual [out, in]. Each module's weight becomes a view into R's storage."""
    weights = [m.weight.detach() for m in modules]
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    right = stacked.t().contiguous() if input_major else stacked.t()
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight = torch.nn.Parameter(right[:, start : start + rows].t(), requires_grad=False)
        start += rows
    return right


class LeanDecoder:
    """`logits = decoder(ids, positions, layout)`: ids and positions are [B] (one token per row).

    Building one re-lays out the model's weights in place (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        block_size: int,
        *,
        pack_weights: bool | None = None,
        kernels: bool = True,
    ) -> None:
        """`kernels`: our own CPU products (kernels/) where they build and the weights suit them;
        `pack_weights`: otherwise oneDNN-packed layers (packed.py), by default on CPU where
        available, for models at least MIN_HIDDEN_SIZE wide."""
        config = model.config
        self.cache = cache
        self.block_size = block_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embedding_multiplier = config.embedding_multiplier
        self.residual_multiplier = config.residual_multiplier
        self.attention_multiplier = config.attention_multiplier
        self.logits_scaling = config.logits_scaling
        inner = model.model
        device = inner.norm.weight.device  # embed_tokens may be int8 lookups, with no .weight
        on_cpu = device.type == "cpu"
        products: CpuProducts | None = cpu_products() if kernels and on_cpu and not pack_weights else None
        if pack_weights is None:
            pack_weights = products is None and packs_weights(device, config.hidden_size, inner.norm.weight.dtype)

        def right(modules: list[torch.nn.Linear]) -> torch.Tensor:
            wide = sum(m.out_features for m in modules) > modules[0].in_features
            return relayout(modules, input_major=on_cpu and wide)

        def projection(parent: Any, names: list[str]) -> Projection:
            modules = [getattr(parent, name) for name in names]
            if all(isinstance(m, Int8Linear) for m in modules):  # --quantization int8 (quantized.py)
                return fuse(modules)
            if (kernel := kernel_projection(parent, names, products)) is not None:
                return kernel  # our kernels (kernels/), or kept from an earlier decoder
            # A model packed by an earlier engine stays packed: its dense weights are gone.
            if pack_weights or any(isinstance(getattr(parent, name), PackedLinear) for name in names):
                return PackedProjection([pack(parent, name) for name in names])
            return _Dense(right([getattr(parent, name) for name in names]))

        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight,
                qkv=projection(layer.self_attn, ["q_proj", "k_proj", "v_proj"]),
                o=projection(layer.self_attn, ["o_proj"]),
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=projection(layer.mlp, ["gate_proj", "up_proj"]),
                down=projection(layer.mlp, ["down_proj"]),
            )
            for layer in inner.layers
        ]
        # Attention read straight from the block pool (kernels/attention.cpp), not gathered first.
        self.attention = (
            products if products is not None and products.attention_supports(cache.keys[0], self.head_dim) else None
        )
        self.packed = isinstance(self.layers[0].qkv, PackedProjection)
        self.quantized = isinstance(self.layers[0].qkv, Int8Linear)  # --quantization int8
        self.kernels = isinstance(self.layers[0].qkv, (KernelLinear, KernelProjection))
        if isinstance(model.lm_head, Int8Linear):  # --quantize-head: one int8 table, head and tied embedding
            self.lm_head: Projection = model.lm_head
        elif (head := kernel_projection(model, ["lm_head"], products, tile=False)) is not None:
            self.lm_head = head  # the tied embedding table itself, read as stored: no copy
        elif self.packed or (self.quantized and packs_weights(device, config.hidden_size, inner.norm.weight.dtype)):
            # a packed copy (int8 layers too: float32 head): the embedding table stays dense for its row lookups;
            # made with the layers' packing, after start-up when loading left the layers for later
            later = self.packed and any(not part.is_packed for part in self._packed_parts())
            self.lm_head = PackedProjection([pack(model, "lm_head", later=later)])
        else:
            tied = model.lm_head.weight is inner.embed_tokens.weight
            self.lm_head = _Dense(right([model.lm_head]))
            if tied:  # MiniCPM ties them: keep one copy, which the embedding reads as a strided view
                inner.embed_tokens.weight = model.lm_head.weight
        self.embed_tokens = inner.embed_tokens  # a module: dense nn.Embedding, or int8 lookups
        self.norm = inner.norm.weight
        if self.quantized:
            head = "int8" if isinstance(model.lm_head, Int8Linear) else f"{self._head_dtype()} ({self._head_form()})"
            log.info("decode step: lean, int8 weights (quantized.py), output head in %s", head)
        elif self.kernels:
            log.info(
                "decode step: lean, %s weights through our CPU kernels (kernels/), computed in %s, output head %s",
                self.layers[0].down.weight.dtype,
                self.norm.dtype,
                self._head_form(),
            )
        elif self.packed:
            table = inner.embed_tokens.weight
            head = table.numel() * table.element_size()
            waiting = sum(not part.is_packed for part in self._packed_parts((self.lm_head,)))
            when = f" ({waiting} of them after start-up, between steps)" if waiting else ""
            log.info(
                "decode step: lean, layers packed for oneDNN%s; +%.0f MB: the output head's copy", when, head / 1e6
            )
        else:
            log.info("decode step: lean, %s weights", "input-major" if on_cpu else "fused")
            warn_if_slow_half_precision(device, config.hidden_size, inner.norm.weight.dtype)
        self.cos, self.sin = self._rotary_table(inner.rotary_emb, config.max_position_embeddings)

    def _head_dtype(self) -> torch.dtype:
        weight = getattr(self.lm_head, "weight", None)  # a KernelLinear's (a bfloat16 table under int8)
        return weight.dtype if isinstance(weight, torch.Tensor) else self.norm.dtype

    def _head_form(self) -> str:
        if isinstance(self.lm_head, KernelLinear):
            return "from the embedding table, no copy"
        return "a packed copy" if isinstance(self.lm_head, PackedProjection) else "input-major"

    def _packed_parts(self, extra: tuple[Projection, ...] = ()) -> list[PackedLinear]:
        projections = [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return [part for p in (*projections, *extra) if isinstance(p, PackedProjection) for part in p.parts]

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether this code computes what the model's own forward does."""
        config = model.config
        rope = getattr(config, "rope_parameters", None) or {}
        return (
            getattr(config, "model_type", "") in ("minicpm", "granite")
            and rope.get("rope_type", "default") == "default"
            and config.hidden_act == "silu"
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
        )

    def _rotary_table(self, rotary: Any, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position, computed by transformers' own rotary embedding."""
        ids = torch.arange(positions, device=self.norm.device)[None, :]
        cos, sin = rotary(self.norm[None, None, :1], position_ids=ids)  # only its dtype and device count
        return cos[0], sin[0]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, layout: BlockDecodeLayout) -> torch.Tensor:
        rows = ids.shape[0]
        x = self.embed_tokens(ids) * self.embedding_multiplier  # [B, hidden]
        cos = self.cos[positions][:, None, :]  # [B, 1, D]: the same for every head
        sin = self.sin[positions][:, None, :]
        q_heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for index, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.input_norm)
            qkv = layer.qkv(h).view(rows, q_heads + 2 * kv_heads, dim)
            qk, v = qkv[:, : q_heads + kv_heads], qkv[:, q_heads + kv_heads :]
            qk = rotate(qk, cos, sin)
            q, k = qk[:, :q_heads], qk[:, q_heads:]
            self.cache.write(index, layout.write_slots, k, v)
            attended = self._attend(index, q, layout)
            x = x + layer.o(attended.reshape(rows, q_heads * dim)) * self.residual_multiplier
            gate, up = layer.gate_up(self._rms_norm(x, layer.post_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up) * self.residual_multiplier
        return self.lm_head(self._rms_norm(x, self.norm)) / self.logits_scaling

    def _attend(self, index: int, q: torch.Tensor, layout: BlockDecodeLayout) -> torch.Tensor:
        """Layer `index`'s attention for one query per row: [rows, q_heads, head_dim] in q's dtype."""
        if self.attention is not None:
            attended = self.attention.decode_attention(
                q,
                self.cache.keys[index],
                self.cache.values[index],
                layout.read_blocks,
                self.block_size,
                layout.visible,
                self.attention_multiplier,
            )
            return attended.to(q.dtype)
        rows, q_heads, dim = q.shape
        keys, values = self.cache.gather_blocks(index, layout.read_blocks, self.block_size)
        # One query per row: the query heads sharing a KV head become that head's queries, so
        # grouped KV is never repeated (the [B, 1, 1, T] mask broadcasts over them).
        return F.scaled_dot_product_attention(
            q.reshape(rows, self.kv_heads, q_heads // self.kv_heads, dim),
            keys,
            values,
            attn_mask=layout.mask,
            scale=self.attention_multiplier,
        )

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps)
