"""Issue 25's two costs under many clients with unique prompts, each against its own baseline in
the same run, in alternating rounds (medians), on the benchmark checkpoint:

1. Mixed prefill (engine/native/mixed.py): the native engine in this process, closed-loop clients
   that each send unique prompts (the tutorial's question after a new number, as bench/peers.py
   sends) with the tutorial's sampling and `ignore_eos`, with --mixed-prefill on and off. No
   HTTP: only the engine's own throughput, so the ratio is the change's alone.
2. The sampler at 16 rows: this sampler (sampling.py: host-side decisions, the nucleus guess)
   against main's (tests/sampling_main.py, reads the device to decide) on the tutorial's
   temperature 0.5 / top_p 0.8, on flat logits (random weights: the nucleus is most of the
   vocabulary) and peaked ones, at the benchmark vocabulary and MiniCPM-2B's.

    python -m bench.unique_prompts                       # medium checkpoint, 16 and 32 clients, 3 rounds
    python -m bench.unique_prompts --clients 16 --rounds 5 --skip-sampler

Prints the machine's load average before and after: on a shared machine, compare ratios only;
tokens per CPU second of the process (all its threads) is the steadier of the two there, since
time spent waiting for a core is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from bench.peers import CACHE, Prompts
from minicpm_server.engine.native.engine import NativeEngine
from minicpm_server.engine.native.sampling import BatchSampling, draw_tokens, settle
from minicpm_server.engine.protocol import GenerationRequest, SamplingParams
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.tiny import cached_tiny_checkpoint

TUTORIAL = {"temperature": 0.5, "top_p": 0.8, "repetition_penalty": 1.02}


async def closed_loop(
    engine: NativeEngine, prompts: Prompts, clients: int, per_client: int, tokens: int
) -> tuple[float, float]:
    """Generated tokens per second of `clients` clients sending `per_client` requests each, and
    per CPU second of this process (every thread: the work done, whatever else runs beside it)."""
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, **TUTORIAL)

    async def client() -> int:
        made = 0
        for _ in range(per_client):
            handle = engine.submit(GenerationRequest(prompts.next().ids, params))
            async for event in handle.events():
                made = max(made, getattr(event, "completion_tokens", 0))
        return made

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    made = clients * per_client * tokens
    return made / (time.perf_counter() - start), made / (time.process_time() - cpu)


def engine_rounds(args) -> None:
    path = cached_tiny_checkpoint(CACHE, args.size, seed=0)
    engines = {}
    for mixed in (True, False):
        loaded = load_checkpoint(path, device="cpu", dtype="float32")
        engines[mixed] = NativeEngine(
            loaded.model, loaded.tokenizer, context_window=loaded.context_window, eos_token_id=2,
            max_batch=max(args.clients), mixed_prefill=mixed,
        )  # fmt: skip
        engines[mixed].start()
    prompts = Prompts(loaded.tokenizer, "unique")
    print(f"checkpoint {path}; prompt {len(prompts.next().ids)} tokens, {args.tokens} new tokens", flush=True)
    results: dict[tuple[bool, int], list[tuple[float, float]]] = {}
    try:
        for mixed in (True, False):  # warm-up
            asyncio.run(closed_loop(engines[mixed], prompts, 4, 1, 8))
        for r in range(args.rounds):
            for clients in args.clients:
                for mixed in (True, False) if r % 2 == 0 else (False, True):
                    rate, per_cpu = asyncio.run(closed_loop(engines[mixed], prompts, clients, 2, args.tokens))
                    results.setdefault((mixed, clients), []).append((rate, per_cpu))
                    print(
                        f"  round {r + 1} clients {clients} mixed {mixed!s:5}: {rate:7.1f} tok/s, "
                        f"{per_cpu:7.1f} tok per CPU s",
                        flush=True,
                    )
    finally:
        for engine in engines.values():
            engine.stop()
    print("\n| clients | measure | mixed prefill | separate prefill | mixed / separate |")
    print("| --- | --- | --- | --- | --- |")
    for clients in args.clients:
        for column, label in ((0, "tok/s"), (1, "tok per CPU s")):
            on = statistics.median(r[column] for r in results[(True, clients)])
            off = statistics.median(r[column] for r in results[(False, clients)])
            print(f"| {clients} | {label} | {on:.1f} | {off:.1f} | {on / off:.2f} |")


def sampler_case(vocab: int, scale: float, rounds: int, repeats: int) -> tuple[float, float]:
    """Milliseconds per call of main's sampler and of this one, 16 rows (medians of rounds)."""
    from tests import sampling_main

    rows, cpu = 16, torch.device("cpu")
    params = [SamplingParams(max_new_tokens=4, **TUTORIAL)] * rows
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    seen[:, :40] = True
    counts = torch.zeros(rows, vocab, dtype=torch.int32)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * scale
    theirs, ours = BatchSampling.build(params, [None] * rows, cpu), BatchSampling.build(params, [None] * rows, cpu)
    generator = torch.Generator().manual_seed(0)
    settle(draw_tokens(logits, seen, ours, generator, counts), ours)  # the first step learns the nucleus size
    steps = {
        "main": lambda: sampling_main.sample_next_tokens(logits, seen, theirs, generator, counts).tolist(),
        "this": lambda: settle(draw_tokens(logits, seen, ours, generator, counts), ours),
    }
    times: dict[str, list[float]] = {"main": [], "this": []}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            times[name].append((time.perf_counter() - start) / repeats * 1000)
    return statistics.median(times["main"]), statistics.median(times["this"])


def sampler_rounds(args) -> None:
    print("\n| vocabulary | logits | main's sampler ms | this sampler ms | main / this |")
    print("| --- | --- | --- | --- | --- |")
    for vocab, repeats in ((8192, 20), (122753, 3)):
        for scale, name in ((1.0, "flat"), (12.0, "peaked")):
            a, b = sampler_case(vocab, scale, args.rounds + 2, repeats)
            print(f"| {vocab} | {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--clients", default="16,32", type=lambda v: [int(c) for c in v.split(",")])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-sampler", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}", flush=True)
    if not args.skip_engine:
        engine_rounds(args)
    if not args.skip_sampler:
        sampler_rounds(args)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
