"""Sampling, stop strings and incremental detokenization, unit by unit."""

from __future__ import annotations

import pytest
import torch

from minicpm_server.engine.native.sampling import (
    BatchSampling,
    apply_presence_frequency,
    apply_repetition_penalty,
    candidate_weights,
    sample_next_tokens,
)
from minicpm_server.engine.protocol import SamplingParams
from minicpm_server.engine.stops import first_stop, stop_prefix_overlap


def batch(*params: SamplingParams, seeds: list[int | None] | None = None) -> BatchSampling:
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in (seeds or [None] * len(params))]
    return BatchSampling.build(list(params), gens, torch.device("cpu"))


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    seen = torch.tensor([[True, False, False]])
    shared = torch.Generator().manual_seed(0)
    plain = batch(SamplingParams(max_new_tokens=1, do_sample=False, repetition_penalty=1.0))
    penalised = batch(SamplingParams(max_new_tokens=1, do_sample=False, repetition_penalty=1.2))
    assert sample_next_tokens(logits, seen, plain, shared).item() == 0
    assert sample_next_tokens(logits, seen, penalised, shared).item() == 1


def kept(logits: torch.Tensor, k: int, p: float) -> list[bool]:
    ids, weights = candidate_weights(logits, torch.tensor([k]), torch.tensor([p]))
    out = [False] * logits.shape[-1]
    for token, w in zip(ids[0].tolist(), weights[0].tolist(), strict=True):
        out[token] = out[token] or w > 0
    return out


def test_top_k_and_top_p_filtering() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda k, p: kept(logits, k, p)  # noqa: E731
    assert keep(2, 1.0) == [True, True, False, False]
    assert keep(0, 0.45) == [True, False, False, False]  # the first token alone reaches 0.45
    assert keep(0, 0.79) == [True, True, False, False]
    assert keep(0, 1.0) == [True, True, True, True]
    assert keep(3, 0.9) == [True, True, True, False]


@pytest.mark.parametrize(("k", "p"), [(0, 0.8), (0, 0.999), (5, 1.0), (300, 0.9), (40, 0.3), (0, 1.0)])
def test_candidate_shortcut_keeps_exactly_what_a_full_sort_keeps(k: int, p: float) -> None:
    gen = torch.Generator().manual_seed(3)
    for scale in (0.5, 3.0, 12.0):  # flat to sharply peaked distributions
        logits = torch.randn(4, 5000, generator=gen) * scale
        ids, weights = candidate_weights(logits, torch.tensor([k] * 4), torch.tensor([p] * 4))
        dense = torch.zeros_like(logits).scatter(-1, ids, weights)
        probs = logits.softmax(-1)
        order = probs.sort(descending=True, dim=-1)
        expected = torch.zeros_like(logits, dtype=torch.bool)
        borderline = torch.zeros_like(logits, dtype=torch.bool)  # within rounding of the top_p edge
        for row in range(4):
            ranked = order.values[row]
            if k:
                ranked = torch.where(torch.arange(5000) < k, ranked, 0.0)
                ranked = ranked / ranked.sum()
            before = ranked.cumsum(0) - ranked
            keep = (ranked > 0) & ((before <= p) | (p >= 1.0))
            expected[row, order.indices[row][keep]] = True
            borderline[row, order.indices[row][(before - p).abs() < 1e-5]] = True
        assert not ((dense > 0) != expected)[~borderline].any()


def test_sampling_follows_the_distribution_and_mixes_greedy_rows() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]] * 2))
    params = batch(
        SamplingParams(max_new_tokens=1, temperature=1.0, top_p=1.0, repetition_penalty=1.0),
        SamplingParams(max_new_tokens=1, do_sample=False, repetition_penalty=1.0),
    )
    seen = torch.zeros(2, 3, dtype=torch.bool)
    shared = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_tokens(logits, seen, params, shared) for _ in range(2000)])
    assert (draws[:, 1] == 0).all()  # the greedy row
    freq = torch.bincount(draws[:, 0], minlength=3).float() / 2000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_seeded_rows_do_not_depend_on_their_neighbours() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=1.0)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    a = [
        sample_next_tokens(logits, seen, batch(p, p, p, seeds=[7, None, 9]), torch.Generator().manual_seed(s))
        for s in (1, 2)
    ]
    assert a[0][0] == a[1][0] and a[0][2] == a[1][2]


@pytest.mark.parametrize(
    ("text", "stops", "emitted", "expected"),
    [
        ("hello world", ("wor",), 0, 6),
        ("hello", ("xyz",), 0, None),
        ("ab<AI>cd<用户>", ("<用户>", "<AI>"), 0, 2),
        ("aaa", (), 0, None),
    ],
)
def testfirst_stop(text: str, stops: tuple[str, ...], emitted: int, expected: int | None) -> None:
    assert first_stop(text, stops, emitted) == expected


def test_stop_prefix_overlap_holds_back_partial_stops() -> None:
    assert stop_prefix_overlap("answer <A", ("<AI>",)) == 2
    assert stop_prefix_overlap("answer <", ("<AI>", "<用户>")) == 1
    assert stop_prefix_overlap("answer", ("<AI>",)) == 0


def test_min_p_drops_tokens_below_its_share_of_the_top() -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0]])  # probabilities ~0.55, 0.33, 0.07, 0.03
    params = batch(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=1.0, min_p=0.5))
    ids, weights = candidate_weights(logits, params.top_k, params.top_p, params.min_p)
    kept = set(ids[0][weights[0] > 0].tolist())
    assert kept == {0, 1}  # 0.33 >= 0.5 x 0.55; 0.07 is not


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0, 1, 3, 0]], dtype=torch.int32)
    out = apply_presence_frequency(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]  # -(presence once + frequency x count)
