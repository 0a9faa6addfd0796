"""Our CPU kernels (engine/native/kernels) against PyTorch's products, per decoder layer of the
full-size MiniCPM-2B shape.

One "layer" is the four products the lean decoder runs per decoder layer (q/k/v fused 2304 ->
6912, o 2304 -> 2304, gate/up fused 2304 -> 11520, down 5760 -> 2304). A stack of `--layers`
distinct random layers is multiplied in turn, as a decode step does, so the weights stream
from memory and not from the cache (6 float32 layers are 1.5 GB). Candidates:

* f32 packed:     oneDNN on weights re-packed once (packed.py; the float32 path without our kernels)
* f32 dense:      x @ W.t(), PyTorch's default CPU product (MKL) on the weights as stored
* ours f32:       our kernel on the float32 weights as stored
* ours bf16:      our kernel on bfloat16 weights (float32 activations and arithmetic), tiled as
                  the engine lays them out after start-up (kernels.tiled())
* ours bf16 rows: the same on the weights in rows ([out, in], as stored)
* bf16 dense:     PyTorch's product on bfloat16 weights and activations (no oneDNN packing on AVX2)
* int8 pack_mm:   PyTorch's weight-only int8 kernel, bfloat16 activations (the int8 path without ours)
* ours int8:      our kernel on int8 weights with float32 scales, tiled as quantized
* ours int8 rows: the same in rows
* ... avx2:       (on a CPU with AVX-512) ours f32 / bf16 / int8 from the AVX2 build, which the
                  AVX-512 build replaces there

    python -m bench.cpu_kernels                          # rows 1,4,16; 6 layers; 3 rounds
    python -m bench.cpu_kernels --rows 1,16,64,512 --candidates "f32 packed,ours f32"

Candidates alternate within each round; medians of rounds; ratios against f32 packed, measured
in the same run. GB/s counts the bytes of weights read per layer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.quant_kernels import int8_weights
from minicpm_server.engine.native.kernels import CpuProducts, cpu_products, load_products, tiled

LAYER = ((2304, 6912), (2304, 2304), (2304, 11520), (5760, 2304))  # (in, out) per product
Product = Callable[[torch.Tensor], torch.Tensor]


def _int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    q, scales = int8_weights(weight)
    return q, scales.to(scale_dtype)


def candidates() -> dict[str, Callable[[torch.Tensor], tuple[Product, int]]]:
    """name -> weight -> (product of x, bytes of weights it reads)."""
    ours = cpu_products()

    def packed(w: torch.Tensor) -> tuple[Product, int]:
        p = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        return (lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")), w.nbytes

    def dense(w: torch.Tensor) -> tuple[Product, int]:
        return (lambda x: F.linear(x, w)), w.nbytes

    def bf16_dense(w: torch.Tensor) -> tuple[Product, int]:
        b = w.to(torch.bfloat16)
        return (lambda x: F.linear(x.to(torch.bfloat16), b)), b.nbytes

    def int8_pack_mm(w: torch.Tensor) -> tuple[Product, int]:
        q, s = _int8(w, torch.bfloat16)
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, s)), q.nbytes

    found: dict[str, Callable[[torch.Tensor], tuple[Product, int]]] = {
        "f32 packed": packed,
        "f32 dense": dense,
        "bf16 dense": bf16_dense,
        "int8 pack_mm": int8_pack_mm,
    }
    if ours is not None:
        found |= kernel_candidates(ours, "")
        if ours.isa != "avx2" and (avx2 := load_products("avx2")) is not None:
            found |= {
                name: make
                for name, make in kernel_candidates(avx2, " avx2").items()
                if name in ("ours f32 avx2", "ours bf16 avx2", "ours int8 avx2")
            }
    return found


def kernel_candidates(ours: CpuProducts, suffix: str) -> dict[str, Callable[[torch.Tensor], tuple[Product, int]]]:
    def ours_f32(w: torch.Tensor) -> tuple[Product, int]:
        return (lambda x: ours.linear(x, w)), w.nbytes

    def ours_bf16(layout: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], tuple[Product, int]]:
        def make(w: torch.Tensor) -> tuple[Product, int]:
            b = layout(w.to(torch.bfloat16))
            return (lambda x: ours.linear(x, b)), b.nbytes

        return make

    def ours_int8(layout: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], tuple[Product, int]]:
        def make(w: torch.Tensor) -> tuple[Product, int]:
            q, s = _int8(w, torch.float32)
            q = layout(q)
            return (lambda x: ours.linear(x, q, s)), q.nbytes

        return make

    def rows(w: torch.Tensor) -> torch.Tensor:
        return w

    return {
        f"ours f32{suffix}": ours_f32,
        f"ours bf16{suffix}": ours_bf16(tiled),
        f"ours bf16 rows{suffix}": ours_bf16(rows),
        f"ours int8{suffix}": ours_int8(tiled),
        f"ours int8 rows{suffix}": ours_int8(rows),
    }


def time_layers(products: list[Product], inputs: dict[int, torch.Tensor], repeats: int) -> float:
    """Seconds per layer: the whole stack, `repeats` times, best pass."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for (fan_in, _), product in zip(LAYER * (len(products) // len(LAYER)), products, strict=True):
            product(inputs[fan_in])
        best = min(best, time.perf_counter() - start)
    return best / (len(products) // len(LAYER))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the stack per round (best kept)")
    parser.add_argument("--candidates", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args()
    makers = candidates()
    names = args.candidates.split(",") if args.candidates else list(makers)
    missing = [n for n in names if n not in makers]
    if missing:
        raise SystemExit(f"unknown or unavailable here: {', '.join(missing)} (known: {', '.join(makers)})")
    ours = cpu_products()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
        f"our kernels: {ours.isa if ours else 'none'}"
    )
    generator = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(out, fan_in, generator=generator) * 0.02 for _ in range(args.layers) for fan_in, out in LAYER
    ]
    built = {}
    for name in names:
        made = [makers[name](w) for w in weights]
        built[name] = ([product for product, _ in made], sum(size for _, size in made) / args.layers)
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {fan_in: torch.randn(rows, fan_in, generator=generator) for fan_in, _ in LAYER}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                samples[name].append(time_layers(built[name][0], inputs, args.repeats))
        base = statistics.median(samples["f32 packed"]) if "f32 packed" in samples else None
        for name in names:
            seconds = statistics.median(samples[name])
            speed = f"  {base / seconds:5.2f}x f32 packed" if base else ""
            print(
                f"rows {rows:4d}  {name:19s} {seconds * 1e3:8.2f} ms/layer  "
                f"{built[name][1] / seconds / 1e9:5.1f} GB/s{speed}",
                flush=True,
            )


if __name__ == "__main__":
    main()
