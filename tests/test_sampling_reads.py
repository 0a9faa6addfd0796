"""The decode step reads the device once, and sampling still draws what it drew before.

* Same tokens: for every combination of sampling parameters, on flat and peaked distributions,
  mixed in one batch, with and without seeds, over several steps, the sampler gives exactly the
  tokens main's sampler (tests/sampling_main.py, kept verbatim) gives from the same generators.
* One read: the host reads counted per step (tests/host_reads.py) are one, the sampled ids, for
  the sampler alone and for the engine's whole decode step; two only on the step where a guessed
  shortcut turns out wrong (sampling.py's docstring). On CUDA each would be a synchronisation.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from minicpm_server.engine.native.sampling import CANDIDATES, BatchSampling, draw_tokens, settle
from minicpm_server.engine.protocol import GenerationRequest, SamplingParams
from tests import sampling_main
from tests.harness import ids_for, result, run
from tests.host_reads import HostReads

VOCAB = 3000

ROWS = [  # (temperature, top_p, top_k, min_p, repetition penalty, presence, frequency, do_sample)
    (0.5, 0.8, 0, 0.0, 1.02, 0.0, 0.0, True),  # the tutorial's
    (1.0, 1.0, 0, 0.0, 1.0, 0.0, 0.0, True),  # the whole distribution
    (0.7, 0.95, 40, 0.0, 1.0, 0.0, 0.0, True),
    (1.3, 0.9, 400, 0.05, 1.1, 0.3, 0.2, True),  # top-k beyond the candidates, min-p, every penalty
    (0.8, 0.3, 0, 0.1, 1.0, 0.0, 0.5, True),
    (0.5, 0.8, 0, 0.0, 1.02, 0.0, 0.0, False),  # greedy
    (0.0, 0.8, 0, 0.0, 1.0, 0.0, 0.0, True),  # temperature 0: greedy
]


def params_of(row: tuple) -> SamplingParams:
    t, p, k, m, rep, pres, freq, sample = row
    return SamplingParams(
        max_new_tokens=4, temperature=t, top_p=p, top_k=k, min_p=m, repetition_penalty=rep,
        presence_penalty=pres, frequency_penalty=freq, do_sample=sample,
    )  # fmt: skip


def make_logits(rows: int, scale: float, step: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(1000 * step + int(scale * 10))) * scale


def both_samplers(params: list[SamplingParams], seeds: list[int | None], scale: float, steps: int = 3):
    """Tokens per step from main's sampler and from ours, each with its own identically seeded
    generators, over `steps` steps that feed each token back into the penalties."""

    def generators() -> list[torch.Generator | None]:
        return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]

    ours = BatchSampling.build(params, generators(), torch.device("cpu"))
    theirs = BatchSampling.build(params, generators(), torch.device("cpu"))
    shared = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    rows = len(params)
    seen = torch.zeros(rows, VOCAB, dtype=torch.bool)
    seen[:, :50] = True  # a prompt
    counts = torch.zeros(rows, VOCAB, dtype=torch.int32)
    out = []
    for step in range(steps):
        logits = make_logits(rows, scale, step)
        expected = sampling_main.sample_next_tokens(logits, seen, theirs, shared[0], counts)
        got, ids = settle(draw_tokens(logits, seen, ours, shared[1], counts), ours)
        assert ids == got.tolist()
        out.append((expected.tolist(), ids))
        every = torch.arange(rows)
        seen[every, got] = True
        counts[every, got] += 1
    return out


@pytest.mark.parametrize("scale", [0.3, 4.0, 15.0])  # flat (nucleus ~ the vocabulary) to sharply peaked
def test_every_row_kind_draws_what_main_drew_alone_and_mixed(scale: float) -> None:
    kinds = [params_of(r) for r in ROWS]
    batches = [[k] for k in kinds] + [kinds, kinds[::-1], [kinds[0]] * 4, [kinds[0], kinds[2]]]
    for batch in batches:
        for seeds in ([None] * len(batch), [11 + i for i in range(len(batch))], [None, 5] * len(batch)):
            for expected, got in both_samplers(batch, seeds[: len(batch)], scale):
                assert got == expected, (batch, seeds, scale)


def test_a_sweep_of_single_parameters_draws_what_main_drew() -> None:
    grid = itertools.product([1.0], [0.5, 0.99, 1.0], [0, 1, CANDIDATES, CANDIDATES + 1], [0.0, 0.2])
    for (t, p, k, m), scale in itertools.product(grid, [0.5, 6.0]):
        row = SamplingParams(max_new_tokens=4, temperature=t, top_p=p, top_k=k, min_p=m, repetition_penalty=1.0)
        for expected, got in both_samplers([row, row], [3, None], scale):
            assert got == expected, (t, p, k, m, scale)


def reads_per_step(params: list[SamplingParams], scale: float, steps: int = 4) -> list[int]:
    sampling = BatchSampling.build(params, [None] * len(params), torch.device("cpu"))
    shared = torch.Generator().manual_seed(0)
    seen = torch.zeros(len(params), VOCAB, dtype=torch.bool)
    counts = torch.zeros(len(params), VOCAB, dtype=torch.int32)
    out = []
    for step in range(steps):
        logits = make_logits(len(params), scale, step)
        with HostReads() as reads:
            settle(draw_tokens(logits, seen, sampling, shared, counts), sampling)
        out.append(reads.total)
    return out


@pytest.mark.parametrize("row", ROWS)
def test_sampling_reads_the_device_once_per_step(row: tuple) -> None:
    params = [params_of(row)] * 4
    assert reads_per_step(params, scale=15.0) == [1, 1, 1, 1]  # peaked: every nucleus is within the candidates
    flat = reads_per_step(params, scale=0.3)
    # A flat nucleus shows itself once (the guessed shortcut is redone from the full sort), then
    # the next steps sort at once.
    assert flat[1:] == [1, 1, 1] and flat[0] in (1, 2)


def test_a_wrong_guess_is_redone_exactly_and_not_repeated() -> None:
    nucleus = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.8, repetition_penalty=1.0)
    assert reads_per_step([nucleus] * 4, scale=0.3) == [2, 1, 1, 1]


def test_the_engines_decode_step_reads_the_device_once(loaded) -> None:
    """The whole decode step through the engine (lean forward, sampling, penalties' bookkeeping,
    detokenizing): one read per step, for the tutorial's sampling and for greedy rows."""
    counted: list[int] = []

    async def body(engine):
        step = engine._step

        def counting_step(newcomers):  # on the engine thread: dispatch modes are per thread
            if newcomers or engine.scheduler.batch is None:
                return step(newcomers)  # admitting: prefill is not the decode step
            with HostReads() as reads:
                step(newcomers)
            counted.append(reads.total)

        engine._step = counting_step
        tutorial = SamplingParams(
            max_new_tokens=12, ignore_eos=True, temperature=0.5, top_p=0.8, repetition_penalty=1.02
        )
        greedy = SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=False)
        seeded = SamplingParams(max_new_tokens=12, ignore_eos=True, seed=3, top_k=20)
        prompts = ["hello there", "one two three", "x"]
        handles = [
            engine.submit(GenerationRequest(ids_for(loaded, p), params))
            for p, params in zip(prompts, [tutorial, greedy, seeded], strict=True)
        ]
        return await asyncio.gather(*(result(h) for h in handles))

    answers = run(loaded, body)
    assert all(a.completion_tokens == 12 for a in answers)
    assert counted and len(counted) >= 10
    # The tiny model's nucleus may overflow the candidates once: a second read on that step only.
    assert counted.count(1) >= len(counted) - 1 and max(counted) <= 2, counted
