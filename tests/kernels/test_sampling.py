"""Top-k sampler and the fused depth-decoder step against the torch reference.

Token equality: greedy picks are exact (same fp32 logits, lowest index on ties). Sampled tokens
use bit-identical uniforms (tested in test_rng), but the race argmax(probs / -log(u)) can still
flip when two candidates' scores are within an ulp: softmax's sum order and -log(u) may differ by
an ulp between Triton (libdevice on a GPU, numpy here) and torch. Such near-ties are ~1e-6 per draw,
so the tests allow at most one mismatch per batch; in practice all draws match.
"""
import pytest
import torch

from misotts.kernels import reference as ref
from misotts.kernels.sampling import depth_step, sample_topk

VOCAB = 2051


def test_greedy_is_exact_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=g)
    logits[1, [10, 900, 2050]] = 50.0  # tie for the max: lowest index wins
    logits[2, -1] = 60.0  # max in the padded tail's last real entry
    seed, counter = torch.arange(6), torch.arange(6)
    for temperature, topk in ((0.0, 50), (0.8, 1)):
        out = torch.full((6,), -1, dtype=torch.int64)
        sample_topk(logits, temperature, topk, seed, counter, out=out)
        assert out.tolist() == ref.sample_topk_ref(logits, temperature, topk, seed, counter).tolist()
    assert out[1] == 10 and out[2] == VOCAB - 1


@pytest.mark.parametrize("temperature,topk", [(0.7, 2), (1.0, 50), (1.5, 64)])
def test_sampled_tokens_match_reference(temperature, topk):
    g = torch.Generator().manual_seed(topk)
    batch = 32
    logits = torch.randn(batch, VOCAB, generator=g) * 2
    seed = torch.randint(0, 2**40, (batch,), generator=g)
    counter = torch.randint(0, 3000 * 32, (batch,), generator=g)
    out = torch.full((batch,), -1, dtype=torch.int32)
    sample_topk(logits, temperature, topk, seed, counter, out=out)
    want = ref.sample_topk_ref(logits, temperature, topk, seed, counter)
    assert (out.long() != want).sum() <= 1  # see module docstring
    assert len(set(want.tolist())) > batch // 2  # really random draws, not the argmax


def test_topk_never_leaves_the_top_k():
    """64 seeds at a high temperature, with a tie at the k-th value in 16 rows."""
    g = torch.Generator().manual_seed(3)
    batch, vocab, topk = 64, 300, 5
    logits = torch.randn(batch, vocab, generator=g)
    top = logits.topk(topk + 1, dim=-1)
    logits[:16].scatter_(1, top.indices[:16, topk:topk + 1], top.values[:16, topk - 1:topk])  # ties: k-th == (k+1)-th
    seed = torch.arange(batch) * 7919 + 1  # 64 seeds
    counter = torch.arange(batch) % 4 + 100
    out = sample_topk(logits, 5.0, topk, seed, counter)
    kth = logits.topk(topk, dim=-1).values[:, -1]
    assert (logits.gather(1, out[:, None])[:, 0] >= kth).all()
    assert (out.long() == ref.sample_topk_ref(logits, 5.0, topk, seed, counter)).sum() >= batch - 1
    assert (logits >= kth[:, None]).sum(-1)[:16].eq(topk + 1).all()  # the tied rows really keep k+1


def chi_square(tokens, probs):
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing outside the support
    return (((counts - expected) ** 2 / expected)[keep]).sum().item(), int(keep.sum()) - 1


def test_frequencies_follow_softmax():
    """Chi-square goodness of fit at p = 0.001 (critical values for the stated degrees of freedom).

    Triton: 160 draws over a top-3 of 8 tokens (df 2, critical 13.82); torch reference with the same
    RNG: 20000 draws over a top-20 of 300 tokens (df 19, critical 43.82).
    """
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(8, generator=g)
    temperature, topk, n = 1.3, 3, 160
    x = logits.double() / temperature
    probs = x.masked_fill(x < x.topk(topk).values[-1], float("-inf")).softmax(-1)
    tokens = sample_topk(logits.expand(n, -1).contiguous(), temperature, topk, torch.full((n,), 1234), torch.arange(n))
    stat, df = chi_square(tokens, probs)
    assert df == 2 and stat < 13.82, stat

    logits = torch.randn(300, generator=g) * 0.5
    n, topk = 20000, 20
    probs = logits.double().masked_fill(logits < logits.topk(topk).values[-1], float("-inf")).softmax(-1)
    tokens = ref.sample_topk_ref(logits.expand(n, -1), 1.0, topk, torch.full((n,), 99), torch.arange(n))
    stat, df = chi_square(tokens, probs)
    assert df == 19 and stat < 43.82, stat


@pytest.mark.parametrize("codebook,temperature,topk", [(0, 0.0, 50), (7, 0.9, 50), (31, 1.0, 1)])
def test_depth_step(codebook, temperature, topk):
    g = torch.Generator().manual_seed(codebook)
    batch, dim, embed_dim, num_codebooks = 3, 72, 48, 32
    h = torch.randn(batch, dim, generator=g)
    if codebook == 0:  # the backbone's codebook-0 head is a Linear weight [V, D]: pass its transpose
        head = torch.randn(VOCAB, dim, generator=g).t()
    else:
        head = torch.randn(num_codebooks - 1, dim, VOCAB, generator=g)[codebook - 1]
    embed = torch.randn(num_codebooks * VOCAB, embed_dim, generator=g)
    seed, counter = torch.tensor([5, 6, 2**33]), torch.tensor([0, 17 * 32 + codebook, 99])
    codes = torch.full((batch, num_codebooks), -1, dtype=torch.int64)
    next_input = torch.full((batch, embed_dim), float("nan"))
    logits = torch.full((batch, VOCAB), float("nan"))
    depth_step(h, head, codebook, embed, codes, next_input, seed, counter, temperature, topk, logits=logits)
    want_tokens, want_next, want_logits = ref.depth_step_ref(h, head, codebook, embed, seed, counter, temperature, topk)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-4)
    assert codes[:, codebook].tolist() == want_tokens.tolist()
    assert torch.equal(next_input, embed[codes[:, codebook] + codebook * VOCAB])
    assert torch.equal(next_input, want_next)
    others = torch.ones(num_codebooks, dtype=torch.bool)
    others[codebook] = False
    assert codes[:, others].eq(-1).all()  # only this codebook's column is written


def test_bumping_the_counter_tensor_draws_again():
    """What a replayed CUDA graph sees: same tensors, counter bumped in place."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(8, 64, generator=g)
    seed, counter = torch.full((8,), 3), torch.zeros(8, dtype=torch.int64)
    draws = []
    for _ in range(3):
        draws.append(sample_topk(logits, 2.0, 20, seed, counter))
        assert draws[-1].tolist() == ref.sample_topk_ref(logits, 2.0, 20, seed, counter).tolist()
        counter += 1
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_per_lane_parameters_and_counter_offset():
    """Tensor temperature/topk [B] (greedy lanes mixed in) equal per-lane reference calls;
    counter_offset adds to the counter tensor (counter = frame * 32, offset = codebook)."""
    g = torch.Generator().manual_seed(12)
    batch = 6
    logits = torch.randn(batch, 500, generator=g) * 2
    temperature = torch.tensor([0.0, 0.8, 1.0, 1.3, 0.9, 0.7])
    topk = torch.tensor([40, 1, 50, 3, 64, 1000])  # lane 0 and 1 greedy; lane 5: topk > vocab keeps all
    seed, counter = torch.arange(batch) + 100, torch.full((batch,), 7 * 32)
    out = sample_topk(logits, temperature, topk, seed, counter, counter_offset=5)
    for lane in range(batch):
        want = ref.sample_topk_ref(logits[lane:lane + 1], float(temperature[lane]), min(int(topk[lane]), 500),
                                   seed[lane:lane + 1], counter[lane:lane + 1] + 5)
        assert out[lane] == want[0], lane


def test_depth_step_per_lane():
    g = torch.Generator().manual_seed(13)
    batch, dim, codebook = 3, 40, 4
    h, head = torch.randn(batch, dim, generator=g), torch.randn(dim, VOCAB, generator=g)
    embed = torch.randn(32 * VOCAB, 24, generator=g)
    temperature, topk = torch.tensor([0.9, 0.0, 1.2]), torch.tensor([50, 50, 20])
    seed, counter = torch.tensor([1, 2, 3]), torch.full((batch,), 11 * 32)
    codes, next_input = torch.full((batch, 32), -1), torch.full((batch, 24), float("nan"))
    depth_step(h, head, codebook, embed, codes, next_input, seed, counter, temperature, topk, counter_offset=codebook)
    for lane in range(batch):
        want, want_next, _ = ref.depth_step_ref(h[lane:lane + 1], head, codebook, embed, seed[lane:lane + 1],
                                                counter[lane:lane + 1] + codebook, float(temperature[lane]),
                                                int(topk[lane]))
        assert codes[lane, codebook] == want[0]
        assert torch.equal(next_input[lane], want_next[0])
