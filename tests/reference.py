"""An independent MiniCPM-2B forward pass in plain torch, written from the published formulas.

It shares nothing with the server's loading path (no Granite, no transformers): it reads the raw
MiniCPM state dict and config.json and computes logits directly, so agreement with the served
model proves the Granite mapping right.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

MARKER = re.compile(r".*?(?=<AI>|<用户>)", re.DOTALL)  # model.chat's clean-up


def load_raw(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((path / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.bin")):
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    for file in sorted(path.glob("*.safetensors")):
        from safetensors.torch import load_file

        state.update(load_file(str(file)))
    return config, {k: v.float() for k, v in state.items()}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on x [T, heads, head_dim] at positions 0..T-1."""
    t, _, d = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * cos + rotated * sin


def logits(config: dict, state: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] for one sequence."""
    hidden = config["hidden_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = hidden // heads
    eps = config["rms_norm_eps"]
    residual_scale = config["scale_depth"] / math.sqrt(layers)
    embed = state["model.embed_tokens.weight"]
    t = len(ids)
    causal = torch.full((t, t), float("-inf")).triu(1)

    h = embed[torch.tensor(ids)] * config["scale_emb"]
    for n in range(layers):
        p = f"model.layers.{n}."
        x = _rms_norm(h, state[p + "input_layernorm.weight"], eps)
        q = (x @ state[p + "self_attn.q_proj.weight"].T).view(t, heads, head_dim)
        k = (x @ state[p + "self_attn.k_proj.weight"].T).view(t, kv_heads, head_dim)
        v = (x @ state[p + "self_attn.v_proj.weight"].T).view(t, kv_heads, head_dim)
        q, k = _rope(q, config["rope_theta"]), _rope(k, config["rope_theta"])
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim) + causal
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, hidden)
        h = h + (attn @ state[p + "self_attn.o_proj.weight"].T) * residual_scale
        x = _rms_norm(h, state[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(x @ state[p + "mlp.gate_proj.weight"].T)
        mlp = (gate * (x @ state[p + "mlp.up_proj.weight"].T)) @ state[p + "mlp.down_proj.weight"].T
        h = h + mlp * residual_scale
    h = _rms_norm(h, state["model.norm.weight"], eps)
    return (h / (hidden / config["dim_model_base"])) @ embed.T


def greedy(
    config: dict, state: dict, prompt_ids: list[int], new_tokens: int, repetition_penalty: float = 1.0
) -> list[int]:
    """Greedy decoding by full recomputation, with generate()'s repetition penalty; stops at EOS."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(new_tokens):
        last = logits(config, state, ids)[-1]
        if repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            vals = last[seen]
            last[seen] = torch.where(vals < 0, vals * repetition_penalty, vals / repetition_penalty)
        token = int(last.argmax())
        out.append(token)
        ids.append(token)
        if token == config["eos_token_id"]:
            break
    return out


def chat_prompt(query: str) -> str:
    """The MiniCPM template for one user turn, written out by hand."""
    return "<用户>" + query.strip() + "<AI>"


def sentencepiece_of(path: Path):
    """The checkpoint's tokenizer.model through sentencepiece itself: the tokenization reference."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))


def encode(sp, text: str) -> list[int]:
    """The ids MiniCPM-2B was trained on: BOS, then sentencepiece's encoding."""
    return [sp.bos_id(), *sp.encode(text)]


def clean(sp, generated: list[int], eos_id: int) -> str:
    """model.chat's clean-up: drop EOS, decode with sentencepiece, keep the text before the first turn marker."""
    if generated and generated[-1] == eos_id:
        generated = generated[:-1]
    text = sp.decode(generated)
    match = MARKER.findall(text)
    return match[0] if match else text
