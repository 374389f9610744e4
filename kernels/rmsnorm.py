"""RMSNorm, optionally fused with the residual add that precedes it."""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check, check_same_device, launch, next_pow2


@triton.jit
def _rmsnorm_kernel(x, residual, weight, out, dim, eps, stride_x, stride_res, stride_out,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    keep = cols < dim
    h = tl.load(x + row * stride_x + cols, mask=keep, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(residual + row * stride_res + cols, mask=keep, other=0.0).to(tl.float32))
        h = h.to(residual.dtype.element_ty)  # round like the unfused model does, then norm that value
        tl.store(residual + row * stride_res + cols, h, mask=keep)
    h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / dim + eps)
    w = tl.load(weight + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(out + row * stride_out + cols, (h * rstd * w).to(out.dtype.element_ty), mask=keep)


def rmsnorm(x, weight, eps, residual=None, out=None):
    """out = weight * h / sqrt(mean(h^2) + eps), fp32 math.

    x: [N, D] (rows may be strided, last dim contiguous); weight: [D]; eps: float.
    residual: optional [N, D]; if given, h = x + residual (rounded to residual's dtype) is written
              back into residual in place, and the norm is taken of h. Otherwise h = x.
    out: optional [N, D] in x's dtype. Returns (out, residual) (residual is None when not given).
    """
    check("x", x, shape=(None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    rows, dim = x.shape
    check("weight", weight, shape=(dim,), dtypes=FLOAT_DTYPES, contiguous=True)
    if residual is not None:
        check("residual", residual, shape=(rows, dim), dtypes=FLOAT_DTYPES, last_contiguous=True)
    if out is None:
        out = torch.empty_like(x)
    check("out", out, shape=(rows, dim), dtypes=(x.dtype,), last_contiguous=True)
    check_same_device(x=x, weight=weight, residual=residual, out=out)
    res = residual if residual is not None else x
    launch(_rmsnorm_kernel, (rows,), x, res, weight, out, dim, float(eps), x.stride(0), res.stride(0),
           out.stride(0), HAS_RESIDUAL=residual is not None, BLOCK_D=next_pow2(dim),
           num_warps=8 if dim >= 2048 else 4)
    return out, residual
