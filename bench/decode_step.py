"""Per-step time of the decode forward pass, eager vs compiled, on the same model in the same run.

    python -m bench.decode_step                  # the `deep` checkpoint: 40 layers (MiniCPM-2B's depth), tiny width
    python -m bench.decode_step --size medium --batches 1,16

For each batch size, rows with `--context` tokens already in the cache take `--steps` decode
steps; the first compiled steps of each shape (compilation) are timed apart and left out.
Eager and compiled steps alternate in rounds, so machine noise hits both alike.
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
from minicpm_server.engine.native.compiled import DecodeForward
from minicpm_server.engine.native.paged import PagedKVCache
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
    args = parser.parse_args()
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicpm-server"
    loaded = load_checkpoint(cached_tiny_checkpoint(cache_root, args.size), device=args.device, dtype="auto")
    model, window, block = loaded.model, loaded.context_window, 16
    batches = [int(b) for b in args.batches.split(",")]
    shape = KvShape.of(model)
    blocks = max(batches) * blocks_for(args.context + args.steps * args.rounds * 2 + 1, block) + 1
    pool = BlockPool(blocks, block, prefix_caching=False)
    cache = PagedKVCache(
        shape.num_layers, blocks * block + 1, shape.kv_heads, shape.head_dim, shape.dtype, model.device
    )
    for t in (*cache.keys, *cache.values):
        t.normal_(0, 1)  # stands in for a prompt's keys and values
    cache.zero_null_block(block)
    runners = {
        flag: DecodeForward(
            model,
            cache,
            block_size=block,
            scratch_slot=blocks * block,
            max_batch=max(batches),
            context_window=window,
            compile=flag,
        )
        for flag in (False, True)
    }
    print(
        f"{args.size}: {shape.num_layers} layers, {loaded.model.config.hidden_size} wide, {model.device}; "
        f"{args.context} tokens of context, {args.steps} steps per round, {args.rounds} rounds"
    )
    with torch.inference_mode():
        for rows in batches:
            tables, length = [], args.context
            for _ in range(rows):
                reserved = pool.reserve([0], args.context + args.steps * args.rounds * 2 + 1)
                assert reserved is not None
                tables.append(reserved[0])
            width = blocks_for(window, block)
            table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=model.device)
            last = torch.full((rows,), 5, device=model.device)
            start = time.perf_counter()
            runners[True](last, torch.full((rows,), length, device=model.device), table, length + 1)
            compile_seconds = time.perf_counter() - start
            per_step: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for flag, runner in runners.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        lengths = torch.full((rows,), length, device=model.device)
                        runner(last, lengths, table, length + 1).argmax(-1).tolist()  # sync, as the engine does
                        length += 1
                    per_step[flag].append((time.perf_counter() - start) / args.steps)
            eager, compiled = statistics.median(per_step[False]), statistics.median(per_step[True])
            print(
                f"  batch {rows:3d}: eager {eager * 1000:7.2f} ms/step, compiled {compiled * 1000:7.2f} ms/step "
                f"-> {eager / compiled:.2f}x (first compiled step, compiling: {compile_seconds:.1f} s)"
                f"{'' if runners[True].is_compiled else '  [compiled step FAILED: fell back to eager]'}"
            )
            for t in tables:
                pool.release(t)


if __name__ == "__main__":
    main()
