"""The shared RNG: torch functions vs plain Python ints, and the Triton twin vs torch (bit-exact)."""
import torch
import triton
import triton.language as tl

from misotts.kernels.rng import hash32, hash32_tl, random_bits, uniform, uniform_tl

M32 = 2**32


def py_hash32(x):
    x %= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) % M32
    x ^= x >> 15
    x = (x * 0x846CA68B) % M32
    return x ^ (x >> 16)


def py_bits(seed, counter, index):
    return py_hash32(py_hash32(py_hash32((seed % M32) ^ 0x9E3779B9) ^ (counter % M32)) ^ index)


def test_hash32_known_values():
    # hash32(1) step by step: 1 ^ (1 >> 16) = 1; * 0x7feb352d = 0x7feb352d; ^ (>> 15 = 0xffd6) = 0x7febcafb;
    # * 0x846ca68b mod 2^32 = 0x6889f849; ^ (>> 16 = 0x6889) = 0x688990c0 = 1753845952. hash32(0) = 0.
    assert 0x688990C0 == 1753845952
    expected = {0: 0, 1: 1753845952, 12345: 2435775735, 0xFFFFFFFF: 1734902346}  # last two: py_hash32
    assert {x: py_hash32(x) for x in expected} == expected
    got = hash32(torch.tensor(list(expected), dtype=torch.int64)).tolist()
    assert got == list(expected.values())


def test_uniform_matches_plain_python():
    seeds = [0, 1, 42, 2**40 + 7, -5]  # seeds are taken mod 2^32 (so -5 == 2^32 - 5)
    counters = [0, 31, 12345, 2**33 + 1, 3]
    bits = random_bits(torch.tensor(seeds), torch.tensor(counters), 50)
    for row, (s, c) in enumerate(zip(seeds, counters)):
        assert bits[row].tolist() == [py_bits(s, c, i) for i in range(50)]
    u = uniform(torch.tensor(seeds), torch.tensor(counters), 50)
    want = [[((py_bits(s, c, i) >> 9) + 0.5) / 2**23 for i in range(50)] for s, c in zip(seeds, counters)]
    assert torch.equal(u, torch.tensor(want, dtype=torch.float64).float())  # exact: no rounding anywhere
    assert uniform(torch.tensor([-5]), torch.tensor([3]), 4).equal(uniform(torch.tensor([M32 - 5]), torch.tensor([3]), 4))


def test_uniform_never_reaches_one():
    """Why 23 bits: with (bits >> 8) + 0.5 (24 bits + a half) the fp32 add rounds 2^24 - 0.5 up to
    2^24, so u == 1.0, -log(u) == 0 and probs / 0 picks a token (or NaN) outside the top-k."""
    assert (torch.tensor([2.0**24 - 1]) + 0.5).item() * 2.0**-24 == 1.0  # the 24-bit variant's failure
    largest = (torch.tensor([2.0**23 - 1]) + 0.5) * 2.0**-23  # the largest value uniform can return
    assert largest.item() < 1.0 and -torch.log(largest).item() > 0


def test_uniform_range_and_mean():
    u = uniform(torch.arange(64), torch.arange(64) * 7, 2051)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005  # 131k draws: std of the mean ~0.0008


@triton.jit
def _uniform_kernel(seed, counter, out, vocab, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    tl.store(out + b * vocab + idx, uniform_tl(tl.load(seed + b), tl.load(counter + b), idx), mask=idx < vocab)


@triton.jit
def _hash_kernel(x, out, n, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    h = hash32_tl(tl.load(x + idx, mask=idx < n).to(tl.uint32))
    tl.store(out + idx, h.to(tl.int64), mask=idx < n)


def test_triton_twin_is_bit_exact():
    x = torch.tensor([0, 1, 12345, 0xFFFFFFFF, 0x9E3779B9, 77777777], dtype=torch.int64)
    out = torch.full_like(x, -1)
    _hash_kernel[(1,)](x, out, x.numel(), BLOCK=8)
    assert out.tolist() == [py_hash32(v) for v in x.tolist()]
    seed = torch.tensor([0, 9, 2**40 + 3, -1], dtype=torch.int64)
    counter = torch.tensor([0, 5, 32 * 17 + 3, 2**35], dtype=torch.int64)
    vocab = 300
    got = torch.full((4, vocab), float("nan"))
    _uniform_kernel[(4,)](seed, counter, got, vocab, BLOCK=512)
    assert torch.equal(got, uniform(seed, counter, vocab))
