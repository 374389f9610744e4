"""Temperature + top-k sampling without a host sync, reproducible from (seed, counter).

The random numbers come from the counter-based RNG in `misotts.kernels.rng`, shared with the
Triton depth-loop kernel, so the torch path and the kernels draw the same tokens for the same
seed.  A draw is Sesame's exponential race: argmax(probs / E) with E = -log(u) ~ Exp(1), which
samples from probs exactly and needs no multinomial (hence no sync and no data-dependent shapes).
"""
from __future__ import annotations

import torch

from misotts.kernels.rng import uniform


def is_greedy(temperature: float, topk: int) -> bool:
    return temperature == 0 or topk == 1


def check_sampling_args(temperature: float, topk: int, vocab_size: int) -> None:
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 1 <= topk <= vocab_size:
        raise ValueError(f"topk must be in 1..{vocab_size}, got {topk}")


def sample_topk(logits: torch.Tensor, temperature: float, topk: int,
                seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; seed, counter int64 [B] -> tokens int64 [B].

    Greedy (lowest index among maxima) when temperature == 0 or topk == 1.  Otherwise keeps the
    logits >= the k-th largest (ties at the threshold stay, as in Sesame's reference), applies
    the softmax at `temperature` and draws with the RNG stream (seed, counter).
    """
    if is_greedy(temperature, topk):
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    kth = scores.topk(topk, dim=-1).values[:, -1:]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    race = probs / -torch.log(uniform(seed, counter, logits.shape[-1]))
    return race.argmax(dim=-1)
