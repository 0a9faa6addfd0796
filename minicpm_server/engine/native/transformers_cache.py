"""The paged KV pool as transformers' `Cache`, for when the model is transformers' Granite
(model/checkpoint.py, `--model-impl transformers`). A module of its own so that importing the
engine does not import transformers (seconds on a CPU; our own MiniCPM takes the pool as is)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from minicpm_server.engine.native.paged import PagedKVCache


class TransformersCache(Cache):
    """Hands each layer's keys and values to the paged pool, which writes them and returns what
    the layer's queries may see (PagedKVCache.update)."""

    def __init__(self, paged: PagedKVCache) -> None:
        super().__init__(layers=[])
        self.paged = paged

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.paged.update(key_states, value_states, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.paged.get_seq_length(layer_idx)
