"""Time of one weight-matrix product per candidate kernel, at the full-size MiniCPM-2B shapes.

The decode step is a handful of products of a few rows by every weight matrix, so the kernel
chosen for each weight format decides the step's speed. This times, on the same random matrix:

* f32 dense:        x @ W.t(), PyTorch's default CPU product (MKL), float32
* f32 packed:       oneDNN on a weight re-packed once (packed.py; today's float32 path)
* bf16 dense:       the same with bfloat16 weights and activations
* bf16 packed:      oneDNN's packed product on bfloat16 weights
* int8 pack_mm/f32: torch.ops.aten._weight_int8pack_mm, int8 weights with per-output-channel
                    scales, float32 activations
* int8 pack_mm/bf16: the same kernel with bfloat16 activations
* int8 dequant:     int8 weights widened to float32 before the product (what a kernel-less
                    fallback would cost)
* int8 dynamic:     FBGEMM's int8 x int8 product (torch.ops.quantized.linear_dynamic): the activations
                    quantized too, one scale per input tensor (W8A8, not weight-only)
* int4 g128:        torch.ops.aten._weight_int4pack_mm_for_cpu, 4-bit weights with a scale and
                    offset per 128 inputs of each output (the asymmetric group-wise layout of
                    gpt-fast and torchao's int4 weight-only), bfloat16 activations: is 4-bit
                    worth building next?

    python -m bench.quant_kernels                    # rows 1,16; every full-size matrix
    python -m bench.quant_kernels --rows 1,4,16 --shapes qkv,head --repeats 20

Shapes are [in -> out] as the lean decoder multiplies them (q/k/v fused, gate/up fused).
Kernels alternate within each round, so machine noise hits them alike; medians of rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = {  # name: (in_features, out_features) at MiniCPM-2B's size
    "qkv": (2304, 3 * 2304),
    "o": (2304, 2304),
    "gate_up": (2304, 2 * 5760),
    "down": (5760, 2304),
    "head": (2304, 122753),
}
Kernel = Callable[[torch.Tensor], torch.Tensor]


def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization (the same rule as packed.quantize_int8)."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def int4_weights(weight: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group` inputs: (the kernel's packed weight, its
    [in/group, out, 2] scales and offsets), so that W ~= q * scale + minimum."""
    out_features, in_features = weight.shape
    grouped = weight.reshape(out_features, in_features // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-10) / 15
    q = torch.round((grouped - low) / scale).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    # the kernel computes (q - 8) * scale + offset: the offset is the minimum plus eight steps
    offsets = low + 8 * scale
    scales_and_offsets = torch.stack([scale.squeeze(-1).t(), offsets.squeeze(-1).t()], dim=-1)
    return packed, scales_and_offsets.to(torch.bfloat16).contiguous()


def _onednn(weight: torch.Tensor) -> Kernel:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)  # bf16: refused on CPUs without AVX512-BF16 class
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _dense(weight: torch.Tensor) -> Kernel:
    return lambda x: x @ weight.t()


def _int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> Kernel:
    q, scales = int8_weights(weight)
    scales = scales.to(scale_dtype)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scales)


def _int8_widened(weight: torch.Tensor) -> Kernel:
    q, scales = int8_weights(weight)
    return lambda x: x @ (q.float() * scales[:, None]).t()


def _int4(weight: torch.Tensor) -> Kernel:
    q4, scales4 = int4_weights(weight)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 128, scales4)


def _int8_dynamic(weight: torch.Tensor) -> Kernel:
    """FBGEMM's dynamic int8 product (PyTorch's older quantization API): the same per-channel int8
    weights, and the activations quantized too, to 8 bits (7 with reduce_range, as on CPUs
    without VNNI) with one scale for the whole input, then integer products."""
    q, scales = int8_weights(weight)
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    qweight = torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)
    packed = torch.ops.quantized.linear_prepack(qweight, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


# name: (activation dtype, weight -> product as a function of x); built only when asked for
KERNELS: dict[str, tuple[torch.dtype, Callable[[torch.Tensor], Kernel]]] = {
    "f32 dense": (torch.float32, _dense),
    "f32 packed": (torch.float32, _onednn),
    "bf16 dense": (torch.bfloat16, lambda w: _dense(w.to(torch.bfloat16))),
    "bf16 packed": (torch.bfloat16, lambda w: _onednn(w.to(torch.bfloat16))),
    "int8 pack_mm/f32": (torch.float32, lambda w: _int8(w, torch.float32)),
    "int8 pack_mm/bf16": (torch.bfloat16, lambda w: _int8(w, torch.bfloat16)),
    "int8 dequant": (torch.float32, _int8_widened),
    "int4 g128": (torch.bfloat16, _int4),
    "int8 dynamic": (torch.float32, _int8_dynamic),
}


def kernels_for(weight: torch.Tensor, names: list[str]) -> dict[str, tuple[torch.dtype, Kernel]]:
    """The asked-for candidates that this CPU runs: activation dtype and product."""
    kernels = {}
    for name in names:
        dtype, build = KERNELS[name]
        try:
            kernels[name] = (dtype, build(weight))
        except RuntimeError as exc:
            print(f"{name}: unavailable here ({str(exc).splitlines()[0]})")
    return kernels


def time_once(kernel: Kernel, x: torch.Tensor, repeats: int) -> float:
    kernel(x)
    start = time.perf_counter()
    for _ in range(repeats):
        kernel(x)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--kernels", default="", help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    for name in args.shapes.split(","):
        fan_in, fan_out = SHAPES[name]
        weight = torch.randn(fan_out, fan_in) * 0.02
        kernels = kernels_for(weight, args.kernels.split(",") if args.kernels else list(KERNELS))
        for m in rows:
            times: dict[str, list[float]] = {k: [] for k in kernels}
            for _ in range(args.rounds):
                for kernel_name, (dtype, kernel) in kernels.items():
                    x = torch.randn(m, fan_in).to(dtype)
                    times[kernel_name].append(time_once(kernel, x, args.repeats))
            base = statistics.median(times["f32 packed"]) if "f32 packed" in times else None
            for kernel_name, samples in times.items():
                ms = statistics.median(samples) * 1e3
                ratio = f"{base * 1e3 / ms:5.2f}x f32 packed" if base else ""
                print(f"{name:8s} {fan_in}->{fan_out:<7d} rows {m:3d}  {kernel_name:18s} {ms:8.3f} ms  {ratio}")
        del weight, kernels


if __name__ == "__main__":
    main()
