"""RoPE + paged KV write against the torch reference; the reference against complex rotation."""
import math

import pytest
import torch

from misotts.kernels import reference as ref
from misotts.kernels.rope import llama3_inv_freq, rope_kv_write


def test_llama3_inv_freq_vectorized():
    """Same scaling written the vectorized way (torch.where over wavelengths) for CSM's rope settings."""
    d, base, factor, low, high, orig = 64, 500000.0, 32.0, 1.0, 4.0, 8192
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    want = torch.where(wavelen < orig / high, inv, torch.where(wavelen > orig / low, inv / factor, mid))
    got = llama3_inv_freq(d, base, factor, low, high, orig)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert got.dtype == torch.float32 and got.shape == (d // 2,)
    torch.testing.assert_close(llama3_inv_freq(8, 10000.0, factor=1.0), 10000.0 ** (-torch.arange(0, 8, 2) / 8.0))


def test_rope_reference_is_complex_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 100, 4097])
    inv = llama3_inv_freq(16)
    z = torch.complex(x[..., :8], x[..., 8:]) * torch.polar(torch.ones(5, 8, dtype=torch.float64),
                                                            pos[:, None].float().double() * inv.double())[:, None]
    want = torch.cat([z.real, z.imag], -1)
    torch.testing.assert_close(ref.rope_ref(x.float(), pos, inv).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,page", [(4, 4, 64, 16), (8, 1, 128, 32), (12, 3, 64, 64)])
def test_rope_kv_write(num_q_heads, num_kv_heads, head_dim, page):
    g = torch.Generator().manual_seed(num_q_heads * head_dim)
    tokens, blocks = 7, 9
    qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=g)  # fused projection output
    q, k, v = qkv.view(tokens, -1, head_dim).split([num_q_heads, num_kv_heads, num_kv_heads], dim=1)
    positions = torch.randint(0, 9000, (tokens,), generator=g)
    inv_freq = llama3_inv_freq(head_dim)
    k_cache = torch.randn(blocks, page, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(blocks, page, num_kv_heads, head_dim, generator=g)
    # block 5 offset 0, last slot of block 5, first of block 6, -1 (padding lane), block 8 ...
    slots = torch.tensor([5 * page, 6 * page - 1, 6 * page, -1, 8 * page + 3, 1, 2 * page + 7])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = ref.rope_kv_write_ref(q, k, v, positions, inv_freq, want_k, want_v, slots)
    k_before = k.clone()
    rope_kv_write(q, k, v, positions, inv_freq, k_cache, v_cache, slots)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)  # rotated in place, inside the fused buffer
    assert torch.equal(k, k_before)  # k itself is only read
    torch.testing.assert_close(k_cache, want_k, rtol=1e-5, atol=1e-5)  # untouched slots compare equal too
    assert torch.equal(v_cache, want_v)


def test_rope_kv_write_high_block_ids(big_kv_cache):
    """Slots in blocks whose element offset exceeds 2^31 (addresses must be int64)."""
    k_cache, v_cache = big_kv_cache
    blocks, page, heads, dim = k_cache.shape
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(3, n, dim, generator=g) for n in (4, heads, heads))
    slots = torch.tensor([(blocks - 1) * page + 15, (blocks - 7) * page, (blocks - 7) * page + 1])
    for b in (blocks - 1, blocks - 7):
        k_cache[b], v_cache[b] = float("nan"), float("nan")
    positions, inv = torch.tensor([3, 4000, 4001]), llama3_inv_freq(dim)
    want_q = ref.rope_ref(q, positions, inv)
    rope_kv_write(q, k, v, positions, inv, k_cache, v_cache, slots)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    got_k = k_cache[slots // page, slots % page]
    torch.testing.assert_close(got_k, ref.rope_ref(k, positions, inv), rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache[slots // page, slots % page], v)
