"""The engine on its own: batching changes nothing, cancellation frees slots, failures stay contained."""

from __future__ import annotations

import asyncio

import pytest
import torch

from minicpm_server import chat
from minicpm_server.checkpoint import load_checkpoint
from minicpm_server.engine import ContextOverflowError, Engine, EngineError, QueueFullError
from minicpm_server.sampling import SamplingParams

PROMPTS = ["hello there", "你好，山东省最高的山是哪座山？", "what is the river city of code " * 6, "x"]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_checkpoint(tiny_dir, device="cpu", dtype="float32")


def ids_for(loaded, prompt: str) -> list[int]:
    return chat.encode_prompt(loaded.tokenizer, chat.render_chat(loaded.tokenizer, chat.conversation(prompt)))


def run(loaded, coro_fn, **engine_kwargs):
    async def main():
        engine = Engine(
            loaded.model, loaded.tokenizer, context_window=loaded.context_window, eos_token_id=2, **engine_kwargs
        )
        engine.start()
        try:
            return await coro_fn(engine)
        finally:
            engine.stop()

    return asyncio.run(main())


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True)


def test_batched_greedy_equals_alone_and_generate(loaded) -> None:
    async def body(engine):
        alone = [(await engine.submit(ids_for(loaded, p), greedy(30)).result()).text for p in PROMPTS]
        together = await asyncio.gather(*(engine.submit(ids_for(loaded, p), greedy(30)).result() for p in PROMPTS))
        staggered = []
        for p in PROMPTS:  # each joins a batch that is already decoding
            staggered.append(asyncio.ensure_future(engine.submit(ids_for(loaded, p), greedy(30)).result()))
            await asyncio.sleep(0.01)
        return alone, [c.text for c in together], [c.text for c in await asyncio.gather(*staggered)]

    alone, together, staggered = run(loaded, body)
    assert alone == together == staggered
    for prompt, text in zip(PROMPTS, alone, strict=True):
        ids = ids_for(loaded, prompt)
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, repetition_penalty=1.02)
        assert text == loaded.tokenizer.decode(out[0, len(ids) :].tolist())


def test_cancelled_requests_leave_the_batch(loaded) -> None:
    async def body(engine):
        handles = [engine.submit(ids_for(loaded, "long"), greedy(800)) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert engine.num_running == 3
        for h in handles:
            h.cancel()
        reasons = [(await h.result()).finish_reason for h in handles]
        await asyncio.sleep(0.05)
        return reasons, engine.num_running

    reasons, running = run(loaded, body)
    assert reasons == ["cancelled"] * 3 and running == 0


def test_queue_bound_and_context_window(loaded) -> None:
    async def body(engine):
        engine.submit(ids_for(loaded, "a"), greedy(500))
        await asyncio.sleep(0.1)  # now running; the next two wait
        engine.submit(ids_for(loaded, "b"), greedy(5))
        engine.submit(ids_for(loaded, "c"), greedy(5))
        with pytest.raises(QueueFullError):
            engine.submit(ids_for(loaded, "d"), greedy(5))
        with pytest.raises(ContextOverflowError):
            engine.check_fits(10, loaded.context_window)
        return True

    assert run(loaded, body, max_batch=1, max_queue=2)


def test_engine_failure_fails_requests_and_recovers(loaded) -> None:
    async def body(engine):
        first = engine.submit(ids_for(loaded, "a"), greedy(200))
        await asyncio.sleep(0.1)
        engine.inject_fault(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        with pytest.raises(EngineError, match="out of memory"):
            await first.result()
        after = await engine.submit(ids_for(loaded, "b"), greedy(5)).result()
        return after, engine.stats.cache_releases

    after, releases = run(loaded, body)
    assert after.completion_tokens == 5 and releases >= 1


def test_stop_strings_end_the_answer(loaded) -> None:
    async def body(engine):
        full = (await engine.submit(ids_for(loaded, "a"), greedy(40)).result()).text
        stop = full[10:13]
        params = SamplingParams(max_new_tokens=40, do_sample=False, ignore_eos=True, stop=(stop,))
        cut = await engine.submit(ids_for(loaded, "a"), params).result()
        return full, stop, cut

    full, stop, cut = run(loaded, body)
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
