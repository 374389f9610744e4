"""The torch sampler: greedy, top-k support, seeded reproducibility, and the distribution."""
import math

import pytest
import torch

from misotts.runtime.sampling import check_sampling_args, sample_topk


def draw(logits, temperature, topk, seed, counters):
    n = len(counters)
    return sample_topk(logits.expand(n, -1), temperature, topk,
                       torch.full((n,), seed, dtype=torch.long), torch.tensor(counters, dtype=torch.long))


def test_greedy_is_argmax_for_zero_temperature_or_top1():
    logits = torch.randn(5, 2051)
    seeds = torch.arange(5)
    expected = logits.argmax(-1)
    assert torch.equal(sample_topk(logits, 0.0, 50, seeds, seeds), expected)
    assert torch.equal(sample_topk(logits, 0.9, 1, seeds, seeds), expected)


def test_topk_never_leaves_the_top_k():
    torch.manual_seed(0)
    logits = torch.randn(1, 2051) * 3
    allowed = set(logits[0].topk(10).indices.tolist())
    tokens = draw(logits, 1.5, 10, seed=3, counters=list(range(3000)))
    assert set(tokens.tolist()) <= allowed
    assert len(set(tokens.tolist())) == 10  # and it does reach all of them


def test_same_seed_and_counter_reproduce_and_rows_are_independent():
    torch.manual_seed(1)
    logits = torch.randn(6, 100)
    seed = torch.tensor([1, 2, 3, 4, 5, 6])
    counter = torch.tensor([10, 20, 30, 40, 50, 60])
    batch = sample_topk(logits, 1.0, 100, seed, counter)
    alone = torch.cat([sample_topk(logits[i:i + 1], 1.0, 100, seed[i:i + 1], counter[i:i + 1]) for i in range(6)])
    assert torch.equal(batch, alone)
    assert torch.equal(batch, sample_topk(logits, 1.0, 100, seed, counter))
    # Another seed gives another stream (over many draws, not all equal).
    a = draw(logits[:1], 1.0, 100, seed=1, counters=list(range(200)))
    b = draw(logits[:1], 1.0, 100, seed=2, counters=list(range(200)))
    assert (a != b).float().mean() > 0.5


def test_frequencies_follow_the_tempered_top_k_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, k, n = 0.7, 4, 20_000
    tokens = draw(logits, temperature, k, seed=11, counters=list(range(n)))
    p = torch.softmax(logits[0, :k] / temperature, dim=0)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[k:].sum() == 0
    # Each count is binomial(n, p): allow 5 standard deviations (false alarm odds ~1e-6 per token).
    sigma = torch.sqrt(n * p * (1 - p))
    assert ((counts[:k] - n * p).abs() <= 5 * sigma).all(), (counts[:k], n * p)
    # And the chi-square statistic is plausible for 3 degrees of freedom (p-value > 1e-4).
    chi2 = (((counts[:k] - n * p) ** 2) / (n * p)).sum().item()
    assert chi2 < 21.1, chi2
    assert not math.isnan(chi2)


@pytest.mark.parametrize("temperature, topk", [(-0.1, 5), (float("nan"), 5), (float("inf"), 5), (1.0, 0), (1.0, 3000)])
def test_bad_sampling_arguments(temperature, topk):
    with pytest.raises(ValueError):
        check_sampling_args(temperature, topk, 2051)


def test_uniform_stays_strictly_inside_0_1_at_the_extreme_bits(monkeypatch):
    """A u of exactly 1.0 would make -log(u) zero and the race 0/0 = NaN, which argmax picks."""
    from misotts.kernels import rng

    monkeypatch.setattr(rng, "random_bits", lambda s, c, v: torch.tensor([[0, 0xFFFFFFFF]], dtype=torch.int64))
    u = rng.uniform(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 2)
    assert 0 < u.min() and u.max() < 1 and (-torch.log(u) > 0).all()
