"""Log-probabilities for the requests that ask: of generated tokens, and of prompt tokens (echo).

A log-probability is log-softmax of the model's raw logits in float32, before any penalty,
temperature, top-k or top-p (what vLLM reports by default). A token's own number and its
position's top entries come from the same tensor, so when the token is the most likely one the
two are the same float (lm-eval's `is_greedy` compares them with `!=`).

Scoring a prompt never holds [prompt length, vocabulary] logits at once (4,096 x 122,753 floats
is 2 GB): hidden states go through the output head SCORE_CHUNK positions at a time, and only
each position's target and top entries are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from minicpm_server.engine.protocol import TokenLogprob

SCORE_CHUNK = 256  # positions per head product: 256 x 122,753 floats is 126 MB


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: Sequence[int]) -> list[TokenLogprob]:
    """One entry per row of `logits` [N, V]: `tokens[i]`'s log-probability and the `tops[i]`
    most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.reshape(-1, 1)).squeeze(1).tolist()
    k = max(tops, default=0)
    values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], tokens.new_zeros(len(tokens), 0))
    values, ids = values.tolist(), ids.tolist()
    ids_out = tokens.tolist()
    return [
        TokenLogprob(ids_out[i], chosen[i], tuple(zip(ids[i][: tops[i]], values[i][: tops[i]], strict=True)))
        for i in range(len(ids_out))
    ]


def score_prompt(
    hidden: torch.Tensor, prompt: Sequence[int], top: int, head: Callable[[torch.Tensor], torch.Tensor]
) -> list[TokenLogprob | None]:
    """Scores of a prompt's tokens from its hidden states [T, H] (position t predicts token
    t + 1); the first token has no score (None)."""
    scores: list[TokenLogprob | None] = [None]
    targets = torch.tensor(list(prompt[1:]), device=hidden.device)
    for start in range(0, len(targets), SCORE_CHUNK):
        end = min(start + SCORE_CHUNK, len(targets))
        logits = head(hidden[start:end])
        scores.extend(token_logprobs(logits, targets[start:end], [top] * (end - start)))
    return scores
