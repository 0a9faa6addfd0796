"""Counting a thread's reads of tensor data back to the host: what makes a GPU step wait.

Two kinds, both counted: reads of one value (`.item()`, `bool(t)`, `int(t)`, `if t:`, ...), which
all reach PyTorch's dispatcher as `aten._local_scalar_dense` and are seen by a dispatch mode;
and whole-tensor reads (`.tolist()`, `.numpy()`, `.cpu()`, `.to("cpu")`), which on a CPU tensor
never reach the dispatcher, so the methods themselves are wrapped while counting. On CUDA the
same calls are exactly the device-to-host copies that synchronise, so a count taken here on CPU
holds there. The count is per thread: dispatch modes are thread-local, and the wrappers count only
on the thread that entered.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_WRAPPED = ("tolist", "numpy", "cpu")


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads: ...` then `reads.total`, and `reads.kinds` by name."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()
        self._thread = threading.get_ident()
        self._originals: dict[str, Any] = {}
        self._inside_wrapper = False

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._inside_wrapper:  # a wrapped method's own copy (tolist on CUDA): counted once, above
            pass
        elif func is torch.ops.aten._local_scalar_dense.default:
            self.kinds["item/bool"] += 1
        elif func is torch.ops.aten._to_copy.default and _to_host(args, kwargs or {}):
            self.kinds["to(cpu)"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostReads:
        self._thread = threading.get_ident()
        for name in _WRAPPED:
            self._originals[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name: str, original: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._thread or self._inside_wrapper:
                return original(tensor, *args, **kwargs)
            self.kinds[name] += 1
            self._inside_wrapper = True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._inside_wrapper = False

        return read


def _to_host(args: tuple, kwargs: dict) -> bool:
    source = args[0] if args else None
    device = kwargs.get("device")
    return (
        isinstance(source, torch.Tensor) and source.device.type != "cpu" and device is not None and device.type == "cpu"
    )
