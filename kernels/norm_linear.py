"""RMSNorm fused into the prologue of a skinny GEMM (a GEMV for a few rows), optionally with SwiGLU in
its epilogue: the norm, the projection and the activation of a decode step in one launch.

out = rmsnorm(x) @ weight.T (`reference.rmsnorm_linear_ref`), or with swiglu=True
out = silu(g) * u for [g | u] = rmsnorm(x) @ gate_up.T (`reference.rmsnorm_swiglu_ref`).

Each program owns BLOCK_N output columns (of gate and of up) for BLOCK_B rows: it first sums
the squares of its rows of x (x is small and stays in L2: every program re-reads it), then
streams its weight tile along K once, normalizing x on the fly.  Weights are read exactly once
overall, so the launch costs no more HBM traffic than the bare GEMM.  Rounding as the reference
in bf16: the normed row is rounded to x's dtype before and after the norm weight, the gate and
up projections and silu(gate) to the output dtype, then the product once.
`linear_add` is the same GEMV without the norm, adding into a residual in its epilogue:
residual += a @ weight.T (`reference.linear_residual_ref`), a layer's wo or down projection.
Meant for decode (N rows <= a few tens); prefill-sized inputs belong to cuBLAS.
"""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check, check_same_device, launch, next_pow2


@triton.jit
def row_rstd(x_rows, row_ok, K, eps, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / rms of BLOCK_B rows of x (x_rows: their row pointers [BLOCK_B, 1]) over K columns, in fp32:
    the prologue of the norm-fused GEMVs (here and in quant_linear.py)."""
    sumsq = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(a * a, axis=1)
    return 1.0 / tl.sqrt(sumsq / K + eps)


@triton.jit
def _norm_linear_kernel(x, norm_w, w, out, rows, K, N, eps, stride_xb, stride_wn, stride_wk, stride_ob,
                        SWIGLU: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rb < rows, rn < N
    x_rows = x + rb[:, None].to(tl.int64) * stride_xb
    rstd = tl.zeros([BLOCK_B], tl.float32)
    if NORM:
        rstd = row_rstd(x_rows, row_ok, K, eps, BLOCK_B, BLOCK_K)
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    w_cols = w + rn[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            g = tl.load(norm_w + ks, mask=k_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * rstd[:, None]).to(x.dtype.element_ty).to(tl.float32) * g[None, :]
        a = a.to(w.dtype.element_ty)
        tile = w_cols + ks[:, None].to(tl.int64) * stride_wk
        wmask = k_ok[:, None] & col_ok[None, :]
        if IEEE:  # fp32 weights: no tf32
            acc += tl.dot(a, tl.load(tile, mask=wmask, other=0.0), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.load(tile, mask=wmask, other=0.0))
        if SWIGLU:  # the up rows sit N rows below the gate rows
            up = tl.load(tile + N * stride_wn, mask=wmask, other=0.0)
            if IEEE:
                acc_up += tl.dot(a, up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, up)
    dtype = out.dtype.element_ty
    if SWIGLU:
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        acc = silu * acc_up.to(dtype).to(tl.float32)
    dst = out + rb[:, None].to(tl.int64) * stride_ob + rn[None, :]
    if RESIDUAL:  # out += the product rounded to its dtype, added in fp32 (as `linear_residual_ref`)
        acc = acc.to(dtype).to(tl.float32) + tl.load(dst, mask=row_ok[:, None] & col_ok[None, :]).to(tl.float32)
    tl.store(dst, acc.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


def norm_linear(x, norm_weight, eps, weight, swiglu=False, out=None):
    """rmsnorm(x) @ weight.T in one launch (with swiglu=True: silu(gate) * up of the two halves).

    x: [B, K] fp32/fp16/bf16 (rows may be strided, last dim contiguous); norm_weight: [K] contiguous;
    eps: float; weight: [M, K] of x's dtype, any strides (a Linear weight, or a [K, M] head
    transposed); with swiglu, M = 2F (gate rows first, then up) and the output has F columns.
    out: optional [B, M or F] of x's dtype (last dim contiguous). Returns out.
    """
    check("x", x, shape=(None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    rows, dim = x.shape
    check("norm_weight", norm_weight, shape=(dim,), dtypes=FLOAT_DTYPES, contiguous=True)
    check("weight", weight, shape=(None, dim), dtypes=(x.dtype,))
    if not isinstance(eps, float) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"with swiglu, weight must have an even number of rows (gate, up), got {weight.shape[0]}")
    cols = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if out is None:
        out = x.new_empty(rows, cols)
    check("out", out, shape=(rows, cols), dtypes=(x.dtype,), last_contiguous=True)
    check_same_device(x=x, norm_weight=norm_weight, weight=weight, out=out)
    if rows == 0:
        return out
    block_b, block_n, block_k = _tiles(rows, cols, x.dtype, swiglu)
    launch(_norm_linear_kernel, (triton.cdiv(cols, block_n), triton.cdiv(rows, block_b)), x, norm_weight, weight,
           out, rows, dim, cols, eps, x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
           SWIGLU=swiglu, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
           NORM=True, RESIDUAL=False, num_warps=4)
    return out


def _tiles(rows, cols, dtype, swiglu=False):
    """(BLOCK_B, BLOCK_N, BLOCK_K): K tiles of 64 with SwiGLU's two accumulators (else 128)."""
    # Up to 64 lanes in one row block, so the weights are read once; fp32 (the IEEE path: CPU parity,
    # not speed) in blocks of <= 32 rows: 64 spill registers on sm_80.
    block_b = min(max(16, next_pow2(rows)), 32 if dtype == torch.float32 else 64)
    block_n = 64 if triton.cdiv(cols, 64) >= 256 else 32 if triton.cdiv(cols, 32) >= 128 else 16
    if triton.knobs.runtime.interpret:  # the CPU interpreter pays per program: fewer, wider tiles (same kernel)
        block_n = max(block_n, min(256, next_pow2(cols)))
    return block_b, block_n, 64 if swiglu else 128


def linear_add(a, weight, residual):
    """residual += a @ weight.T in one launch (in place), the product rounded to residual's dtype
    before an fp32 add (as `reference.linear_residual_ref`).

    a: [B, K] fp32/fp16/bf16 (rows may be strided, last dim contiguous); weight: [M, K] of a's dtype,
    any strides; residual: [B, M] of a's dtype, last dim contiguous.  Returns residual.
    """
    check("a", a, shape=(None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    rows, dim = a.shape
    check("weight", weight, shape=(None, dim), dtypes=(a.dtype,))
    cols = weight.shape[0]
    check("residual", residual, shape=(rows, cols), dtypes=(a.dtype,), last_contiguous=True)
    check_same_device(a=a, weight=weight, residual=residual)
    if rows == 0:
        return residual
    block_b, block_n, block_k = _tiles(rows, cols, a.dtype, swiglu=a.dtype == torch.float32)  # fp32: K tiles of 64
    launch(_norm_linear_kernel, (triton.cdiv(cols, block_n), triton.cdiv(rows, block_b)), a, a, weight, residual,
           rows, dim, cols, 1.0, a.stride(0), weight.stride(0), weight.stride(1), residual.stride(0),
           SWIGLU=False, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=a.dtype == torch.float32,
           NORM=False, RESIDUAL=True, num_warps=4)
    return residual
