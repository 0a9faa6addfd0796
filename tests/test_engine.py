"""The engine on its own: batching changes nothing, cancellation frees slots, failures stay contained."""

from __future__ import annotations

import asyncio

import pytest
import torch

from minicpm_server.engine.protocol import (
    ContextOverflowError,
    EngineError,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    check_fits,
)
from minicpm_server.model.checkpoint import load_checkpoint
from tests.harness import HOLD_TOKENS, PROMPTS, greedy, ids_for, result, run, submit, until_running


@pytest.fixture(scope="module")
def long_loaded(long_dir):
    """A window so long that a generation cannot end before the test acts on it."""
    return load_checkpoint(long_dir, device="cpu", dtype="float32")


def test_batched_greedy_equals_alone_and_generate(loaded) -> None:
    async def body(engine):
        alone = [(await result(submit(engine, loaded, p, greedy(30)))).text for p in PROMPTS]
        together = await asyncio.gather(*(result(submit(engine, loaded, p, greedy(30))) for p in PROMPTS))
        staggered = []
        for p in PROMPTS:  # each joins a batch that is already decoding
            staggered.append(asyncio.ensure_future(result(submit(engine, loaded, p, greedy(30)))))
            await asyncio.sleep(0.01)
        return alone, [c.text for c in together], [c.text for c in await asyncio.gather(*staggered)]

    alone, together, staggered = run(loaded, body)
    assert alone == together == staggered
    # transformers' own generate() on its Granite classes, the same weights: an independent reference
    reference = load_checkpoint(loaded.files.path, device="cpu", dtype="float32", implementation="transformers")
    for prompt, text in zip(PROMPTS, alone, strict=True):
        ids = ids_for(loaded, prompt)
        out = reference.model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, repetition_penalty=1.02)
        assert text == loaded.tokenizer.decode(out[0, len(ids) :].tolist())


def test_cancelled_requests_leave_the_batch(long_loaded) -> None:
    async def body(engine):
        handles = [submit(engine, long_loaded, "long", greedy(HOLD_TOKENS)) for _ in range(3)]
        await until_running(engine, 3)
        for h in handles:
            h.cancel()
        reasons = [(await result(h)).finish_reason for h in handles]
        await until_running(engine, 0)
        return reasons, engine.stats.finished

    reasons, finished = run(long_loaded, body)
    assert reasons == ["cancelled"] * 3 and finished["cancelled"] == 3 and finished["length"] == 0


def test_queue_bound_and_context_window(long_loaded) -> None:
    async def body(engine):
        submit(engine, long_loaded, "a", greedy(HOLD_TOKENS))
        await until_running(engine, 1)  # the next two wait
        submit(engine, long_loaded, "b", greedy(5))
        submit(engine, long_loaded, "c", greedy(5))
        with pytest.raises(QueueFullError):
            submit(engine, long_loaded, "d", greedy(5))
        too_long = GenerationRequest([1] * 10, greedy(long_loaded.context_window), "max_new_tokens")
        with pytest.raises(ContextOverflowError, match="max_new_tokens is too large") as overflow:
            engine.submit(too_long)
        assert overflow.value.field == "max_new_tokens"
        return True

    assert run(long_loaded, body, max_batch=1, max_queue=2)


def test_context_rule_names_the_prompt_when_it_alone_fills_the_window() -> None:
    with pytest.raises(ContextOverflowError) as overflow:
        check_fits(GenerationRequest([1] * 64, greedy(1), "max_length"), 64)
    assert overflow.value.field == "prompt" and "the prompt is 64 tokens" in str(overflow.value)
    check_fits(GenerationRequest([1] * 60, greedy(4), "max_length"), 64)  # exactly fits


def test_engine_failure_fails_requests_and_recovers(long_loaded) -> None:
    async def body(engine):
        first = submit(engine, long_loaded, "a", greedy(HOLD_TOKENS))
        await until_running(engine, 1)
        engine.inject_fault("oom")
        with pytest.raises(EngineError, match="out of memory"):
            await result(first)
        after = await result(submit(engine, long_loaded, "b", greedy(5)))
        return after, engine.stats

    after, stats = run(long_loaded, body)
    assert after.completion_tokens == 5 and stats.cache_releases >= 1 and stats.failures == 1


def test_stop_strings_end_the_answer(loaded) -> None:
    async def body(engine):
        full = (await result(submit(engine, loaded, "a", greedy(40)))).text
        stop = full[10:13]
        params = SamplingParams(max_new_tokens=40, do_sample=False, ignore_eos=True, stop=(stop,))
        cut = await result(submit(engine, loaded, "a", params))
        return full, stop, cut

    full, stop, cut = run(loaded, body)
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_cache_is_passed_under_the_name_forward_takes() -> None:
    """transformers renamed `past_key_values` to `cache` within 5.x; an unknown keyword would be
    swallowed and the engine's cache left empty, so the engine asks the model."""
    from minicpm_server.engine.native.paged import cache_argument_name

    class Old:
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class New:
        def forward(self, input_ids, cache=None, **kwargs): ...

    assert cache_argument_name(Old()) == "past_key_values"
    assert cache_argument_name(New()) == "cache"
