"""Time to first token of a chat's 5th turn, with and without prefix reuse, in the same run.

    python -m bench.prefix                       # medium CPU checkpoint, ~1,500 tokens of history at turn 5
    python -m bench.prefix --size tiny --repeats 1

Each conversation is four greedy turns of `--answer-tokens`, each resending its whole history
through the chat template as clients do; the 5th turn's time to first token is what a user
waits. Both engines run on the same loaded model, alternating, so machine noise hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import torch

from minicpm_server.engine.native.engine import NativeEngine
from minicpm_server.engine.protocol import Finished, GenerationRequest, SamplingParams
from minicpm_server.model import chat
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.tiny import COMMON_WORDS, cached_tiny_checkpoint

WORDS = COMMON_WORDS


def question(turn: int, words: int) -> str:
    return " ".join(WORDS[(turn * 7 + i * 3) % len(WORDS)] for i in range(words))


async def ask(engine: NativeEngine, ids: list[int], tokens: int) -> tuple[str, float]:
    """The answer's text and the seconds until its first token was out."""
    start = time.perf_counter()
    first, parts = None, []
    async for event in engine.submit(GenerationRequest(ids, SamplingParams(tokens, do_sample=False))).events():
        first = first or time.perf_counter() - start
        if isinstance(event, Finished):
            break
        parts.append(event.text)
    return "".join(parts), first or 0.0


async def conversation(engine: NativeEngine, tokenizer, turns: int, words: int, answer_tokens: int, salt: int):
    """Time to first token of the last turn, its prompt length, and the answers."""
    history: list[dict[str, str]] = []
    answers = []
    for turn in range(turns):
        text = f"{salt} " + question(turn, words)  # the salt keeps conversations from sharing a prefix
        ids = tokenizer.encode(chat.render_chat(tokenizer, chat.conversation(text, history)))
        last = turn == turns - 1
        answer, ttft = await ask(engine, ids, 1 if last else answer_tokens)
        answers.append(answer)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return ttft, len(ids), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--words", type=int, default=130, help="words per question (about 2.4 tokens each)")
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicpm-server"
    loaded = load_checkpoint(cached_tiny_checkpoint(cache, args.size), device="cpu", dtype="float32")
    torch.set_grad_enabled(False)

    async def run() -> None:
        engines = {
            flag: NativeEngine(
                loaded.model,
                loaded.tokenizer,
                context_window=loaded.context_window,
                eos_token_id=2,
                prefix_caching=flag,
            )
            for flag in (False, True)
        }
        for engine in engines.values():
            engine.start()
        samples: dict[bool, list[float]] = {False: [], True: []}
        try:
            for repeat in range(args.repeats):
                answers = {}
                for flag, engine in engines.items():
                    ttft, prompt, answers[flag] = await conversation(
                        engine, loaded.tokenizer, args.turns, args.words, args.answer_tokens, repeat
                    )
                    samples[flag].append(ttft)
                assert answers[False] == answers[True], "prefix reuse changed a greedy answer"
                print(
                    f"  repeat {repeat}: turn {args.turns} prompt {prompt} tokens, "
                    f"TTFT {samples[False][-1] * 1000:.0f} ms without reuse, {samples[True][-1] * 1000:.0f} ms with"
                )
            stats = engines[True].kv_stats
        finally:
            for engine in engines.values():
                engine.stop()
        off, on = statistics.median(samples[False]), statistics.median(samples[True])
        print(
            f"turn {args.turns} TTFT, median of {args.repeats}: {off * 1000:.0f} ms without reuse, "
            f"{on * 1000:.0f} ms with: {on / off:.0%} of it"
        )
        print(f"prefix cache: {stats.prefix_hit_tokens} prompt tokens reused, {stats.prefilled_tokens} computed")

    asyncio.run(run())


if __name__ == "__main__":
    main()
