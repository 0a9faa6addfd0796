"""The sampler as it was before the one-read decode step (main at 17d4200), kept verbatim as the
oracle for tests/test_sampling_reads.py: the same seed must give the same tokens as it did.

It reads the device several times per call (`bool(tensor)`), which is what the change removed;
its arithmetic is the reference, not its speed. Only `BatchSampling` is left out: the new one
carries the same tensor fields under the same names.
"""

from __future__ import annotations

import torch


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
# when every row's kept set provably fits in this many candidates, we skip sorting the vocabulary.
CANDIDATES = 256


def candidate_weights(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, K] and their sampling weights [B, K] after top-k, then top-p on what top-k
    left, then min-p (tokens under min_p x the top token's probability are dropped).

    Exact: the cheap path over the top CANDIDATES tokens is used only when it keeps precisely the
    tokens a full sort would keep; otherwise the whole vocabulary is ranked.
    """
    vocab = scaled.shape[-1]
    found = None
    if vocab > CANDIDATES and _shortcut_possible(scaled, top_k, top_p):
        found = _ranked_weights(scaled, top_k, top_p, CANDIDATES)
    if found is None:
        found = _ranked_weights(scaled, top_k, top_p, vocab)
    assert found is not None  # ranking the whole vocabulary is always exact
    ids, weights = found
    if min_p is not None and bool((min_p > 0).any()):
        # Ranked best first, so column 0 is each row's top probability; min-p only removes tokens,
        # and the top token is always among the candidates, so the shortcut stays exact.
        weights = weights.masked_fill(weights < min_p[:, None] * weights[:, :1], 0.0)
    return ids, weights


def _shortcut_possible(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> bool:
    """False when some row's nucleus certainly needs more than CANDIDATES tokens: even if all of
    them had the top probability, they would not reach top_p (a flat distribution)."""
    nucleus_rows = top_k == 0
    if not bool(nucleus_rows.any()):
        return True
    top_prob = (scaled.max(dim=-1).values - torch.logsumexp(scaled, dim=-1)).exp()
    return bool((top_prob[nucleus_rows] * CANDIDATES >= top_p[nucleus_rows]).all())


def _ranked_weights(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    vocab = scaled.shape[-1]
    if k < vocab and bool(((top_k == 0) & (top_p >= 1.0)).any()):
        return None  # a row samples from the full distribution
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
    if k < vocab:
        nucleus_inside = (top_k == 0) & (top_p < 1.0) & (cumulative[:, -1] > top_p)
        if not bool((bounded | nucleus_inside).all()):
            return None
    return ids, probs.masked_fill(~keep, 0.0)


def sample_next_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params,
    shared: torch.Generator,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from float32 logits [B, V]; `seen` [B, V] marks tokens in each context,
    `counts` [B, V] how often each was generated."""
    if bool((params.penalty != 1.0).any()):
        logits = apply_repetition_penalty(logits, seen, params.penalty)
    if counts is not None and bool((params.presence != 0).any() or (params.frequency != 0).any()):
        logits = apply_presence_frequency(logits, counts, params.presence, params.frequency)
    choice = logits.argmax(dim=-1)
    if bool(params.greedy.all()):
        return choice
    scaled = logits / params.temperature.clamp(min=1e-5)[:, None]
    ids, weights = candidate_weights(scaled, params.top_k, params.top_p, params.min_p)
    picked = _inverse_cdf(weights, params.generators, shared)
    sampled = ids.gather(-1, picked[:, None]).squeeze(-1)
    return torch.where(params.greedy, choice, sampled)


def _inverse_cdf(
    weights: torch.Tensor, generators: list[torch.Generator | None], shared: torch.Generator
) -> torch.Tensor:
    """One index per row, drawn in proportion to `weights` (unnormalised, zeros never drawn).

    Rows with a seed draw their uniform number from their own generator, so their answer does
    not depend on which other requests share the batch.
    """
    cumulative = weights.cumsum(dim=-1)
    uniform = torch.empty(weights.shape[0], device=weights.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        uniform[unseeded] = torch.rand(len(unseeded), generator=shared, device=weights.device)
    for i, gen in enumerate(generators):
        if gen is not None:
            uniform[i] = torch.rand(1, generator=gen, device=weights.device)
    target = (uniform * cumulative[:, -1])[:, None]
    return torch.searchsorted(cumulative, target, right=True).squeeze(-1).clamp(max=weights.shape[-1] - 1)
