"""RoPE on the new tokens' q/k, fused with the write of k/v into the paged KV cache.

RoPE convention: HF rotate_half (pairs (x[i], x[i + d/2])), angle = position * inv_freq[i] in fp32,
cos/sin computed in the kernel (so there is no table to size for a maximum length).
"""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, INT_DTYPES, check, check_same_device, launch, next_pow2
from .reference import rope_inv_freq


def llama3_inv_freq(head_dim, base=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192, device=None):
    """inv_freq [head_dim/2] fp32 with Llama-3 frequency scaling (factor=1: plain RoPE);
    `reference.rope_inv_freq` with CSM's settings as defaults."""
    return rope_inv_freq(head_dim, base, None if factor == 1.0 else factor, low_freq_factor, high_freq_factor,
                         original_max_position_embeddings, device)


@triton.jit
def _rotate_heads(src, dst, heads, num_heads, half, cos, sin, src_stride_h, dst_stride_h, HALF: tl.constexpr):
    keep = (heads < num_heads)[:, None]
    offs_src = heads[:, None] * src_stride_h + half[None, :]
    offs_dst = heads[:, None] * dst_stride_h + half[None, :]
    x1 = tl.load(src + offs_src, mask=keep, other=0.0).to(tl.float32)
    x2 = tl.load(src + offs_src + HALF, mask=keep, other=0.0).to(tl.float32)
    tl.store(dst + offs_dst, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=keep)
    tl.store(dst + offs_dst + HALF, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=keep)


@triton.jit
def _rope_kv_kernel(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping,
                    num_q_heads, num_kv_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                    HALF: tl.constexpr, PAGE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, HALF)
    angle = tl.load(positions + t).to(tl.float32) * tl.load(inv_freq + half)
    cos, sin = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
    q_t = q + t * stride_qt
    _rotate_heads(q_t, q_t, tl.arange(0, BLOCK_HQ), num_q_heads, half, cos, sin, stride_qh, stride_qh, HALF)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    slot_heads = tl.where(slot >= 0, num_kv_heads, 0)  # slot -1: a padding lane, write no head
    page, offset = slot // PAGE, slot % PAGE
    kv_heads = tl.arange(0, BLOCK_HKV)
    _rotate_heads(k + t * stride_kt, k_cache + page * stride_kcb + offset * stride_kcs, kv_heads, slot_heads,
                  half, cos, sin, stride_kh, stride_kch, HALF)
    cols = tl.arange(0, 2 * HALF)
    keep = (kv_heads < slot_heads)[:, None]
    value = tl.load(v + t * stride_vt + kv_heads[:, None] * stride_vh + cols[None, :], mask=keep)
    tl.store(v_cache + page * stride_vcb + offset * stride_vcs + kv_heads[:, None] * stride_vch + cols[None, :],
             value.to(v_cache.dtype.element_ty), mask=keep)


def rope_kv_write(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping):
    """Rotate q in place; write rotated k and v into the paged caches.

    q: [T, Hq, d]; k, v: [T, Hkv, d] (any token/head strides, last dim contiguous, e.g. views of
       a fused qkv output); k is read only (its rotated copy goes to the cache).
    positions: int32/int64 [T]; inv_freq: fp32 [d/2] (see llama3_inv_freq); d a power of two.
    k_cache, v_cache: [num_blocks, block_size, Hkv, d] (block_size a power of two, last dim contiguous).
    slot_mapping: int32/int64 [T], slot = block * block_size + offset, -1 = do not write.
    Returns q.
    """
    check("q", q, shape=(None, None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    tokens, num_q_heads, head_dim = q.shape
    check("k", k, shape=(tokens, None, head_dim), dtypes=FLOAT_DTYPES, last_contiguous=True)
    num_kv_heads = k.shape[1]
    check("v", v, shape=(tokens, num_kv_heads, head_dim), dtypes=FLOAT_DTYPES, last_contiguous=True)
    if head_dim < 4 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 4, got {head_dim}")
    check("positions", positions, shape=(tokens,), dtypes=INT_DTYPES, contiguous=True)
    check("inv_freq", inv_freq, shape=(head_dim // 2,), dtypes=(torch.float32,), contiguous=True)
    check("k_cache", k_cache, shape=(None, None, num_kv_heads, head_dim), dtypes=FLOAT_DTYPES, last_contiguous=True)
    check("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=(k_cache.dtype,), last_contiguous=True)
    page = k_cache.shape[1]
    if page & (page - 1):
        raise ValueError(f"block_size (k_cache.shape[1]) must be a power of two, got {page}")
    check("slot_mapping", slot_mapping, shape=(tokens,), dtypes=INT_DTYPES, contiguous=True)
    check_same_device(q=q, k=k, v=v, positions=positions, inv_freq=inv_freq, k_cache=k_cache, v_cache=v_cache,
                      slot_mapping=slot_mapping)
    if tokens == 0:
        return q
    launch(_rope_kv_kernel, (tokens,), q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping,
           num_q_heads, num_kv_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
           *k_cache.stride()[:3], *v_cache.stride()[:3], HALF=head_dim // 2, PAGE=page,
           BLOCK_HQ=next_pow2(num_q_heads), BLOCK_HKV=next_pow2(num_kv_heads), num_warps=4)
    return q
