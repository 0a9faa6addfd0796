"""What a client may be told about the served checkpoint: its size, shape and files, without torch.

Ollama's `/api/tags`, `/api/show` and `/api/ps` describe a model by its parameter count, weight
format, quantization, bytes on disk and in memory, and its architecture's numbers. All of it
comes from config.json and the weight files' sizes, read once when the model loads, so the
HTTP side never reaches into a backend for it (the vLLM backend holds no torch model at all).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bytes per parameter at each dtype the server loads weights in (fp8: vLLM's --quantization fp8;
# int8: the native engine's, whose per-channel scales and norms add well under 1%).
_BYTES_PER_PARAMETER = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelFacts:
    config: dict[str, Any]  # config.json as read
    parameter_count: int
    weight_format: str  # "safetensors" or "pytorch"
    file_bytes: int  # the weight files on disk
    modified: float  # the newest weight file's modification time (seconds since the epoch)
    digest: str  # an identifier of the checkpoint (see checkpoint_digest), not a hash of the weights
    dtype: str  # what the weights are held in: "bfloat16", "float16", "float32", "fp8" or "int8"
    device: str  # "cuda" or "cpu"

    @property
    def memory_bytes(self) -> int:
        """The weights in memory at the served dtype (the KV cache is not counted)."""
        return self.parameter_count * _BYTES_PER_PARAMETER.get(self.dtype, 4)


def parameter_count(config: dict[str, Any]) -> int:
    """MiniCPM's parameters from its config: embeddings, per layer the four attention projections,
    the gated MLP's three and two RMSNorm weights, the final norm; no biases. The output head
    shares the embeddings unless tie_word_embeddings is false (absent means tied)."""
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q and o; k and v
    mlp = 3 * hidden * int(config["intermediate_size"])
    per_layer = attention + mlp + 2 * hidden
    head = 0 if config.get("tie_word_embeddings", True) else vocab * hidden
    return vocab * hidden + int(config["num_hidden_layers"]) * per_layer + hidden + head


def parameter_size(count: int) -> str:
    """Ollama's way of writing it: "2.7B", "494.0M"."""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e3:.1f}K"


def checkpoint_digest(config: dict[str, Any], weight_files: tuple[Path, ...]) -> str:
    """sha256 over config.json's content and the weight files' names and sizes: it changes when the
    checkpoint does, and costs no read of the gigabytes of weights (Ollama's digest hashes a manifest)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in sorted(weight_files):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def model_facts(config: dict[str, Any], weight_files: tuple[Path, ...], dtype: str, device: str) -> ModelFacts:
    sizes = [path.stat() for path in weight_files]
    safetensors = any(path.suffix == ".safetensors" for path in weight_files)
    return ModelFacts(
        config=config,
        parameter_count=parameter_count(config),
        weight_format="safetensors" if safetensors else "pytorch",
        file_bytes=sum(s.st_size for s in sizes),
        modified=max((s.st_mtime for s in sizes), default=0.0),
        digest=checkpoint_digest(config, weight_files),
        dtype=dtype,
        device=device,
    )
