"""The compiled decode step answers exactly as the eager one, and falls back to eager when it fails."""

from __future__ import annotations

import asyncio

from minicpm_server.model.checkpoint import load_checkpoint
from tests.harness import PROMPTS, greedy, result, run, submit


def answers(loaded, **engine_kwargs):
    """Each prompt alone, then all together (batch buckets 2 and 4, padding rows included)."""

    async def body(engine):
        alone = [(await result(submit(engine, loaded, p, greedy(24)))).text for p in PROMPTS]
        together = await asyncio.gather(*(result(submit(engine, loaded, p, greedy(24))) for p in PROMPTS[:3]))
        return alone, [c.text for c in together], engine.runner.decode.is_compiled

    return run(loaded, body, **engine_kwargs)


def test_compiled_decode_answers_as_eager(tiny_dir) -> None:
    # Separate loads: the lean step packs the layers of the model it decodes (packed.py), and
    # the compiled step traces transformers' forward over plain ones.
    eager_alone, eager_together, was_compiled = answers(
        load_checkpoint(tiny_dir, device="cpu", dtype="float32"), compile=False
    )
    assert not was_compiled
    alone, together, still_compiled = answers(load_checkpoint(tiny_dir, device="cpu", dtype="float32"), compile=True)
    assert still_compiled  # no fallback: the compiled step really ran
    assert alone == eager_alone and together == eager_together


def test_a_failing_compiled_step_falls_back_to_eager(loaded) -> None:
    def broken(*args):
        raise RuntimeError("compiler exploded")

    async def body(engine):
        engine.runner.decode.compiled = broken
        text = (await result(submit(engine, loaded, PROMPTS[0], greedy(12)))).text
        return text, engine.runner.decode.is_compiled

    async def reference(engine):
        return (await result(submit(engine, loaded, PROMPTS[0], greedy(12)))).text

    text, compiled = run(loaded, body)
    assert not compiled and text == run(loaded, reference)
