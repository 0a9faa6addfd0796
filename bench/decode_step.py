"""Per-step time of the decode forward pass several ways, on the same checkpoint in the same run:
transformers' forward ("transformers", eager), our lean decoder on plain weights ("lean") and on
oneDNN-packed ones ("lean+packed"; the default on CPU for models at least 512 wide), and the
compiled step ("compiled", --compile).

    python -m bench.decode_step                  # the `deep` checkpoint: 40 layers (MiniCPM-2B's depth), tiny width
    python -m bench.decode_step --size medium --batches 1,16,32
    python -m bench.decode_step --no-compile     # skip the compiled step (compiling takes minutes here)
    python -m bench.decode_step --size medium --no-compile --int8   # and the lean step on int8 weights

For each batch size, rows with `--context` tokens already in the cache take `--steps` decode
steps; the first compiled steps of each shape (compilation) are timed apart and left out.
They alternate in rounds, so machine noise hits them alike. Ratios are against
transformers' forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from minicpm_server.engine.native.blocks import BlockPool, blocks_for
from minicpm_server.engine.native.budget import KvShape
from minicpm_server.engine.native.packed import packing_available
from minicpm_server.engine.native.paged import PagedKVCache
from minicpm_server.engine.native.quantized import quantize_model
from minicpm_server.engine.native.runner import DecodeForward
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.tiny import cached_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="deep")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled step")
    parser.add_argument("--int8", action="store_true", help="also the lean step on int8 weights (quantized.py)")
    args = parser.parse_args()
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicpm-server"
    checkpoint = cached_tiny_checkpoint(cache_root, args.size)
    loaded = load_checkpoint(checkpoint, device=args.device, dtype="auto")
    model, window, block = loaded.model, loaded.context_window, 16
    batches = [int(b) for b in args.batches.split(",")]
    kinds: dict[str, dict] = {"transformers": {"lean": False}, "lean": {"lean": True, "pack_weights": False}}
    if packing_available():
        kinds["lean+packed"] = {"lean": True, "pack_weights": True}
    if args.int8:
        kinds["lean+int8"] = {"lean": True}
    if not args.no_compile:
        kinds["compiled"] = {"compile": True}
    shape = KvShape.of(model)
    tokens_per_row = args.context + args.steps * args.rounds * len(kinds) + 1
    blocks = max(batches) * blocks_for(tokens_per_row, block) + 1
    pool = BlockPool(blocks, block, prefix_caching=False)
    cache = PagedKVCache(
        shape.num_layers, blocks * block + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device
    )
    for t in (*cache.keys, *cache.values):
        t.normal_(0, 1)  # stands in for a prompt's keys and values
    cache.zero_null_block(block)
    runners = {
        # Each lean or compiled step its own copy of the model: the lean step re-lays out (and may
        # pack) the layers of the model it runs; transformers' forward leaves its copy as loaded.
        name: DecodeForward(
            model if name == "transformers" else model_copy(checkpoint, args.device, int8=name == "lean+int8"),
            cache,
            block_size=block,
            scratch_slot=blocks * block,
            max_batch=max(batches),
            context_window=window,
            **{"compile": False, **options},
        )
        for name, options in kinds.items()
    }
    print(
        f"{args.size}: {shape.num_layers} layers, {loaded.model.config.hidden_size} wide, {model.device}; "
        f"{args.context} tokens of context, {args.steps} steps per round, {args.rounds} rounds"
    )
    with torch.inference_mode():
        for rows in batches:
            time_steps(runners, pool, rows, args, tokens_per_row, blocks_for(window, block), model.device)


def model_copy(checkpoint: Path, device: str, *, int8: bool):
    model = load_checkpoint(checkpoint, device=device, dtype="auto").model
    if int8:
        quantize_model(model, "int8")
    return model


def time_steps(runners: dict, pool: BlockPool, rows: int, args, tokens_per_row: int, width: int, device) -> None:
    tables, length = [], args.context
    for _ in range(rows):
        reserved = pool.reserve([0], tokens_per_row)
        assert reserved is not None
        tables.append(reserved[0])
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
    last = torch.full((rows,), 5, device=device)
    compile_note = ""
    if "compiled" in runners:
        start = time.perf_counter()
        runners["compiled"](last, torch.full((rows,), length, device=device), table, length + 1)
        compile_note = f" (first compiled step, compiling: {time.perf_counter() - start:.1f} s)"
        if not runners["compiled"].is_compiled:
            compile_note += "  [compiled step FAILED: fell back to eager]"
    per_step: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                lengths = torch.full((rows,), length, device=device)
                runner(last, lengths, table, length + 1).argmax(-1).tolist()  # sync, as the engine does
                length += 1
            per_step[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(times) for name, times in per_step.items()}
    base = medians["transformers"]
    shown = ", ".join(
        f"{name} {ms * 1000:7.2f} ms/step" + ("" if name == "transformers" else f" ({base / ms:.2f}x)")
        for name, ms in medians.items()
    )
    print(f"  batch {rows:3d}: {shown}{compile_note}")
    for t in tables:
        pool.release(t)


if __name__ == "__main__":
    main()
