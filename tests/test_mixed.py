"""Newcomers' prompts computed in the running rows' decode pass (mixed.py) answer as the
separate prefill does: the same greedy text, the same first-token log-probabilities to float
rounding, with requests joining a batch mid-decode, several at once, and after a cached prefix."""

from __future__ import annotations

import asyncio

import pytest

from minicpm_server.engine.protocol import GenerationRequest, SamplingParams, TextDelta
from minicpm_server.model.checkpoint import load_checkpoint
from tests.harness import PROMPTS, greedy, ids_for, run

SCORED = SamplingParams(max_new_tokens=12, do_sample=False, ignore_eos=True, logprobs=3)


async def text_and_logprobs(handle) -> tuple[str, list[float]]:
    """The answer and each generated token's log-probability."""
    text, logprobs = [], []
    async for event in handle.events():
        if not isinstance(event, TextDelta):
            return "".join(text), logprobs
        text.append(event.text)
        logprobs.extend(entry.logprob for entry in event.logprobs)
    raise AssertionError("the events ended without Finished")


def answers(path, *, mixed: bool):
    """Texts and each answer's per-token log-probabilities: all prompts at once, then staggered
    so each joins a batch that is decoding, then a second turn that reuses the first's blocks;
    and how many passes ran transformers' separate prefill."""
    loaded = load_checkpoint(path, device="cpu", dtype="float32")
    separate: list[int] = []

    async def body(engine):
        prefill = engine.runner.prefill

        def counting(seqs):
            separate.append(len(seqs))
            return prefill(seqs)

        engine.runner.prefill = counting

        def ask(prompt: str, params: SamplingParams = SCORED):
            return text_and_logprobs(engine.submit(GenerationRequest(ids_for(loaded, prompt), params)))

        together = await asyncio.gather(*(ask(p) for p in PROMPTS))
        staggered = []
        for p in PROMPTS:
            staggered.append(asyncio.ensure_future(ask(p + " again")))
            await asyncio.sleep(0.02)
        staggered = await asyncio.gather(*staggered)
        first = PROMPTS[0] * 6  # long enough for whole blocks, so the second turn finds them cached
        turn1 = await ask(first, greedy(20))
        # Only the last turn's reuse is compared: what the staggered prompts reuse from each
        # other depends on which of them had finished (a finished request's last partial block
        # becomes reusable), so on timing.
        before = engine.kv_stats.prefix_hit_tokens
        turn2 = await ask(first + turn1[0] + " and then?")
        hits = engine.kv_stats.prefix_hit_tokens - before
        return [*together, *staggered, turn2], hits

    completions, hits = run(loaded, body, mixed_prefill=mixed)
    return [text for text, _ in completions], [lp for _, lp in completions], hits, separate


@pytest.mark.parametrize("fixture", ["tiny_dir", "gqa_dir"])
def test_mixed_prefill_answers_as_the_separate_prefill(request, fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    plain_texts, plain_logprobs, plain_hits, plain_separate = answers(path, mixed=False)
    mixed_texts, mixed_logprobs, mixed_hits, mixed_separate = answers(path, mixed=True)
    assert plain_separate and not mixed_separate  # the mixed engine never ran the separate prefill
    assert plain_hits > 0 and mixed_hits == plain_hits  # the last turn reused a cached prefix, both times alike
    assert mixed_texts == plain_texts
    for plain, mixed in zip(plain_logprobs, mixed_logprobs, strict=True):
        # The first comes from the prompt's logits, the rest from decode steps mixed or not.
        assert len(mixed) == len(plain) == 12 and mixed == pytest.approx(plain, abs=1e-4)
