"""The output head of the full MiniCPM-2B shape on CPU: the packed copy against reading the tied
embedding table itself, so the copy (vocabulary x hidden: 1.13 GB in float32) is kept only if
it buys speed.

    python -m bench.head                  # float32, 1/4/16 rows, 30 alternating repeats
    python -m bench.head --dtype bfloat16 --rows 1,16

Contenders, each computing logits = x @ E^T for E [122753, 2304]:

  packed      oneDNN-packed copy of E (what the lean decoder does on CPU today; packed.py)
  dense       F.linear(x, E): the embedding table as it is, no copy
  input-major x @ E^T with E^T stored contiguously ([hidden, vocab]); the embedding then reads
              its rows as a strided view of it (what the lean decoder does when not packing), so
              also no second copy

Medians of alternating repeats (the machine is shared; the table also gives the load average).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minicpm_server.engine.native.packed import PackedLinear, packing_available

VOCAB, HIDDEN = 122_753, 2_304


def contenders(table: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"dense": lambda x: F.linear(x, table)}
    input_major = table.t().contiguous()
    out["input-major"] = lambda x: x @ input_major
    if packing_available(table.dtype):
        out["packed"] = PackedLinear(table)
    return out


def seconds(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    function(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", default="1,4,16", type=lambda s: [int(r) for r in s.split(",")])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    table = (torch.randn(VOCAB, HIDDEN) * 0.02).to(dtype)
    functions = contenders(table)
    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}")
    print(f"| rows | {' | '.join(functions)} | dense / packed | input-major / packed |")
    print("| --- |" + " --- |" * (len(functions) + 2))
    with torch.inference_mode():
        for rows in args.rows:
            x = torch.randn(rows, HIDDEN).to(dtype)
            reference = F.linear(x, table).float()
            for name, function in functions.items():  # same answers (to float rounding), and warm
                assert torch.allclose(function(x).float(), reference, rtol=1e-2, atol=1e-2), name
            times: dict[str, list[float]] = {name: [] for name in functions}
            for _ in range(args.repeats):
                for name, function in functions.items():
                    times[name].append(seconds(function, x))
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            ratios = [ms[n] / ms["packed"] if "packed" in ms else float("nan") for n in ("dense", "input-major")]
            cells = " | ".join(f"{value:.1f} ms" for value in ms.values())
            print(f"| {rows} | {cells} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
