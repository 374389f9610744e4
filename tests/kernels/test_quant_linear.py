"""The quantised GEMV kernels against their references (fp32, interpreter, odd shapes): rmsnorm +
dequantise + linear (+ SwiGLU), and the residual-adding projection, for int8, fp8 and int4."""
import pytest
import torch

from misotts.kernels import reference as ref
from misotts.kernels.quant_linear import quant_linear_add, quant_norm_linear
from misotts.weights.quantize import quantize_tensor

# The kernel dequantises each tile exactly as dequantize_ref does (fp32 product, then the
# activations' dtype) and accumulates in fp32 in another order than MKL: sums of K <= 192 terms of
# size ~1 then differ by ~sqrt(K) * 2^-24 * sum|terms| ~ 1e-5 (measured up to 1.3e-5).
TOL = dict(rtol=1e-5, atol=3e-5)
SCHEMES = [("int8", 0), ("fp8", 0), ("int4", 6), ("int4", 32)]


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def weight(m, k, scheme, group, seed=3):
    return quantize_tensor(randn(m, k, seed=seed), scheme, group)


@pytest.mark.parametrize("scheme, group", SCHEMES)
@pytest.mark.parametrize("rows, dim, cols", [(1, 96, 37), (3, 192, 70), (17, 96, 300)])
def test_quant_norm_linear(scheme, group, rows, dim, cols):
    x, g = randn(rows, dim, seed=1), randn(dim, seed=2) + 1
    codes, scale = weight(cols, dim, scheme, group)
    out = torch.full((rows, cols), float("nan"))
    quant_norm_linear(x, g, 1e-5, codes, scale, scheme, out=out)
    want = ref.quant_linear_ref(ref.rmsnorm_ref(x, g, 1e-5)[0], codes, scale, scheme)
    torch.testing.assert_close(out, want, **TOL)


@pytest.mark.parametrize("scheme, group", SCHEMES)
def test_quant_norm_swiglu_on_strided_rows(scheme, group):
    rows, dim, ffn = 5, 96, 45
    x = randn(rows, 2 * dim, seed=4)[:, :dim]  # rows strided
    g = randn(dim, seed=5) + 1
    codes, scale = weight(2 * ffn, dim, scheme, group)
    out = quant_norm_linear(x, g, 1e-6, codes, scale, scheme, swiglu=True)
    gate_up = ref.quant_linear_ref(ref.rmsnorm_ref(x, g, 1e-6)[0], codes, scale, scheme)
    torch.testing.assert_close(out, ref.swiglu_ref(gate_up), **TOL)


@pytest.mark.parametrize("scheme, group", SCHEMES)
@pytest.mark.parametrize("rows", [1, 7])
def test_quant_linear_add_in_place(scheme, group, rows):
    dim_in, dim_out = 192, 67
    a, residual = randn(rows, dim_in, seed=6), randn(rows, dim_out, seed=7)
    codes, scale = weight(dim_out, dim_in, scheme, group)
    want = (ref.quant_linear_ref(a, codes, scale, scheme) + residual)
    got = quant_linear_add(a, codes, scale, scheme, residual)
    assert got is residual
    torch.testing.assert_close(residual, want, **TOL)


def test_bad_arguments_are_refused():
    x, g = randn(2, 64), randn(64)
    codes, scale = weight(8, 64, "int8", 0)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quant_norm_linear(x, g, 1e-5, codes, scale, "int2")
    with pytest.raises(ValueError, match=r"codes must have dtype in \['torch.uint8'\]"):
        quant_norm_linear(x, g, 1e-5, codes[:, :32], scale, "int4")
    with pytest.raises(ValueError, match=r"codes must have shape \[\*, 64\]"):
        quant_norm_linear(x, g, 1e-5, codes[:, :32], scale, "int8")
    with pytest.raises(ValueError, match=r"scale must have shape \[8\]"):
        quant_norm_linear(x, g, 1e-5, codes, scale[:4], "int8")
    codes4, scale4 = weight(8, 64, "int4", 32)
    with pytest.raises(ValueError, match="groups of an even size"):
        quant_norm_linear(x, g, 1e-5, codes4, torch.ones(8, 3), "int4")
    with pytest.raises(ValueError, match="even number of rows"):
        quant_norm_linear(x, g, 1e-5, codes[:7], scale[:7], "int8", swiglu=True)
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 8\]"):
        quant_linear_add(x, codes, scale, "int8", torch.zeros(2, 9))


# ---- CUDA: the compiled kernels in the activations' dtypes, at a preset's widths ----------------
# Against the reference's fp32 math on the same rounded inputs and the same codes, with the GEMV
# tolerances of kernels/specs.py (the normed row rounded to the dtype before the product, K-long fp32
# sums of O(1) terms with weights scaled K^-0.5, the output rounded once).
from misotts.kernels.specs import GEMV  # noqa: E402

CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("scheme, group", [("int8", 0), ("fp8", 0), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_quant_kernels_on_cuda(dtype, scheme, group, rows):
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs sm_89+")
    dim, cols, dev = 1024, 3072, "cuda"  # the depth decoder's width and a qkv-sized output
    x, g = randn(rows, dim, seed=1).to(dev, dtype), (randn(dim, seed=2) * 0.1 + 1).to(dev, dtype)
    codes, scale = weight(cols, dim, scheme, group)
    codes, scale = codes.to(dev), (scale * dim ** -0.5).to(dev)
    atol, rtol = GEMV[dtype]
    normed = ref.rmsnorm_ref(x.float(), g.float(), 1e-5)[0].to(dtype).float()
    want = ref.quant_linear_ref(normed, codes, scale, scheme)
    got = quant_norm_linear(x, g, 1e-5, codes, scale, scheme)
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)

    a, residual = randn(rows, cols, seed=6).to(dev, dtype), randn(rows, dim, seed=7).to(dev, dtype)
    down_codes, down_scale = weight(dim, cols, scheme, group, seed=8)
    down_codes, down_scale = down_codes.to(dev), (down_scale * cols ** -0.5).to(dev)
    want = ref.quant_linear_ref(a.float(), down_codes, down_scale, scheme) + residual.float()
    quant_linear_add(a, down_codes, down_scale, scheme, residual)
    torch.testing.assert_close(residual.float(), want, atol=atol, rtol=rtol)
