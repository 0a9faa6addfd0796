"""MiniCPM-2B's network in plain PyTorch: its config, its module tree and its forward pass.

Why our own and not transformers' `GraniteForCausalLM` (which computes the same thing; see
checkpoint.py): importing transformers' modelling code takes 3-4 s on a CPU (it pulls in
torch._dynamo, torch.distributed.tensor, sympy and accelerate), the largest part of the native
engine's start-up on the full-size model after the weights themselves. The native engine never
calls transformers for anything else on a CPU: the decode step is our own (engine/native/lean.py)
and this module is the prefill's and prompt scoring's forward. On CUDA the engine still builds
transformers' classes by default (`--model-impl`, settings.py), as before.

The tree has Granite's (and MiniCPM's) module names, so the checkpoint's tensor names address it
directly and every part of the engine that re-lays out, packs or quantizes layers works on either.
The forward takes the same keywords as transformers' (`input_ids`, `attention_mask` as a 4-D
boolean mask, `position_ids`, `cache`, `logits_to_keep`); with a cache, each layer hands it the
step's keys and values and attends over what `cache.update` returns (engine/native/paged.py).

The math (tests/test_architecture.py checks it against transformers' forward):

* x = embed(ids) * embedding_multiplier;
* per layer: x += attention(rms_norm(x)) * residual_multiplier, then
  x += down(silu(gate(h)) * up(h)) * residual_multiplier with h = rms_norm(x);
* attention with rotary positions (default RoPE), softmax scaled by attention_multiplier;
* logits = lm_head(rms_norm(x)) / logits_scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """The shape and scalars of the forward pass, named as transformers' GraniteConfig names them
    (so code written against either reads one set of attributes). `model_config` makes one from
    MiniCPM's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    embedding_multiplier: float
    residual_multiplier: float
    logits_scaling: float
    attention_multiplier: float
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "minicpm"
    rope_parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rope_parameters:
            self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def granite_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' GraniteConfig with the same forward pass."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": dict(self.rope_parameters),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "embedding_multiplier": self.embedding_multiplier,
            "residual_multiplier": self.residual_multiplier,
            "logits_scaling": self.logits_scaling,
            "attention_multiplier": self.attention_multiplier,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "architectures": ["GraniteForCausalLM"],
        }


def model_config(config: dict[str, Any]) -> ModelConfig:
    """MiniCPM's config.json -> the forward pass's config.

    embedding_multiplier = scale_emb, residual_multiplier = scale_depth / sqrt(layers),
    logits_scaling = hidden_size / dim_model_base, attention_multiplier = 1 / sqrt(head_dim),
    and a tied head (MiniCPM stores no lm_head: absent from config.json, tie_word_embeddings
    defaults to true)."""
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        embedding_multiplier=float(config["scale_emb"]),
        residual_multiplier=float(config["scale_depth"]) / math.sqrt(layers),
        logits_scaling=hidden / float(config["dim_model_base"]),
        attention_multiplier=1.0 / math.sqrt(hidden / heads),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
    )


# --------------------------------------------------------------------------- modules


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Granite's RMSNorm: normalised in float32, then back to the input's dtype before the
    weight's scale. In float32 PyTorch's fused RMSNorm computes bit-identical results in one
    operation. (The lean decode step and the mixed pass call this too.)"""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding applied to `x` [..., head_dim] (the rotate-half form)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos and sin of each position's angles [B, Q, head_dim], computed in float32 (default RoPE)."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        dim = config.head_dim
        theta = float(config.rope_parameters.get("rope_theta", config.rope_theta))
        # Made on the CPU even while the tree is built on the meta device: arithmetic on meta
        # tensors goes through PyTorch's reference ops, whose first use imports torch._dynamo (2-3 s).
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`like` gives only the dtype and device of the result."""
        inv_freq = self.inv_freq.to(like.device).float()  # head_dim / 2 numbers
        angles = position_ids.to(like.device)[..., None].float() * inv_freq
        both = torch.cat((angles, angles), dim=-1)
        return both.cos().to(like.dtype), both.sin().to(like.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_multiplier
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Any | None,
    ) -> torch.Tensor:
        batch, queries, _ = x.shape

        def heads(states: torch.Tensor, count: int) -> torch.Tensor:  # -> [B, count, Q, head_dim]
            return states.view(batch, queries, count, self.head_dim).transpose(1, 2)

        cos, sin = (part[:, None] for part in rotary)  # [B, 1, Q, D]: the same for every head
        q = rotate(heads(self.q_proj(x), self.heads), cos, sin)
        k = rotate(heads(self.k_proj(x), self.kv_heads), cos, sin)
        v = heads(self.v_proj(x), self.kv_heads)
        if cache is not None:  # writes this step's keys and values, returns every key the queries may see
            k, v = cache.update(k, v, self.index)
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and queries > 1,
            scale=self.scale,
            enable_gqa=self.heads != self.kv_heads,
        )
        return self.o_proj(attended.transpose(1, 2).reshape(batch, queries, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.residual_multiplier = config.residual_multiplier
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: Any, cache: Any
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache) * self.residual_multiplier
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


@dataclass
class ModelOutput:
    """What the forward returns, under the attribute names transformers' outputs use."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class MiniCPMModel(nn.Module):
    """Embedding, decoder layers and final norm: the last hidden states, no output head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Given its table, the embedding skips its random initialisation: on the meta device that
        # goes through PyTorch's reference ops, whose first use imports torch._dynamo (2-3 s).
        table = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any | None = None,
        use_cache: bool = True,
    ) -> ModelOutput:
        """`input_ids` [B, Q]. Without a cache the queries attend causally to each other; with one,
        `attention_mask` [B, 1, Q, T] (True = may attend) and `position_ids` [B, Q] are required."""
        del use_cache  # the cache is used whenever one is given; the keyword is transformers'
        if cache is not None and (attention_mask is None or position_ids is None):
            raise ValueError("a forward over a KV cache needs attention_mask and position_ids")
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.dtype != torch.bool):
            raise ValueError("attention_mask must be a 4-D boolean mask [batch, 1, queries, keys]")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        x = self.embed_tokens(input_ids) * self.config.embedding_multiplier
        rotary = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, rotary, attention_mask, cache)
        return ModelOutput(last_hidden_state=self.norm(x))


class MiniCPMForCausalLM(nn.Module):
    """The model and its output head (tied to the embedding table, as MiniCPM stores it)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MiniCPMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Logits [B, Q, V], or of the last `logits_to_keep` positions only."""
        hidden = self.model(input_ids, attention_mask, position_ids, cache, use_cache).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return ModelOutput(logits=self.lm_head(hidden) / self.config.logits_scaling)


def empty_minicpm(config: ModelConfig, dtype: torch.dtype) -> MiniCPMForCausalLM:
    """The module tree on the meta device: shapes, no storage, no initialisation (the rotary
    frequencies, a few numbers computed from the config, on the CPU and in float32)."""
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
    frequencies = model.model.rotary_emb.inv_freq
    model.to(dtype)
    model.model.rotary_emb.inv_freq = frequencies
    return model
