"""A KV cache that a running batch can grow in place, join, and shrink.

transformers' DynamicLayer concatenates the whole cache with the new token on every decode step,
copying O(batch x time) memory per layer per token. This layer keeps its keys and values in a
buffer with spare room at the end, so a decode step writes one column in place; the buffer
doubles when it fills. Rows join (`concat`) and leave (`select`) only between steps, where one
copy is cheap next to the steps it saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer


def _with_headroom(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    length = keys.shape[-2]
    capacity = length + max(64, length)
    shape = (*keys.shape[:-2], capacity, keys.shape[-1])
    new_k = keys.new_zeros(shape)
    new_v = values.new_zeros(shape)
    new_k[..., :length, :] = keys
    new_v[..., :length, :] = values
    return new_k, new_v


class GrowableLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Adopt these tensors as the layer's contents, copied into a buffer with headroom."""
        self.is_initialized = True
        self.device = keys.device
        self._length = keys.shape[-2]
        self._k, self._v = _with_headroom(keys, values)
        self._expose()

    def _expose(self) -> None:
        self.keys = self._k[..., : self._length, :]
        self.values = self._v[..., : self._length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._k is None:
            self.lazy_initialization(key_states, value_states)
            self._set(key_states, value_states)
            return self.keys, self.values
        new = key_states.shape[-2]
        if self._length + new > self._k.shape[-2]:
            self._k, self._v = _with_headroom(self.keys, self.values)
        self._k[..., self._length : self._length + new, :] = key_states
        self._v[..., self._length : self._length + new, :] = value_states
        self._length += new
        self._expose()
        return self.keys, self.values


class GrowableCache(Cache):
    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[GrowableLayer() for _ in range(num_layers)])

    def zero_padding(self, mask: torch.Tensor) -> None:
        """Zero K/V where `mask` [B, T] is 0, so padded columns can never leak NaNs into attention."""
        pad = ~mask.bool()[:, None, :, None]
        for layer in self.layers:
            layer.keys.masked_fill_(pad, 0)
            layer.values.masked_fill_(pad, 0)

    def select(self, rows: torch.Tensor, start: int) -> GrowableCache:
        """A cache of only these rows, without the first `start` columns."""
        out = GrowableCache(len(self.layers))
        for src, dst in zip(self.layers, out.layers, strict=True):
            dst._set(src.keys[rows, :, start:], src.values[rows, :, start:])
        return out

    @staticmethod
    def concat(a: GrowableCache, b: GrowableCache, width: int) -> GrowableCache:
        """Stack two batches' caches, left-padding each to `width` columns."""
        out = GrowableCache(len(a.layers))
        for la, lb, dst in zip(a.layers, b.layers, out.layers, strict=True):

            def padded(t: torch.Tensor) -> torch.Tensor:
                return F.pad(t, (0, 0, width - t.shape[-2], 0))

            dst._set(torch.cat([padded(la.keys), padded(lb.keys)]), torch.cat([padded(la.values), padded(lb.values)]))
        return out
