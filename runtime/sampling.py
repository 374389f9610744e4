"""Temperature + top-k sampling without a host sync, reproducible from (seed, counter).

The random numbers come from the counter-based RNG in `misotts.kernels.rng`, shared with the
Triton depth-loop kernel, so the torch path and the kernels draw the same tokens for the same
seed.  A draw is Sesame's exponential race: argmax(probs / E) with E = -log(u) ~ Exp(1), which
samples from probs exactly and needs no multinomial (hence no sync and no data-dependent shapes).
"""
from __future__ import annotations

from misotts.kernels.reference import sample_topk_ref


def check_sampling_args(temperature: float, topk: int, vocab_size: int) -> None:
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 1 <= topk <= vocab_size:
        raise ValueError(f"topk must be in 1..{vocab_size}, got {topk}")


# One definition of the draw, shared with the kernels' tests: Triton's sampler must match it.
sample_topk = sample_topk_ref
