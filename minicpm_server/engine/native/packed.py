"""Linear layers whose weights are pre-packed for oneDNN, for the native engine on CPU.

Why: a decode step multiplies a few rows by every weight matrix. On the 2-core CPU benchmark
the matrix products were 70-80% of a step, and PyTorch's default CPU product (MKL, with the
weights as stored) reached about half the machine's memory bandwidth at one row and did worse
at 16-32 rows. The same products through oneDNN on weights re-packed once into its blocked
layout took a whole lean decode step from 31.3 to 21.0 ms at 16 rows (1.49x) and from 46.4 to
35.0 ms at 32 (1.33x); at one row 9.6 vs 9.2 ms (medium checkpoint, both in one run). Answers
differ from the default product only in float rounding (~1e-5 on the logits here).

The packed copy replaces the module's weight, so the decoder layers take no more memory: each
of their nn.Linear becomes a PackedLinear, which transformers' forward (prefill) calls as before
and the lean decoder (lean.py) calls directly. The output head is packed as well (2.6-4x faster
products than the dense head at 1-32 rows), but as a copy: MiniCPM ties it to the embedding
table, which must stay dense for its row lookups. That copy is vocabulary x hidden size: 16 MB
on the benchmark model, 1.1 GB for MiniCPM-2B in float32.

Small matrices are left alone (MIN_HIDDEN_SIZE): there the extra cost of calling oneDNN
outweighs its faster arithmetic.

The two operators are PyTorch's own (`torch.ops.mkldnn`, what torch.compile's CPU backend
emits for frozen linear layers); they are probed once, and without them nothing is packed.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("minicpm_server.engine.native.packed")

# oneDNN picks its blocking for this many rows; products of any row count remain exact.
BATCH_HINT = 16
# Each packed product costs ~25 us more to call than PyTorch's default: on the 40-layer, 128-wide
# `deep` test model a packed decode step took 18.0 ms against 10.7 ms unpacked. From this width
# on (the 512-wide benchmark model; MiniCPM-2B is 2,304 wide) packing wins.
MIN_HIDDEN_SIZE = 512


def _product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed layout of a [out, in] weight."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)


@functools.cache
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU have oneDNN's packed linear operators for `dtype`, and
    they compute right. bfloat16 packing needs AVX512-BF16-class instructions (oneDNN refuses it
    on AVX2-only CPUs, such as the 2-core benchmark machine); bfloat16 weights then stay dense."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight = torch.arange(12.0).reshape(3, 4).to(dtype)
        x = torch.ones(2, 4, dtype=dtype)
        packed = _reorder(weight)
        return bool(torch.allclose(_product(x, packed).float(), (x @ weight.t()).float()))
    except Exception as exc:  # an operator missing or refusing: keep the plain products
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.info("oneDNN weight packing unavailable for %s (%s); using PyTorch's default products", dtype, reason)
        return False


def packs_weights(device: torch.device, hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether the native engine packs a model this wide, on this device, in this dtype: the one
    rule, asked by the lean decoder and by loading (model/loading.py packs as it reads)."""
    return device.type == "cpu" and hidden_size >= MIN_HIDDEN_SIZE and packing_available(dtype)


class PackedLinear(torch.nn.Module):
    """A bias-free nn.Linear whose weight lives only in oneDNN's packed layout. `weight` ([out,
    in]) may be a view into a memory-mapped file: packing reads it once and keeps no reference.

    `later=True` keeps `weight` as it is and computes from it with PyTorch's default product until
    `pack_now()` (the server packs layers after it is ready, between engine steps: see
    DeferredPacking); `on_packed(weight)` runs once packing has read it (loading releases the
    file mapping's pages there)."""

    # DeferredPacking's log line when every layer is done
    SETTLED = "packed {} linear layers for oneDNN"

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        later: bool = False,
        on_packed: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed: torch.Tensor | None = None
        self.dense: torch.Tensor | None = weight.detach()
        self._on_packed = on_packed
        if not later:
            self.pack_now()

    @property
    def is_packed(self) -> bool:
        return self.packed is not None

    def pack_now(self) -> None:
        """Re-lay the weight out for oneDNN and let go of the dense one; idempotent."""
        if self.dense is None:
            return
        self.packed = _reorder(self.dense.contiguous())
        dense, self.dense = self.dense, None  # only once packed: a failed packing leaves the layer as it was
        if self._on_packed is not None:
            self._on_packed(dense)
            self._on_packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return _product(x, self.packed)
        return dense_product(x, self.dense)


def dense_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with PyTorch's default products, as fast as they go on a [out, in] weight:
    MKL's x @ W^T read the full-size layers at 3-4 GB/s for 4-16 rows where (W @ x^T)^T read
    them at 5.6-11 GB/s; at one row the plain product was the faster (12.8 against 11.9 GB/s)."""
    if x.numel() == x.shape[-1]:
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    return (weight @ rows.t()).t().contiguous().view(*x.shape[:-1], weight.shape[0])


def pack(parent: Any, name: str, *, later: bool = False) -> PackedLinear:
    """Replace `parent.<name>` (an nn.Linear without bias) by its packed form (`later`: packed
    when DeferredPacking gets to it); idempotent."""
    module = getattr(parent, name)
    if not isinstance(module, PackedLinear):
        module = PackedLinear(module.weight, later=later)
        setattr(parent, name, module)
    return module


class PackedProjection:
    """One or more packed linear layers applied to the same input, outputs side by side."""

    def __init__(self, parts: list[PackedLinear]) -> None:
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0].forward(x)
        return torch.cat([part.forward(x) for part in self.parts], dim=-1)


class DeferredPacking:
    """Packs a model's waiting PackedLinear layers one at a time, for the engine to call between
    steps and while idle, so that the server is ready before the layers are re-laid out.

    Why: packing MiniCPM-2B's float32 layers took 6.5-10 s of a 24-28 s start-up on the 2-core
    benchmark machine, and packing in a thread beside the imports saved little (both want the two
    cores and the memory bandwidth); packed after start-up, the server was ready in 15.9 s
    instead of 28.5 (BENCHMARKS.md). Until a layer is packed it computes from its dense weight, a
    view into the checkpoint's memory mapping (dense_product): at one row 12.8 GB/s against
    packed's 13.6, at 16 rows 5.6 against 6.5, so the first requests are slower, prompts most.
    Packed and dense products differ in float rounding only (~1e-5 on the logits)."""

    def __init__(self, layers: list[Any]) -> None:
        """`layers`: PackedLinear, or anything with `is_packed`, `pack_now()` and a SETTLED
        message (kernels.KernelLinear, whose "packing" is a copy out of the file's mapping)."""
        self.order = [layer for layer in layers if not layer.is_packed]
        self.waiting = deque(self.order)
        self.total = len(self.order)
        self.seconds = 0.0

    @property
    def left(self) -> int:
        return len(self.waiting)

    def pack_next(self) -> bool:
        """Pack one layer; whether any are left. A failure (out of memory, say) stops packing:
        the layers left keep computing from their dense weights."""
        if not self.waiting:
            return False
        start = time.perf_counter()
        try:
            self.waiting.popleft().pack_now()
        except Exception as exc:  # keep serving: the dense products are right, only slower
            log.warning("packing stopped (%s): %d layers keep PyTorch's default products", exc, len(self.waiting))
            self.waiting.clear()
            return False
        self.seconds += time.perf_counter() - start
        if not self.waiting:
            log.info("%s after start-up in %.1f s", self.order[0].SETTLED.format(self.total), self.seconds)
        return bool(self.waiting)


def warn_if_slow_half_precision(device: torch.device, hidden_size: int, dtype: torch.dtype) -> None:
    """bfloat16 on a CPU that oneDNN cannot pack it for (no AVX512-BF16 or AMX: AVX2 machines,
    AMD before Zen 4) goes through PyTorch's generic products: on the 2-core AVX2 machine, in one
    loaded run, the full-size model's first token took 31x and its decode step 2.7x as long as
    llama-server's at BF16 (BENCHMARKS.md). Whoever asked for bfloat16 for speed hears it once."""
    if device.type != "cpu" or dtype != torch.bfloat16 or hidden_size < MIN_HIDDEN_SIZE:
        return
    if packing_available(dtype):
        return
    log.warning(
        "bfloat16 weights on this CPU have no fast product (oneDNN packs them only on CPUs with "
        "AVX512-BF16 or AMX): they halve the memory but decode several times slower than float32; "
        "for speed use --dtype float32, or --quantization int8 for speed and a quarter of the memory"
    )
