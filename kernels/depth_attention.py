"""A depth-decoder layer's attention in one launch: RoPE on q and k, the KV write, attention over the
frame's <= P positions (P = 32 codebooks) for every head, the output projection and the residual add:
residual += attention(...) @ wo.T (`reference.depth_attention_out_ref`).

One program per (block of BLOCK_N output columns, lane); BLOCK_N grows with the lanes (16 to 128).  The position comes from a device tensor,
so one captured graph serves all 31 steps.  Each program loops over the q heads: rotates the head
and its kv head's new k, attends to the cached positions < pos plus the new (k, v) held in
registers (no store-then-load of one address, so no barrier), and multiplies the head's output
into its wo columns.  Every program recomputes the (tiny) attention of its lane, so wo is read
once per lane and the attention output never goes to memory; the programs of column block 0
write k and v to the cache.  Rounding as the reference: rotated q and k, and each head's output,
are rounded to the input dtype; scores, softmax, sums and the residual add are fp32.
"""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, INT_DTYPES, check, check_same_device, launch, next_pow2


@triton.jit
def _rotated(src, i, i_ok, c, s, HALF: tl.constexpr):
    """The two halves of src[0:2 HALF] rotated by (c, s), in fp32 (not rounded)."""
    x1 = tl.load(src + i, mask=i_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _depth_attention_kernel(qkv, k_cache, v_cache, pos_ptr, cos, sin, wo, residual, n_heads, n_kv_heads, positions,
                            dim, scale, stride_qkv, stride_kb, stride_kh, stride_kp, stride_vb, stride_vh, stride_vp,
                            stride_cos, stride_won, stride_wok, stride_res,
                            HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < dim
    group = n_heads // n_kv_heads
    pos = tl.load(pos_ptr)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    c = tl.load(cos + pos * stride_cos + i, mask=i_ok, other=0.0)
    s = tl.load(sin + pos * stride_cos + i, mask=i_ok, other=0.0)
    row = qkv + b * stride_qkv
    dtype = qkv.dtype.element_ty
    p = tl.arange(0, BLOCK_P)
    new = (p == pos)[:, None]
    cached = ((p < pos) & (p < positions))[:, None] & i_ok[None, :]  # positions before this one
    writes = i_ok & (i * 0 + tl.program_id(0) == 0)  # column block 0 writes the new k, v
    wo_cols = wo + rn[:, None].to(tl.int64) * stride_won
    acc = tl.zeros([BLOCK_N], tl.float32)
    for h in range(0, n_heads):
        kv = h // group
        q1, q2 = _rotated(row + h * 2 * HALF, i, i_ok, c, s, HALF)
        q1, q2 = q1.to(dtype).to(tl.float32), q2.to(dtype).to(tl.float32)
        k1, k2 = _rotated(row + (n_heads + kv) * 2 * HALF, i, i_ok, c, s, HALF)
        k1, k2 = k1.to(dtype).to(tl.float32), k2.to(dtype).to(tl.float32)
        v_src = row + (n_heads + n_kv_heads + kv) * 2 * HALF
        v1 = tl.load(v_src + i, mask=i_ok, other=0.0).to(tl.float32)
        v2 = tl.load(v_src + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
        k_base = k_cache + b * stride_kb + kv * stride_kh
        v_base = v_cache + b * stride_vb + kv * stride_vh
        if h % group == 0:
            tl.store(k_base + pos * stride_kp + i, k1.to(k_cache.dtype.element_ty), mask=writes)
            tl.store(k_base + pos * stride_kp + HALF + i, k2.to(k_cache.dtype.element_ty), mask=writes)
            tl.store(v_base + pos * stride_vp + i, v1.to(v_cache.dtype.element_ty), mask=writes)
            tl.store(v_base + pos * stride_vp + HALF + i, v2.to(v_cache.dtype.element_ty), mask=writes)
        kp = k_base + p[:, None] * stride_kp + i[None, :]
        key1 = tl.where(new, k1[None, :], tl.load(kp, mask=cached, other=0.0).to(tl.float32))
        key2 = tl.where(new, k2[None, :], tl.load(kp + HALF, mask=cached, other=0.0).to(tl.float32))
        scores = tl.sum(key1 * q1[None, :] + key2 * q2[None, :], axis=1) * scale
        scores = tl.where(p <= pos, scores, float("-inf"))
        e = tl.exp(scores - tl.max(scores, axis=0))
        weights = e / tl.sum(e, axis=0)
        vp = v_base + p[:, None] * stride_vp + i[None, :]
        val1 = tl.where(new, v1[None, :], tl.load(vp, mask=cached, other=0.0).to(tl.float32))
        val2 = tl.where(new, v2[None, :], tl.load(vp + HALF, mask=cached, other=0.0).to(tl.float32))
        o1 = tl.sum(weights[:, None] * val1, axis=0).to(dtype).to(tl.float32)
        o2 = tl.sum(weights[:, None] * val2, axis=0).to(dtype).to(tl.float32)
        w = wo_cols + (h * 2 * HALF + i)[None, :] * stride_wok
        w_ok = n_ok[:, None] & i_ok[None, :]
        acc += tl.sum(tl.load(w, mask=w_ok, other=0.0).to(tl.float32) * o1[None, :], axis=1)
        acc += tl.sum(tl.load(w + HALF * stride_wok, mask=w_ok, other=0.0).to(tl.float32) * o2[None, :], axis=1)
    res = residual + b * stride_res + rn
    total = acc + tl.load(res, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(res, total.to(residual.dtype.element_ty), mask=n_ok)


def depth_attention(qkv, n_heads, n_kv_heads, k_cache, v_cache, pos, cos, sin, wo, residual, scale=None):
    """RoPE + KV write + attention + output projection + residual for one depth position of N lanes.

    qkv: [N, (H + 2K) d] fp32/fp16/bf16 (q heads, k heads, v heads; rows may be strided, last dim
         contiguous), d even; n_heads H, n_kv_heads K: ints, H a multiple of K.
    k_cache, v_cache: [N, K, P, d] of qkv's dtype, last dim contiguous (e.g. one layer's [:N] view);
         position pos is written, positions 0..pos are read.
    pos: int32/int64 [1] device tensor, 0 <= pos < P (not checked: no host sync).
    cos, sin: fp32 [P, d/2] tables of the positions' rotation (last dim contiguous, same strides).
    wo: [D, H d] of qkv's dtype (any strides); residual: [N, D] of qkv's dtype (last dim
    contiguous), updated in place: residual += attention @ wo.T.  scale: of the scores, default
    d^-0.5.  Returns residual.
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
    check("wo", wo, shape=(None, n_heads * head_dim), dtypes=(qkv.dtype,))
    dim = wo.shape[0]
    check("residual", residual, shape=(lanes, dim), dtypes=(qkv.dtype,), last_contiguous=True)
    check_same_device(qkv=qkv, k_cache=k_cache, v_cache=v_cache, pos=pos, cos=cos, sin=sin, wo=wo, residual=residual)
    if lanes == 0:
        return residual
    scale = head_dim ** -0.5 if scale is None else float(scale)
    half = head_dim // 2
    # Every program recomputes its lane's attention (all heads) for its BLOCK_N columns of wo, so wider
    # blocks cut that repeated work; the widest that still gives >= 256 programs (2 per SM of an H100),
    # 16 at the fewest lanes (64 programs per lane at D 1024), 128 at 32 lanes and more.
    block_n = 16
    while block_n < 128 and lanes * triton.cdiv(dim, 2 * block_n) >= 256:
        block_n *= 2
    if triton.knobs.runtime.interpret:  # the CPU interpreter pays per program: fewer, wider tiles (same kernel)
        block_n = max(block_n, min(256, next_pow2(dim)))
    launch(_depth_attention_kernel, (triton.cdiv(dim, block_n), lanes), qkv, k_cache, v_cache, pos, cos, sin, wo,
           residual, n_heads, n_kv_heads, positions, dim, scale, qkv.stride(0), *k_cache.stride()[:3],
           *v_cache.stride()[:3], cos.stride(0), wo.stride(0), wo.stride(1), residual.stride(0),
           HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_P=next_pow2(positions), BLOCK_N=block_n, num_warps=4)
    return residual
