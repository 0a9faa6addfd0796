"""Per-request sampling over a batch of logits, vectorised across rows.

Each row keeps its own temperature, top_k, top_p, repetition penalty, greedy flag and random
generator. The order follows transformers' generate(): repetition penalty on the raw logits,
then temperature, top-k, and top-p on what top-k left; greedy rows take the argmax of the
penalised logits, as generate() does with do_sample=False.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """What one request asks of the sampler; validated by the protocol layer before it gets here."""

    max_new_tokens: int
    temperature: float = 0.5
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.02
    do_sample: bool = True
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass
class BatchSampling:
    """The per-row sampling parameters of a running batch, as tensors on the model's device."""

    temperature: torch.Tensor  # [B] float
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long, 0 = off
    penalty: torch.Tensor  # [B] float
    greedy: torch.Tensor  # [B] bool
    generators: list[torch.Generator | None]  # per row; None = the engine's shared generator

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], device: torch.device):
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_p=tensor([p.top_p for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long),
            penalty=tensor([p.repetition_penalty for p in params], torch.float32),
            greedy=tensor([p.greedy for p in params], torch.bool),
            generators=list(generators),
        )

    def select(self, rows: torch.Tensor, keep: list[int]) -> BatchSampling:
        return BatchSampling(
            self.temperature[rows],
            self.top_p[rows],
            self.top_k[rows],
            self.penalty[rows],
            self.greedy[rows],
            [self.generators[i] for i in keep],
        )

    @staticmethod
    def concat(a: BatchSampling, b: BatchSampling) -> BatchSampling:
        return BatchSampling(
            torch.cat([a.temperature, b.temperature]),
            torch.cat([a.top_p, b.top_p]),
            torch.cat([a.top_k, b.top_k]),
            torch.cat([a.penalty, b.penalty]),
            torch.cat([a.greedy, b.greedy]),
            a.generators + b.generators,
        )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on every token already in the context: divide positive logits, multiply negative."""
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (0 = off) and then top-p (nucleus) remove, row by row."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before > top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next_tokens(
    logits: torch.Tensor, seen: torch.Tensor, params: BatchSampling, shared: torch.Generator
) -> torch.Tensor:
    """One token per row from float32 logits [B, V]; `seen` [B, V] marks tokens in each context."""
    if bool((params.penalty != 1.0).any()):
        logits = apply_repetition_penalty(logits, seen, params.penalty)
    choice = logits.argmax(dim=-1)
    if bool(params.greedy.all()):
        return choice
    scaled = logits / params.temperature.clamp(min=1e-5)[:, None]
    if bool(((params.top_k > 0) | (params.top_p < 1.0)).any()):
        scaled = filter_top_k_top_p(scaled, params.top_k, params.top_p)
    probs = scaled.softmax(dim=-1)
    sampled = _multinomial_by_generator(probs, params.generators, shared)
    return torch.where(params.greedy, choice, sampled)


def _multinomial_by_generator(
    probs: torch.Tensor, generators: list[torch.Generator | None], shared: torch.Generator
) -> torch.Tensor:
    """Rows with a seed draw from their own generator, so their answer does not depend on the batch."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=probs.device)
        out[idx] = torch.multinomial(probs[idx], 1, generator=shared).squeeze(-1)
    for i, gen in enumerate(generators):
        if gen is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=gen).squeeze(-1)
    return out
