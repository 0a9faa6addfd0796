"""Per-request sampling over a batch of logits, vectorised across rows.

Each row keeps its own temperature, top_k, top_p, min_p, repetition penalty, presence and
frequency penalties, greedy flag and random generator. The order follows transformers'
generate(): the repetition penalty (CTRL's: divide a seen token's positive logit, multiply a
negative one) on the raw logits, then OpenAI's presence and frequency penalties on the tokens
generated so far, then temperature, top-k, top-p on what top-k left, and min-p on what top-p
left. Greedy rows take the argmax of the penalised logits, as generate() does with
do_sample=False. Probabilities are normalised once and a token is drawn by inverse CDF, one
uniform number per row.

One read of the device per step. Which operations a step needs (penalties, min-p, sampling at
all) is decided on the host from the requests' parameters, never by reading a tensor: on a GPU
every such read waits for the whole step to finish. The one data-dependent choice, whether every
nucleus fits in the top CANDIDATES tokens (a cheap top-k instead of sorting the vocabulary), is
made from the previous step's answer, which travels back with the sampled ids in the same copy;
a guess that turns out wrong is redone exactly from the full sort with the same uniform numbers,
at the price of a second read (once, when a batch's distributions go flat).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minicpm_server.engine.native.rows import RowState
from minicpm_server.engine.protocol import SamplingParams


@dataclass
class BatchSampling(RowState):
    """The per-row sampling parameters of a running batch: as tensors on the model's device for
    the arithmetic, and as the requests' own parameters for the host's decisions."""

    temperature: torch.Tensor  # [B] float
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long, 0 = off
    penalty: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float, 0 = off
    presence: torch.Tensor  # [B] float
    frequency: torch.Tensor  # [B] float
    greedy: torch.Tensor  # [B] bool
    generators: list[torch.Generator | None]  # per row; None = the engine's shared generator
    params: list[SamplingParams]  # per row, read on the host only
    nucleus_fits: list[bool]  # per row: did its nucleus fit in CANDIDATES tokens last step (a guess for this one)

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], device: torch.device):
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return host_to_device(torch.tensor(values, dtype=dtype), device)

        return cls(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_p=tensor([p.top_p for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long),
            penalty=tensor([p.repetition_penalty for p in params], torch.float32),
            min_p=tensor([p.min_p for p in params], torch.float32),
            presence=tensor([p.presence_penalty for p in params], torch.float32),
            frequency=tensor([p.frequency_penalty for p in params], torch.float32),
            greedy=tensor([p.greedy for p in params], torch.bool),
            generators=list(generators),
            params=list(params),
            nucleus_fits=[True] * len(params),  # a real model's nucleus is small: guess so until shown otherwise
        )


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`. On CUDA through pinned memory, so the copy is queued
    behind the running step instead of waiting for it (a pageable copy synchronises)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on every token already in the context: divide positive logits, multiply negative."""
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties on generated tokens: minus presence once, minus frequency per occurrence."""
    counts = counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


# A real chat model's nucleus at the tutorial's temperature 0.5 / top_p 0.8 is a handful of tokens;
# when every row's kept set fits in this many candidates, we skip sorting the vocabulary.
CANDIDATES = 256


@dataclass(frozen=True)
class Plan:
    """What this step's sampling needs, from the sampling rows' parameters alone (no device read)."""

    sample: bool  # some row samples (else every row is greedy: the argmax)
    penalty: bool  # some row has a repetition penalty other than 1
    presence_frequency: bool
    min_p: bool
    candidates: bool  # draw from the top CANDIDATES tokens (checked afterwards where a nucleus decides)
    nucleus: bool  # some sampling row's kept set depends on the distribution (top-p without top-k)

    @classmethod
    def of(cls, sampling: BatchSampling, vocab: int) -> Plan:
        params = sampling.params
        sampled = [(p, fits) for p, fits in zip(params, sampling.nucleus_fits, strict=True) if not p.greedy]
        nucleus = [fits for p, fits in sampled if p.top_k == 0 and p.top_p < 1.0]
        # A row with top-k beyond the candidates, or sampling from the whole distribution, needs them all.
        whole = any(p.top_k > CANDIDATES or (p.top_k == 0 and p.top_p >= 1.0) for p, _ in sampled)
        return cls(
            sample=bool(sampled),
            penalty=any(p.repetition_penalty != 1.0 for p in params),
            presence_frequency=any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params),
            min_p=any(p.min_p > 0 for p, _ in sampled),
            candidates=vocab > CANDIDATES and not whole and all(nucleus),
            nucleus=bool(nucleus),
        )


def candidate_weights(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, K] and their sampling weights [B, K] after top-k, then top-p on what top-k
    left, then min-p, ranking the whole vocabulary (exact for any distribution)."""
    ids, weights, _ = ranked_weights(scaled, top_k, top_p, scaled.shape[-1])
    return ids, weights if min_p is None else apply_min_p(weights, min_p)


def apply_min_p(weights: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Tokens under min_p x the top token's probability are dropped. Ranked best first, so column
    0 is each row's top probability; min-p only removes tokens, so the candidates stay exact."""
    return weights.masked_fill(weights < min_p[:, None] * weights[:, :1], 0.0)


def ranked_weights(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `k` token ids [B, k] best first, their weights after top-k and top-p, and per row
    whether its kept set lies within the first CANDIDATES ranks (with k = CANDIDATES: whether
    these weights are exactly what ranking the whole vocabulary would give)."""
    vocab = scaled.shape[-1]
    values, ids = scaled.topk(k, dim=-1) if k < vocab else scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(k, device=scaled.device)[None, :]
    bounded = (top_k > 0) & (top_k <= k)
    in_top_k = ranks < torch.where(bounded, top_k, k)[:, None]
    # top-p works on probabilities renormalised over what top-k kept (generate()'s order), or
    # over the whole vocabulary when top-k is off.
    over_top_k = torch.logsumexp(values.masked_fill(~in_top_k, float("-inf")), dim=-1)
    log_norm = torch.where(bounded, over_top_k, torch.logsumexp(scaled, dim=-1))
    probs = (values - log_norm[:, None]).exp().masked_fill(~in_top_k, 0.0)
    cumulative = probs.cumsum(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
    keep = in_top_k & ((cumulative - probs <= top_p[:, None]) | (top_p[:, None] >= 1.0))
    column = min(CANDIDATES, k) - 1
    nucleus_inside = (top_k == 0) & (top_p < 1.0) & (cumulative[:, column] > top_p)
    fits = ((top_k > 0) & (top_k <= CANDIDATES)) | nucleus_inside
    return ids, probs.masked_fill(~keep, 0.0), fits


@dataclass
class Draw:
    """One token per row on the device, and how to check it with the host's one read."""

    tokens: torch.Tensor  # [B] long
    fits: torch.Tensor | None  # [B] bool: each row's nucleus within CANDIDATES (greedy rows: True)
    exact: Callable[[], torch.Tensor] | None  # when `tokens` are a guess: the full sort's tokens, same uniforms


def draw_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: BatchSampling,
    shared: torch.Generator,
    counts: torch.Tensor | None = None,
) -> Draw:
    """One token per row from float32 logits [B, V], without reading the device; `seen` [B, V]
    marks tokens in each context, `counts` [B, V] how often each was generated."""
    plan = Plan.of(params, logits.shape[-1])
    if plan.penalty:
        logits = apply_repetition_penalty(logits, seen, params.penalty)
    if counts is not None and plan.presence_frequency:
        logits = apply_presence_frequency(logits, counts, params.presence, params.frequency)
    choice = logits.argmax(dim=-1)
    if not plan.sample:
        return Draw(choice, None, None)
    scaled = logits / params.temperature.clamp(min=1e-5)[:, None]
    uniform = _uniforms(len(scaled), params.generators, shared, scaled.device)

    def pick(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights, fits = ranked_weights(scaled, params.top_k, params.top_p, k)
        if plan.min_p:
            weights = apply_min_p(weights, params.min_p)
        sampled = ids.gather(-1, _inverse_cdf(weights, uniform)[:, None]).squeeze(-1)
        return torch.where(params.greedy, choice, sampled), fits | params.greedy

    if not plan.candidates:
        tokens, fits = pick(scaled.shape[-1])
        return Draw(tokens, fits if plan.nucleus else None, None)
    tokens, fits = pick(CANDIDATES)
    if not plan.nucleus:  # every sampling row is bounded by a top-k within the candidates: exact
        return Draw(tokens, None, None)
    return Draw(tokens, fits, lambda: pick(scaled.shape[-1])[0])


def settle(draw: Draw, params: BatchSampling) -> tuple[torch.Tensor, list[int]]:
    """The drawn tokens on the device and as ids on the host: one copy from the device, two when
    the candidates were guessed and some nucleus turned out larger. Notes each row's nucleus
    size for the next step's guess."""
    if draw.fits is None:
        return draw.tokens, draw.tokens.tolist()
    both = torch.cat([draw.tokens, draw.fits.to(draw.tokens.dtype)]).tolist()
    rows = len(draw.tokens)
    ids, fits = both[:rows], [bool(f) for f in both[rows:]]
    params.nucleus_fits = fits
    if draw.exact is None or all(fits):
        return draw.tokens, ids
    tokens = draw.exact()
    return tokens, tokens.tolist()


def sample_next_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: BatchSampling,
    shared: torch.Generator,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """`draw_tokens`, settled: the tokens [B] on the device."""
    return settle(draw_tokens(logits, seen, params, shared, counts), params)[0]


def _uniforms(
    rows: int, generators: list[torch.Generator | None], shared: torch.Generator, device: torch.device
) -> torch.Tensor:
    """One uniform number per row. Rows with a seed draw theirs from their own generator, so their
    answer does not depend on which other requests share the batch; the others take theirs from
    one draw of the shared generator, in row order."""
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == rows:
        return torch.rand(rows, generator=shared, device=device)
    common = torch.rand(len(unseeded), generator=shared, device=device) if unseeded else None
    own = [torch.rand(1, generator=g, device=device) for g in generators if g is not None]
    pieces, next_common, next_own = [], 0, 0
    for g in generators:
        if g is None:
            assert common is not None
            pieces.append(common[next_common : next_common + 1])
            next_common += 1
        else:
            pieces.append(own[next_own])
            next_own += 1
    return torch.cat(pieces)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn in proportion to `weights` (unnormalised, zeros never drawn):
    the first index whose running total exceeds the row's uniform share of the total, counted as
    the running totals at or below it (what a right-sided binary search returns; the totals never
    decrease)."""
    cumulative = weights.cumsum(dim=-1)
    target = (uniform * cumulative[:, -1])[:, None]
    return (cumulative <= target).sum(dim=-1).clamp(max=weights.shape[-1] - 1)
