"""Load time of the real MiniCPM-2B shape: the download's fp32 pickle vs the bf16 safetensors copy.

    python -m bench.load_time --dir /tmp/minicpm-full      # builds 10.9 GB + 5.45 GB there once

Random weights of the full shape (tiny.py's "full": 2304 hidden, 40 layers, 122753 vocabulary),
written as the download writes them (one fp32 pytorch_model.bin), converted as
`download.py --convert bf16-safetensors` does, then each loaded by api.py's loader in a fresh
process. Both load as bfloat16, which is what a GPU serves. The OS page cache is dropped
before each load when the machine allows it (root on Linux); the output says which it was.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from minicpm_server.model.hub import convert_to_bf16_safetensors, converted_dir
from minicpm_server.model.tiny import build_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
_LOAD = (
    "import json, sys, time; from minicpm_server.model.checkpoint import load_checkpoint; t = time.perf_counter(); "
    "c = load_checkpoint(sys.argv[1], device=sys.argv[2], dtype='bfloat16'); "
    "print(json.dumps({'seconds': time.perf_counter() - t}))"
)


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_load(path: Path, device: str) -> tuple[float, bool]:
    cold = drop_page_cache()
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path), device], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"], cold


def size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".bin", ".safetensors")) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/minicpm-full")
    parser.add_argument("--size", default="full")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    fp32 = Path(args.dir) / f"MiniCPM-{args.size}-fp32"
    if not (fp32 / "pytorch_model.bin").exists():
        start = time.perf_counter()
        build_tiny_checkpoint(fp32, args.size, seed=0, dtype=torch.float32)
        print(f"built {fp32} in {time.perf_counter() - start:.0f} s", flush=True)
    bf16 = converted_dir(fp32)
    if not (bf16 / "model.safetensors").exists():
        start = time.perf_counter()
        convert_to_bf16_safetensors(fp32, bf16)
        print(f"converted to {bf16} in {time.perf_counter() - start:.0f} s", flush=True)
    print("| format | size on disk | load time (first) | load time (second) | page cache |")
    print("| --- | --- | --- | --- | --- |")
    for label, path in (("fp32 pytorch_model.bin (the download)", fp32), ("bf16 model.safetensors (--convert)", bf16)):
        first, cold = timed_load(path, args.device)
        second, _ = timed_load(path, args.device)
        print(
            f"| {label} | {size_gb(path):.2f} GB | {first:.1f} s | {second:.1f} s | {'dropped' if cold else 'warm'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
