"""Per-row state of a batch, selected and joined without naming its fields.

A dataclass that inherits RowState holds one entry per running sequence in every field: a tensor
whose first dimension is the row, a list, or another RowState. Dropping finished rows and joining
newcomers then works field by field, so a new per-row field needs no other edit.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

import torch

T = TypeVar("T", bound="RowState")


class RowState:
    def select(self: T, keep: list[int]) -> T:
        """The rows numbered `keep`, in that order."""
        return self._select(torch.tensor(keep, device=self._device()), keep)

    def _select(self: T, rows: torch.Tensor, keep: list[int]) -> T:
        return replace(self, **{f.name: _take(getattr(self, f.name), rows, keep) for f in fields(self)})  # type: ignore[arg-type]

    def _device(self) -> torch.device:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                return value.device
            if isinstance(value, RowState):
                return value._device()
        return torch.device("cpu")

    @classmethod
    def concat(cls: type[T], a: T, b: T) -> T:
        """a's rows, then b's."""
        return cls(**{f.name: _join(getattr(a, f.name), getattr(b, f.name)) for f in fields(cls)})  # type: ignore[arg-type]


def _take(value: Any, rows: torch.Tensor, keep: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, list):
        return [value[i] for i in keep]
    return value._select(rows, keep)


def _join(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, list):
        return a + b
    return type(a).concat(a, b)
