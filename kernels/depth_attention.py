"""A depth-decoder position in one launch: RoPE on q and k, the KV write, and attention over the frame's
<= P positions (P = 32 codebooks), for every lane and head (`reference.depth_attention_ref`).

One program per (lane, q head).  The position comes from a device tensor, so one captured graph
serves all 31 steps' shapes.  The program rotates its q head and its kv head's new k, attends to
the cached positions < pos plus the new (k, v) held in registers (no store-then-load of the same
address, so no barrier), and the first q head of each kv group writes k and v to the cache.
Rounding as the reference: rotated q and k are rounded to the input dtype; scores, softmax and
the weighted sum are fp32.
"""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, INT_DTYPES, check, check_same_device, launch, next_pow2


@triton.jit
def _depth_attention_kernel(qkv, k_cache, v_cache, pos_ptr, cos, sin, out, n_heads, n_kv_heads, positions, scale,
                            stride_qkv, stride_kb, stride_kh, stride_kp, stride_vb, stride_vh, stride_vp,
                            stride_cos, stride_ob, stride_oh,
                            HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_P: tl.constexpr):
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    kv = h // (n_heads // n_kv_heads)
    pos = tl.load(pos_ptr)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    c = tl.load(cos + pos * stride_cos + i, mask=i_ok, other=0.0)
    s = tl.load(sin + pos * stride_cos + i, mask=i_ok, other=0.0)
    row = qkv + b * stride_qkv
    dtype = qkv.dtype.element_ty

    q_src = row + h * 2 * HALF
    q1 = tl.load(q_src + i, mask=i_ok, other=0.0).to(tl.float32)
    q2 = tl.load(q_src + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    q1, q2 = (q1 * c - q2 * s).to(dtype).to(tl.float32), (q2 * c + q1 * s).to(dtype).to(tl.float32)
    k_src = row + (n_heads + kv) * 2 * HALF
    k1 = tl.load(k_src + i, mask=i_ok, other=0.0).to(tl.float32)
    k2 = tl.load(k_src + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    k1, k2 = (k1 * c - k2 * s).to(dtype), (k2 * c + k1 * s).to(dtype)
    v_src = row + (n_heads + n_kv_heads + kv) * 2 * HALF
    v1 = tl.load(v_src + i, mask=i_ok, other=0.0)
    v2 = tl.load(v_src + HALF + i, mask=i_ok, other=0.0)

    k_base = k_cache + b * stride_kb + kv * stride_kh
    v_base = v_cache + b * stride_vb + kv * stride_vh
    writes = i_ok & ((i * 0 + h) % (n_heads // n_kv_heads) == 0)  # one q head per kv group writes its k, v
    tl.store(k_base + pos * stride_kp + i, k1.to(k_cache.dtype.element_ty), mask=writes)
    tl.store(k_base + pos * stride_kp + HALF + i, k2.to(k_cache.dtype.element_ty), mask=writes)
    tl.store(v_base + pos * stride_vp + i, v1.to(v_cache.dtype.element_ty), mask=writes)
    tl.store(v_base + pos * stride_vp + HALF + i, v2.to(v_cache.dtype.element_ty), mask=writes)

    p = tl.arange(0, BLOCK_P)
    cached = ((p < pos) & (p < positions))[:, None] & i_ok[None, :]  # positions before this one
    new = (p == pos)[:, None]
    kp = k_base + p[:, None] * stride_kp + i[None, :]
    key1 = tl.where(new, k1.to(tl.float32)[None, :], tl.load(kp, mask=cached, other=0.0).to(tl.float32))
    key2 = tl.where(new, k2.to(tl.float32)[None, :], tl.load(kp + HALF, mask=cached, other=0.0).to(tl.float32))
    scores = tl.sum(key1 * q1[None, :] + key2 * q2[None, :], axis=1) * scale
    scores = tl.where(p <= pos, scores, float("-inf"))
    e = tl.exp(scores - tl.max(scores, axis=0))
    weights = e / tl.sum(e, axis=0)
    vp = v_base + p[:, None] * stride_vp + i[None, :]
    val1 = tl.where(new, v1.to(tl.float32)[None, :], tl.load(vp, mask=cached, other=0.0).to(tl.float32))
    val2 = tl.where(new, v2.to(tl.float32)[None, :], tl.load(vp + HALF, mask=cached, other=0.0).to(tl.float32))
    o = out + b * stride_ob + h * stride_oh
    tl.store(o + i, tl.sum(weights[:, None] * val1, axis=0).to(out.dtype.element_ty), mask=i_ok)
    tl.store(o + HALF + i, tl.sum(weights[:, None] * val2, axis=0).to(out.dtype.element_ty), mask=i_ok)


def depth_attention(qkv, n_heads, n_kv_heads, k_cache, v_cache, pos, cos, sin, scale=None, out=None):
    """RoPE + KV write + attention for one depth position of N lanes.

    qkv: [N, (H + 2K) d] fp32/fp16/bf16 (q heads, k heads, v heads; rows may be strided, last dim
         contiguous), d even; n_heads H, n_kv_heads K: ints, H a multiple of K.
    k_cache, v_cache: [N, K, P, d] of qkv's dtype, last dim contiguous (e.g. one layer's [:N] view);
         position pos is written, positions 0..pos are read.
    pos: int32/int64 [1] device tensor, 0 <= pos < P (not checked: no host sync).
    cos, sin: fp32 [P, d/2] tables of the positions' rotation (last dim contiguous).
    scale: of the scores, default d^-0.5; out: optional [N, H, d] of qkv's dtype. Returns out.
    """
    check("qkv", qkv, shape=(None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    lanes, width = qkv.shape
    if not (isinstance(n_heads, int) and isinstance(n_kv_heads, int) and n_kv_heads > 0 and n_heads % n_kv_heads == 0
            and width % (n_heads + 2 * n_kv_heads) == 0):
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}) and qkv's width "
                         f"({width}) a multiple of n_heads + 2 n_kv_heads")
    head_dim = width // (n_heads + 2 * n_kv_heads)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    check("k_cache", k_cache, shape=(lanes, n_kv_heads, None, head_dim), dtypes=(qkv.dtype,), last_contiguous=True)
    check("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=(qkv.dtype,), last_contiguous=True)
    positions = k_cache.shape[2]
    check("pos", pos, shape=(1,), dtypes=INT_DTYPES)
    check("cos", cos, shape=(positions, head_dim // 2), dtypes=(torch.float32,), last_contiguous=True)
    check("sin", sin, shape=(positions, head_dim // 2), dtypes=(torch.float32,), last_contiguous=True)
    if cos.stride(0) != sin.stride(0):
        raise ValueError(f"cos and sin must have the same row stride, got {cos.stride(0)} and {sin.stride(0)}")
    if out is None:
        out = qkv.new_empty(lanes, n_heads, head_dim)
    check("out", out, shape=(lanes, n_heads, head_dim), dtypes=(qkv.dtype,), last_contiguous=True)
    check_same_device(qkv=qkv, k_cache=k_cache, v_cache=v_cache, pos=pos, cos=cos, sin=sin, out=out)
    if lanes == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else float(scale)
    half = head_dim // 2
    launch(_depth_attention_kernel, (lanes, n_heads), qkv, k_cache, v_cache, pos, cos, sin, out, n_heads, n_kv_heads,
           positions, scale, qkv.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], cos.stride(0),
           out.stride(0), out.stride(1), HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_P=next_pow2(positions),
           num_warps=2)
    return out
