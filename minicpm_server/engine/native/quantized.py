"""Weight-only int8 for the native engine (`--quantization int8`): quantized as the model loads.

Each weight matrix W [out, in] becomes int8 values Q and one scale per output channel s, with
W ~= Q * s[:, None] (symmetric, s = max|W[row]| / 127). Activations, norms, attention and the
KV cache stay in the model's dtype; only the weights shrink (4x against float32), which is what
a decode step is bound by: every step reads every weight once.

On CPU with AVX2 the product is our own kernel (kernels/products.cpp): each int8 weight is
widened to float32 in registers and multiplied by float32 activations, and the scales stay in
float32. The int8 values are laid out in the kernel's tiles (kernels.tiled(): 4 outputs, 64
weights of each in turn) as they are quantized, unless a table is also read by rows (the tied
embedding under --quantize-head). At the full-size shapes on the 2-core AVX2 CPU that took 5.5
ms per decoder layer at one row against 6.7 for PyTorch's kernel below (rows), and 20.5 against
33.9 ms at 16 rows; tiled, about 1.3x faster than rows at one row (BENCHMARKS.md).

Where our kernels are unavailable (no compiler, another CPU), the product is PyTorch's own
weight-only int8 kernel, `torch.ops.aten._weight_int8pack_mm`
(x [m, in] times Q [out, in], then per-channel scales). `python -m bench.quant_kernels` chose it:
on this 2-core AVX2 CPU, at the full-size shapes, it took 0.37-0.47x the time of the float32
oneDNN product at one row, and about the same at 16 rows, when fed bfloat16 activations. Fed
float32 activations the same kernel was 2-20x slower (no vectorized path for them here), so the
activations go in as bfloat16 and the result comes back in the model's dtype. The kernel wants
its scales in the activations' dtype: the scales are rounded to bfloat16 *before* the weights
are divided by them, so that rounding moves the grid, not the values (no systematic error).

On CUDA the same operator exists but is a plain loop (one thread per output element, reading
its weight row alone, in float32), so there the product is written as `linear(x, Q.to(dtype)) *
s`: eager it widens each matrix for its product (weights held in a quarter of float32's memory,
not faster than bf16), and under `--compile` inductor fuses the widening into the product, which
is how gpt-fast runs int8 weights on GPUs. Not yet measured on a GPU here.

MiniCPM ties the output head to the embedding table. Quantized, both read one int8 table: the
head as a product, the embedding as a row lookup times that row's scale. So the full-size model
holds 2.7 GB of weights instead of 10.9 GB (float32) and needs no dense copy of the table.

`quantize_linear` converts one layer, so a loader that streams layers can quantize each as it
arrives; `quantize_model` walks a loaded model.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
import torch.nn.functional as F

from minicpm_server.engine.native.kernels import (
    built_products,
    can_tile,
    cpu_products,
    is_tiled,
    matrix_shape,
    tiled,
    untiled,
)
from minicpm_server.model.loading import return_freed_memory

log = logging.getLogger("minicpm_server.engine.native.quantized")

FORMATS = ("int8",)
# The int8 kernel's fast paths take 16-bit activations (see the module docstring).
ACTIVATION_DTYPE = torch.bfloat16
# Names of the linear layers in each decoder layer that are quantized (all of them).
LAYER_LINEARS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def activation_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float16 models keep float16 (the kernel takes it too); everything else goes in as bfloat16."""
    return torch.float16 if model_dtype == torch.float16 else ACTIVATION_DTYPE


# Rows quantized at a time, through one float32 buffer (2.4-5.9 MB at MiniCPM-2B's widths, so a
# block stays in cache between its passes); quantizing while loading adds almost nothing to the peak.
CHUNK_ROWS = 256


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (Q [out, in] int8, scales [out] in `scale_dtype`), on
    `weight`'s device. `weight` may be a view into a mapped file; it is read a block of rows at
    a time."""
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    quotient = torch.empty((min(CHUNK_ROWS, weight.shape[0]), weight.shape[1]), device=weight.device)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        w = weight[start : start + CHUNK_ROWS]
        step = quotient[: w.shape[0]]
        largest = torch.linalg.vector_norm(w, ord=float("inf"), dim=1, dtype=torch.float32)  # max |w| per row
        scales[start : start + w.shape[0]] = (largest.clamp_(min=1e-10) / 127.0).to(scale_dtype)
        # in place on one buffer: each pass over a block is one read and one write, no new memory
        torch.div(w, scales[start : start + w.shape[0]].float()[:, None], out=step)
        q[start : start + w.shape[0]] = step.round_().clamp_(-127, 127)
    return q, scales


class Int8Linear(torch.nn.Module):
    """A bias-free linear layer over int8 weights and per-channel scales. `qweight` is [out, in],
    or in our CPU kernel's tiled layout (kernels.tiled()), which only that kernel reads."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, output_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = matrix_shape(qweight)
        self.output_dtype = output_dtype  # what the model computes in (the layer's input dtype)
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, tile: bool = True) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("int8 quantization here is for bias-free linear layers (MiniCPM has no biases)")
        return cls.from_weight(linear.weight, linear.weight.dtype, tile=tile)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, model_dtype: torch.dtype, device: torch.device | None = None, *, tile: bool = True
    ) -> Int8Linear:
        """From a weight matrix [out, in] (a view into a mapped checkpoint will do: model/loading.py
        quantizes each matrix as it reads it), for a model computing in `model_dtype`, on `device`
        (default: the weight's). With our CPU kernel, float32 scales and (`tile`, where the shape
        allows) its tiled layout; `tile=False` for a table the embedding also reads by rows."""
        target = device or weight.device
        ours = target.type == "cpu" and cpu_products() is not None  # our kernel takes float32 scales
        qweight, scales = quantize_int8(weight, torch.float32 if ours else activation_dtype(model_dtype))
        if device is not None and device != qweight.device:
            qweight, scales = qweight.to(device), scales.to(device)
        if ours and tile and can_tile(qweight):
            qweight = tiled(qweight)
        return cls(qweight, scales, model_dtype)

    @property
    def tiled(self) -> bool:
        return is_tiled(self.qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiled_weights = self.tiled
        if tiled_weights or not self.qweight.is_cuda:
            # tiled weights were made for the kernel, so it is there (even if switched off since)
            products = cpu_products() or (built_products() if tiled_weights else None)
            if products is not None and products.supports(self.qweight):
                return products.linear(x, self.qweight, self.scales.float()).to(x.dtype)
        flat = x.reshape(-1, self.in_features).to(self.scales.dtype)
        product = widening_product if self.qweight.is_cuda else packed_int8_product
        y = product(flat, self.qweight, self.scales)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """W as the kernel sees it, in float32 [out, in] (tests and accuracy checks)."""
        return untiled(self.qweight).float() * self.scales.float()[:, None]


def packed_int8_product(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """PyTorch's weight-only int8 kernel (the CPU path)."""
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scales)


def widening_product(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same product written for the compiler to fuse (the CUDA path; see the module docstring)."""
    return F.linear(x, qweight.to(x.dtype)) * scales


class Int8Embedding(torch.nn.Module):
    """Row lookups from the int8 table the output head multiplies by (MiniCPM ties the two)."""

    def __init__(self, table: Int8Linear) -> None:
        super().__init__()
        if table.tiled:
            raise ValueError("the embedding reads the int8 table by rows: quantize it with tile=False")
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.table.qweight).to(self.table.output_dtype)
        return rows * self.table.scales[ids].to(self.table.output_dtype).unsqueeze(-1)


class TableEmbedding(torch.nn.Module):
    """Row lookups from a table kept in another dtype than the model's (a bfloat16 table under
    int8), returned in the model's dtype. `weight` is the table itself (the head is tied to it)."""

    def __init__(self, weight: torch.nn.Parameter, output_dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight
        self.output_dtype = output_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.output_dtype)


def table_in(model: Any, dtype: torch.dtype) -> bool:
    """Keep a tied embedding table (and so the output head) in `dtype` (bfloat16 under int8 on
    CPU: model/loading.py reads it so) while the model computes in its own dtype: the embedding
    becomes a TableEmbedding and the head our kernel's KernelLinear over the same table, which
    takes float32 activations and returns the model's dtype.

    Why: under int8 the layers shrink 4x, and the float32 table (1.13 GB for MiniCPM-2B) is then
    a third of what a decode step reads; in bfloat16 it reads in about 35 ms instead of 54 at one
    row on the 2-core AVX2 CPU, and holds 0.57 GB less. Its rounding (8 bits of mantissa, per
    weight) moves next-token distributions far less than int8 would (BENCHMARKS.md, accuracy).

    False (nothing changed) where our CPU kernels are not there, the table is not tied, or it is
    quantized already."""
    inner = model.model
    head = model.lm_head
    products = cpu_products()
    if products is None or not isinstance(head, torch.nn.Linear) or head.weight is not inner.embed_tokens.weight:
        return False
    from minicpm_server.engine.native.kernels import KernelLinear

    model_dtype = inner.norm.weight.dtype
    table = head.weight
    if table.dtype != dtype:
        table.data = table.data.to(dtype)
    inner.embed_tokens = TableEmbedding(table, model_dtype)
    model.lm_head = KernelLinear(table, products, tile=False)
    return True


def weights_in(model: Any, dtype: torch.dtype) -> None:
    """A loaded float32 model's linear layers and tied table with weights in `dtype` (bfloat16),
    computed by our CPU kernels in float32: what `--dtype bfloat16` serves on CPU with them
    (model/loading.py, LinearForm "kernel", converts as it reads; bench/accuracy.py converts a
    loaded model with this)."""
    from minicpm_server.engine.native.kernels import KernelLinear

    products = cpu_products()
    if products is None:
        raise RuntimeError("bfloat16 weights in a float32 model need our CPU kernels")
    for layer in model.model.layers:
        for block_name, names in LAYER_LINEARS.items():
            block = getattr(layer, block_name)
            for name in names:
                weight = getattr(block, name).weight.detach()
                setattr(block, name, KernelLinear(weight.to(dtype), products))
    table_in(model, dtype)


def fuse(parts: list[Int8Linear]) -> Int8Linear:
    """One Int8Linear whose outputs are the parts' side by side (q/k/v, gate/up: one product per
    step). Each part's buffers become row slices of the fused ones, so no weight is held twice and
    transformers' forward (prefill) still calls each part."""
    if len(parts) == 1:
        return parts[0]
    fused = Int8Linear(
        torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), parts[0].output_dtype
    )
    start = 0
    for part in parts:
        rows = part.out_features
        per_entry = rows // part.qweight.shape[0]  # 4 outputs per entry of a tiled layout, else 1
        part.qweight = fused.qweight[start // per_entry : (start + rows) // per_entry]
        part.scales = fused.scales[start : start + rows]
        start += rows
    return fused


def quantize_linear(linear: torch.nn.Module, fmt: str = "int8", *, tile: bool = True) -> torch.nn.Module:
    """One layer in `fmt` (see FORMATS); an already quantized layer is returned as it is.
    `tile=False`: a table the embedding also reads by rows (Int8Linear.from_weight)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")
    if isinstance(linear, Int8Linear):
        return linear
    return Int8Linear.from_linear(linear, tile=tile)


def quantize_decoder_layer(layer: Any, fmt: str = "int8") -> None:
    """Replace the linear layers of one decoder layer in place (what a streaming loader calls)."""
    for block_name, names in LAYER_LINEARS.items():
        block = getattr(layer, block_name)
        for name in names:
            setattr(block, name, quantize_linear(getattr(block, name), fmt))


def quantize_model(model: Any, fmt: str = "int8", *, head: bool = True) -> None:
    """Quantize a loaded Granite/MiniCPM model in place, layer by layer (each layer's dense
    weights are freed before the next is converted), then (`head`) the output head and, when
    tied to it, the embedding table. `head=False` keeps them dense (bench/accuracy.py measures
    what quantizing them costs)."""
    inner = model.model
    for layer in inner.layers:
        quantize_decoder_layer(layer, fmt)
    if head:
        tied = isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is inner.embed_tokens.weight
        table = quantize_linear(model.lm_head, fmt, tile=not tied)  # a tied table is read by rows too
        model.lm_head = table
        if tied:
            inner.embed_tokens = Int8Embedding(table)
    own_remaining_tensors(model)
    gc.collect()
    return_freed_memory()
    log.info("weights quantized to %s (per-channel scales; %.2f GB of weights now)", fmt, weight_bytes(model) / 1e9)


def own_remaining_tensors(model: Any) -> None:
    """Copy the tensors quantization left as loaded (norms, rotary tables) into memory of their own.

    transformers maps a float32 checkpoint file into memory and its tensors point into that
    mapping; as long as one of them (a 2304-float norm weight) is alive, the whole file stays
    mapped and its pages, all read once by quantizing, count in the process's memory (seen: 16 GB
    resident for the full-size model, whose int8 weights take 2.7 GB)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            continue
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.clone()
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.clone()


def weight_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer (a tied table counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total
