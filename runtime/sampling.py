"""Temperature + top-k sampling without a host sync, reproducible from (seed, counter).

The random numbers come from the counter-based RNG in `misotts.kernels.rng`, shared with the
Triton depth-loop kernel, so the torch path and the kernels draw the same tokens for the same
seed.  A draw is Sesame's exponential race: argmax(probs / E) with E = -log(u) ~ Exp(1), which
samples from probs exactly and needs no multinomial (hence no sync and no data-dependent shapes).
"""
from __future__ import annotations

import numbers

from misotts.kernels.reference import sample_topk_ref


# Temperatures outside this range break the float math, not just taste: a subnormal one makes
# logits / temperature overflow (no frames, or backends that disagree); one past the fp32 range is inf.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
MAX_SEED = 2**63 - 1  # seeds are int64 on the device


def is_integer(value) -> bool:
    """An int (or numpy / torch integer scalar), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def shown(value, limit: int = 60) -> str:
    """A caller's value in an error message: short, and never failing (an integer past Python's
    digit limit has no repr)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else text[:limit] + "..."


class InvalidParam(ValueError):
    """A request setting that cannot be served; `param` names it (the server's error envelope
    says which field was wrong)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_sampling_args(temperature: float, topk: int, vocab_size: int, seed: int = 0) -> None:
    """The sampler's settings for a model of `vocab_size` audio ids (InvalidParam if not)."""
    if not is_real(temperature) or not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise InvalidParam(f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, "
                           f"{MAX_TEMPERATURE:g}], got {shown(temperature)}", "temperature")
    if not is_integer(topk) or not 1 <= topk <= vocab_size:
        raise InvalidParam(f"topk must be an integer in 1..{vocab_size}, got {shown(topk)}", "topk")
    if not is_integer(seed) or not 0 <= seed <= MAX_SEED:
        raise InvalidParam(f"seed must be an integer in 0..2**63 - 1, got {shown(seed)}", "seed")


# One definition of the draw, shared with the kernels' tests: Triton's sampler must match it.
sample_topk = sample_topk_ref
