"""Skinny GEMMs (GEMVs for a few decode rows) that stream quantised weights and dequantise them in
registers: the quantised twins of `norm_linear` and of the residual-adding projections (wo, down).

    quant_norm_linear(x, norm_weight, eps, codes, scale, scheme)   rmsnorm(x) @ W.T
    quant_norm_linear(..., swiglu=True)                            silu(g) * u for [g | u] = rmsnorm(x) @ W.T
    quant_linear_add(a, codes, scale, scheme, residual)            residual += a @ W.T (in place)

W is a weight stored as `weights/quantize.py` stores it (its meaning and reference math are in
`kernels/reference.py`: `dequantize_ref`, `quant_linear_ref`): "int8" / "fp8" codes [M, K] with an
fp32 scale per output row, or "int4" codes two a byte [M, K/2] with an fp32 scale per group of
input columns [M, K/G].  Each program owns BLOCK_N output columns for BLOCK_B rows and streams
its codes along K once: each tile is dequantised (codes x scale in fp32, rounded to x's dtype,
as the reference rounds the weight) and fed to tl.dot.  The weight bytes read are the codes'
(1 or 1/2 byte a weight) plus the scales'.  Meant for decode rows; prefill belongs to a GEMM.
The engine calls them through `QuantTritonOps` (engine/quant_ops.py: `ops="triton"` on a
quantised model); "auto" keeps quantised models on the torch op set until they have run on a GPU.
"""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check, check_same_device, launch, next_pow2
from .norm_linear import row_rstd

CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}


@triton.jit
def _dequant_tile(codes, scale, rn, ks, col_ok, wmask, stride_cn, stride_sn, INT4: tl.constexpr,
                  GROUP: tl.constexpr):
    """The weight tile [BLOCK_K, BLOCK_N] (input column ks, output row rn) in fp32."""
    rows = rn[None, :].to(tl.int64)
    if INT4:
        byte = tl.load(codes + rows * stride_cn + (ks // 2)[:, None], mask=wmask, other=0).to(tl.int32)
        q = ((byte >> ((ks % 2) * 4)[:, None]) & 0xF) - 8
        s = tl.load(scale + rows * stride_sn + (ks // GROUP)[:, None], mask=wmask, other=0.0)
        return q.to(tl.float32) * s
    q = tl.load(codes + rows * stride_cn + ks[:, None], mask=wmask, other=0.0).to(tl.float32)
    s = tl.load(scale + rn.to(tl.int64) * stride_sn, mask=col_ok, other=0.0)  # per output row
    return q * s[None, :]


@triton.jit
def _quant_linear_kernel(x, norm_w, codes, scale, residual, out, rows, K, N, eps, stride_xb, stride_cn, stride_sn,
                         stride_rb, stride_ob, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                         INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rb < rows, rn < N
    x_rows = x + rb[:, None].to(tl.int64) * stride_xb
    dtype = x.dtype.element_ty
    rstd = tl.zeros([BLOCK_B], tl.float32)
    if NORM:
        rstd = row_rstd(x_rows, row_ok, K, eps, BLOCK_B, BLOCK_K)
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # rounded where rmsnorm_ref rounds: the normed row, then times the norm weight
            g = tl.load(norm_w + ks, mask=k_ok, other=0.0).to(tl.float32)
            a = ((a.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32) * g[None, :]).to(dtype)
        wmask = k_ok[:, None] & col_ok[None, :]
        w = _dequant_tile(codes, scale, rn, ks, col_ok, wmask, stride_cn, stride_sn, INT4, GROUP).to(dtype)
        if IEEE:  # fp32: no tf32
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        if SWIGLU:  # the up rows sit N rows below the gate rows
            up = _dequant_tile(codes + N * stride_cn, scale + N * stride_sn, rn, ks, col_ok, wmask, stride_cn,
                               stride_sn, INT4, GROUP).to(dtype)
            if IEEE:
                acc_up += tl.dot(a, up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, up)
    mask = row_ok[:, None] & col_ok[None, :]
    if SWIGLU:
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        acc = silu * acc_up.to(dtype).to(tl.float32)
    if RESIDUAL:  # as linear_residual_ref: the product rounded, added in fp32, rounded again
        res = tl.load(residual + rb[:, None].to(tl.int64) * stride_rb + rn[None, :], mask=mask, other=0.0)
        acc = acc.to(dtype).to(tl.float32) + res.to(tl.float32)
    tl.store(out + rb[:, None].to(tl.int64) * stride_ob + rn[None, :], acc.to(dtype), mask=mask)


def _check_weight(codes, scale, scheme, dim):
    if scheme not in CODES:
        raise ValueError(f"scheme must be one of {sorted(CODES)}, got {scheme!r}")
    check("codes", codes, shape=(None, dim // 2 if scheme == "int4" else dim), dtypes=(CODES[scheme],),
          last_contiguous=True)
    if scheme == "int4":
        if dim % 2:
            raise ValueError(f"int4 needs an even input width, got {dim}")
        check("scale", scale, shape=(codes.shape[0], None), dtypes=(torch.float32,), last_contiguous=True)
        groups = scale.shape[1]
        if groups == 0 or dim % groups or (dim // groups) % 2:
            raise ValueError(f"int4 scale [M, K/G] must split K={dim} into groups of an even size, got {groups} groups")
        return dim // groups, scale.stride(0)
    check("scale", scale, shape=(codes.shape[0],), dtypes=(torch.float32,))
    return 1, scale.stride(0)


def _launch(x, norm_weight, eps, codes, scale, scheme, out, residual, swiglu):
    rows, dim = x.shape
    group, stride_sn = _check_weight(codes, scale, scheme, dim)
    cols = codes.shape[0] // 2 if swiglu else codes.shape[0]
    if swiglu and codes.shape[0] % 2:
        raise ValueError(f"with swiglu, codes must have an even number of rows (gate, up), got {codes.shape[0]}")
    if out is None:
        out = x.new_empty(rows, cols)
    check("out", out, shape=(rows, cols), dtypes=(x.dtype,), last_contiguous=True)
    check_same_device(x=x, norm_weight=norm_weight, codes=codes, scale=scale, residual=residual, out=out)
    if rows == 0:
        return out
    block_b = min(max(16, next_pow2(rows)), 64)
    block_n = 64 if triton.cdiv(cols, 64) >= 256 else 32 if triton.cdiv(cols, 32) >= 128 else 16
    block_k = 64 if swiglu else 128
    if triton.knobs.runtime.interpret:  # the CPU interpreter pays per program: fewer, wider tiles (same kernel)
        block_n = max(block_n, min(256, next_pow2(cols)))
    launch(_quant_linear_kernel, (triton.cdiv(cols, block_n), triton.cdiv(rows, block_b)), x,
           x if norm_weight is None else norm_weight, codes, scale, out if residual is None else residual, out, rows,
           dim, cols, eps, x.stride(0), codes.stride(0), stride_sn, out.stride(0) if residual is None else
           residual.stride(0), out.stride(0), NORM=norm_weight is not None, SWIGLU=swiglu,
           RESIDUAL=residual is not None, INT4=scheme == "int4", GROUP=group, BLOCK_B=block_b, BLOCK_N=block_n,
           BLOCK_K=block_k, IEEE=x.dtype == torch.float32, num_warps=4)
    return out


def quant_norm_linear(x, norm_weight, eps, codes, scale, scheme, swiglu=False, out=None):
    """rmsnorm(x) @ W.T for a quantised W, in one launch (with swiglu=True: silu(gate) * up of
    its two row halves).  x: [B, K] fp32/fp16/bf16 (last dim contiguous); norm_weight: [K]
    contiguous; eps: float; codes, scale: W as `scheme` stores it (module docstring).
    out: optional [B, M or M/2] of x's dtype.  Returns out."""
    check("x", x, shape=(None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    check("norm_weight", norm_weight, shape=(x.shape[1],), dtypes=FLOAT_DTYPES, contiguous=True)
    if not isinstance(eps, float) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return _launch(x, norm_weight, eps, codes, scale, scheme, out, None, swiglu)


def quant_linear_add(a, codes, scale, scheme, residual):
    """residual += a @ W.T for a quantised W (the product rounded to the residual's dtype, the sum
    in fp32, as `linear_residual_ref`), in place; returns residual.  a: [B, K]; residual [B, M]
    of a's dtype, last dim contiguous."""
    check("a", a, shape=(None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    check("residual", residual, shape=(a.shape[0], codes.shape[0]), dtypes=(a.dtype,), last_contiguous=True)
    return _launch(a, None, 1.0, codes, scale, scheme, residual, residual, False)


def report_cases(preset, cfg, t):
    """The compile report's cases (kernels/report.py): decode shapes of both transformers, int8 and
    int4 (fp8 compiles for sm_89+ only, so it is not in the report that also targets sm_80)."""
    from misotts.weights.quantize import QuantConfig, stored_shapes

    qc = QuantConfig.make("int4", cfg)
    cases = []
    for part, tc in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        d, q_dim, ffn, eps = tc.dim, (tc.n_heads + 2 * tc.n_kv_heads) * tc.head_dim, tc.ffn_dim, tc.norm_eps
        schemes = ("int8", "int4") if part == "backbone" else ("int8",)  # int4: the backbone's only
        for scheme in schemes:
            group = qc.group_size if scheme == "int4" else 0

            def weight(m, k, scheme=scheme, group=group):
                data, scale = stored_shapes(scheme, m, k, group)
                return t(*data, dtype=CODES[scheme]), t(*scale, dtype=torch.float32)

            for batch in (8,):  # 1 to 16 rows compile to the same kernel (one 16-row block)
                cases += [
                    ("quant_norm_linear", f"{preset} {part} {scheme} qkv B{batch} D{d}->{q_dim}",
                     lambda d=d, n=q_dim, eps=eps, b=batch, s=scheme, w=weight: quant_norm_linear(
                         t(b, d), t(d), eps, *w(n, d), s)),
                    ("quant_norm_linear", f"{preset} {part} {scheme} gate_up+swiglu B{batch} D{d}->F{ffn}",
                     lambda d=d, ffn=ffn, eps=eps, b=batch, s=scheme, w=weight: quant_norm_linear(
                         t(b, d), t(d), eps, *w(2 * ffn, d), s, swiglu=True)),
                    ("quant_linear_add", f"{preset} {part} {scheme} down B{batch} F{ffn}->D{d}",
                     lambda d=d, ffn=ffn, b=batch, s=scheme, w=weight: quant_linear_add(
                         t(b, ffn), *w(d, ffn), s, t(b, d))),
                ]
    return cases
