"""Counter-based RNG shared by the torch sampler and the Triton kernels (bit-for-bit equal).

    hash32(x): x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16   (mod 2^32)
    bits(seed, counter, index) = hash32(hash32(hash32(seed ^ 0x9E3779B9) ^ counter) ^ index)
    uniform = ((bits >> 9) + 0.5) * 2^-23        # in (0, 1), exact in fp32 (24 significant bits)

seed and counter are taken mod 2^32. The torch functions work on int64 tensors and mask to
32 bits after each multiply (int64 multiplication wraps mod 2^64, so the low 32 bits are right).
"""
import torch
import triton
import triton.language as tl

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def hash32(x: torch.Tensor) -> torch.Tensor:
    """hash32 of an integer tensor, returned as int64 in [0, 2^32)."""
    x = x.to(torch.int64) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def random_bits(seed: torch.Tensor, counter: torch.Tensor, vocab: int | torch.Tensor) -> torch.Tensor:
    """bits(seed[b], counter[b], v) for v in range(vocab): int64 [B, vocab] in [0, 2^32).

    seed and counter may carry more leading dims (they broadcast): [..., vocab] out.

    vocab may be the index vector itself (int64 [V]), preallocated so a captured step allocates
    nothing from host data.
    """
    stream = hash32(hash32((seed.to(torch.int64) & MASK32) ^ GOLDEN) ^ (counter.to(torch.int64) & MASK32))
    index = torch.arange(vocab, device=stream.device, dtype=torch.int64) if isinstance(vocab, int) else vocab
    return hash32(stream[..., None] ^ index)


def uniform(seed: torch.Tensor, counter: torch.Tensor, vocab: int | torch.Tensor) -> torch.Tensor:
    """seed, counter: LongTensor [B] -> FloatTensor [B, vocab] of uniforms in (0, 1)."""
    # 23 bits + 0.5 needs 24 significant bits: exact in fp32, so u < 1 and -log(u) > 0 always.
    return ((random_bits(seed, counter, vocab) >> 9).to(torch.float32) + 0.5) * 2.0**-23


@triton.jit
def hash32_tl(x):
    """hash32 of a uint32 tensor (uint32 multiplication wraps mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def uniform_tl(seed, counter, index):
    """seed, counter: int64 scalars; index: int32 tensor -> fp32 uniforms in (0, 1)."""
    s = hash32_tl(seed.to(tl.uint32) ^ tl.full([], 0x9E3779B9, tl.uint32))  # GOLDEN
    s = hash32_tl(s ^ counter.to(tl.uint32))
    bits = hash32_tl(s ^ index.to(tl.uint32))
    return ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
