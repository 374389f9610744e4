"""The depth loop's fused kernels against their torch references (fp32, interpreter, odd shapes);
the references against plain float64 math."""
import pytest
import torch

from misotts.kernels import reference as ref
from misotts.kernels.depth_attention import depth_attention
from misotts.kernels.norm_linear import norm_linear
from misotts.kernels.sampling import sample_next_input

TOL = dict(rtol=1e-5, atol=1e-5)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- references -------------------------------------------------------------------------------------
def test_norm_references_are_the_formulas():
    x, g, w = randn(3, 20, seed=1).double(), randn(20, seed=2).double(), randn(14, 20, seed=3).double()
    normed = g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(ref.rmsnorm_linear_ref(x.float(), g.float(), 1e-5, w.float()).double(),
                               normed @ w.T, **TOL)
    gate, up = (normed @ w.T).chunk(2, -1)
    torch.testing.assert_close(ref.rmsnorm_swiglu_ref(x.float(), g.float(), 1e-5, w.float()).double(),
                               gate / (1 + torch.exp(-gate)) * up, **TOL)
    a, r = randn(3, 20, seed=4), randn(3, 14, seed=5)
    torch.testing.assert_close(ref.linear_residual_ref(a, w.float(), r).double(), r.double() + a.double() @ w.T, **TOL)


def test_depth_attention_reference_is_a_loop():
    lanes, heads, kv_heads, d, positions, pos = 2, 4, 2, 6, 5, 3
    qkv = randn(lanes, (heads + 2 * kv_heads) * d, seed=6)
    k_cache, v_cache = randn(lanes, kv_heads, positions, d, seed=7), randn(lanes, kv_heads, positions, d, seed=8)
    k0, v0 = k_cache.clone().double(), v_cache.clone().double()
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * (1000.0 ** -(torch.arange(d // 2) / (d // 2)))
    out = ref.depth_attention_ref(qkv, heads, kv_heads, k_cache, v_cache, torch.tensor([pos]),
                                  angle.cos().float(), angle.sin().float())

    def rotate(x):  # complex rotation of pairs (i, i + d/2) by the angles at pos
        z = torch.complex(x[:d // 2], x[d // 2:]) * torch.polar(torch.ones(d // 2, dtype=torch.float64), angle[pos])
        return torch.cat([z.real, z.imag])

    x = qkv.double().view(lanes, -1, d)
    for b in range(lanes):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            keys, values = k0[b, kv, :pos + 1].clone(), v0[b, kv, :pos + 1].clone()
            keys[pos], values[pos] = rotate(x[b, heads + kv]), x[b, heads + kv_heads + kv]
            p = torch.softmax(keys @ rotate(x[b, h]) / d ** 0.5, 0)
            torch.testing.assert_close(out[b, h].double(), p @ values, **TOL)
            torch.testing.assert_close(k_cache[b, kv, pos].double(), keys[pos], **TOL)
            torch.testing.assert_close(v_cache[b, kv, pos].double(), values[pos], **TOL)
    assert torch.equal(k_cache[:, :, pos + 1:], k0[:, :, pos + 1:].float())  # nothing else written


# ---- kernels -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,dim,cols", [(1, 100, 70), (3, 257, 33), (19, 64, 300)])
def test_norm_linear(rows, dim, cols):
    x = randn(rows, dim + 5, seed=rows)[:, :dim]  # strided rows
    g, w = randn(dim, seed=1), randn(cols, dim, seed=2, scale=0.1)
    out = torch.full((rows, cols), float("nan"))
    norm_linear(x, g, 1e-5, w, out=out)
    torch.testing.assert_close(out, ref.rmsnorm_linear_ref(x, g, 1e-5, w), **TOL)
    head = randn(dim, cols, seed=3, scale=0.1)  # a [K, V] head passed transposed (column-major weight)
    torch.testing.assert_close(norm_linear(x, g, 1e-5, head.T), ref.rmsnorm_linear_ref(x, g, 1e-5, head.T), **TOL)


@pytest.mark.parametrize("rows,dim,ffn", [(1, 72, 37), (5, 130, 64)])
def test_norm_swiglu(rows, dim, ffn):
    x, g, w = randn(rows, dim, seed=4), randn(dim, seed=5), randn(2 * ffn, dim, seed=6, scale=0.2)
    out = torch.full((rows, ffn), float("nan"))
    norm_linear(x, g, 1e-6, w, swiglu=True, out=out)
    torch.testing.assert_close(out, ref.rmsnorm_swiglu_ref(x, g, 1e-6, w), **TOL)


@pytest.mark.parametrize("lanes,heads,kv_heads,d,positions,dim", [(3, 4, 2, 12, 7, 20), (2, 8, 2, 16, 32, 40),
                                                                  (1, 3, 1, 8, 33, 17)])
def test_depth_attention_over_a_frame(lanes, heads, kv_heads, d, positions, dim):
    """Every position of a frame in turn, as the depth loop runs them; the caches start with
    large garbage, which positions after pos must never reach."""
    angle = torch.arange(positions, dtype=torch.float32)[:, None] * (500.0 ** -(torch.arange(d // 2) / (d // 2)))
    cos, sin = angle.cos(), angle.sin()
    garbage = randn(lanes, kv_heads, positions, d, seed=9, scale=100)
    k_cache, v_cache = garbage.clone(), garbage.clone()
    want_k, want_v = garbage.clone(), garbage.clone()
    wo = randn(heads * d, dim, seed=12, scale=0.2).T  # a column-major weight [D, H d]
    for pos in range(positions):
        qkv = randn(lanes, (heads + 2 * kv_heads) * d + 3, seed=pos)[:, 3:]  # strided rows
        residual = randn(lanes, dim, seed=100 + pos)
        p = torch.tensor([pos])
        want = ref.depth_attention_out_ref(qkv, heads, kv_heads, want_k, want_v, p, cos, sin, wo, residual)
        got = depth_attention(qkv, heads, kv_heads, k_cache, v_cache, p, cos, sin, wo, residual)
        assert got is residual
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(k_cache, want_k, **TOL)
        torch.testing.assert_close(v_cache, want_v, **TOL)


def test_sample_next_input_draws_and_gathers():
    lanes, vocab, codebooks, dim = 6, 300, 4, 10
    logits = randn(lanes, vocab, seed=10, scale=3)
    logits[1, [7, 200]] = 50.0  # a greedy tie: lowest index
    table = randn(codebooks * vocab, dim, seed=11)
    temperature = torch.tensor([0.9, 0.0, 1.3, 0.7, 0.5, 2.0])
    topk = torch.tensor([50, 50, 1, 300, 10, 3])
    seed, counter = torch.arange(lanes) * 1000 + 5, torch.arange(lanes) * 32
    for c in (0, 3):
        codes = torch.full((lanes, codebooks), -1)
        nxt = torch.full((lanes, dim), float("nan"))
        sample_next_input(logits, temperature, topk, seed, counter, torch.tensor([c]), table, codes[:, c], nxt)
        want = ref.sample_topk_ref(logits, temperature, topk, seed, counter + c)
        assert (codes[:, c] != want).sum() <= 1 and codes[1, c] == 7  # near-ties: see test_sampling.py
        assert torch.equal(nxt, table[codes[:, c] + c * vocab])
        assert (codes[:, [i for i in range(codebooks) if i != c]] == -1).all()


def test_launcher_errors():
    x, g, w = torch.randn(2, 8), torch.randn(8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        norm_linear(x, g, 1e-5, torch.randn(6, 9))
    with pytest.raises(ValueError, match="weight must have dtype"):
        norm_linear(x, g, 1e-5, w.double())
    with pytest.raises(ValueError, match="even number of rows"):
        norm_linear(x, g, 1e-5, torch.randn(5, 8), swiglu=True)
    with pytest.raises(ValueError, match="eps"):
        norm_linear(x, g, 0.0, w)
    qkv, cache, cs, wo, res = torch.randn(2, 32), torch.randn(2, 1, 5, 8), torch.randn(5, 4), torch.randn(6, 16), \
        torch.randn(2, 6)
    zero = torch.tensor([0])
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        depth_attention(qkv, 3, 2, cache, cache, zero, cs, cs, wo, res)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        depth_attention(qkv, 2, 1, torch.randn(2, 2, 5, 8), cache, zero, cs, cs, wo, res)
    with pytest.raises(ValueError, match="pos must have dtype"):
        depth_attention(qkv, 2, 1, cache, cache, torch.tensor([0.0]), cs, cs, wo, res)
    with pytest.raises(ValueError, match="cos must have shape"):
        depth_attention(qkv, 2, 1, cache, cache, zero, torch.randn(4, 4), cs, wo, res)
    with pytest.raises(ValueError, match="wo must have shape"):
        depth_attention(qkv, 2, 1, cache, cache, zero, cs, cs, torch.randn(6, 12), res)
    with pytest.raises(ValueError, match="residual must have shape"):
        depth_attention(qkv, 2, 1, cache, cache, zero, cs, cs, wo, torch.randn(2, 7))
    with pytest.raises(ValueError, match="per-lane"):
        sample_next_input(torch.randn(2, 10), 0.9, 5, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                          torch.tensor([0]), torch.randn(20, 4), torch.zeros(2, dtype=torch.long), torch.randn(2, 4))


# ---- CUDA (run by the GPU suite: compiled kernels, bf16/fp16 as the engine runs them) ---------------------
# dtype -> tolerance against the reference run in the same dtype on the GPU: the kernels accumulate in
# fp32 and round once where the reference rounds each op's output (and cuBLAS sums in another order).
CUDA_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOL))
@pytest.mark.parametrize("rows,dim,cols", [(1, 1024, 1536), (8, 4096, 2051), (3, 1000, 70)])
def test_norm_linear_cuda(dtype, rows, dim, cols):
    x, g = randn(rows, dim, seed=1).cuda().to(dtype), (1 + 0.1 * randn(dim, seed=2)).cuda().to(dtype)
    w = randn(cols, dim, seed=3, scale=dim ** -0.5).cuda().to(dtype)
    torch.testing.assert_close(norm_linear(x, g, 1e-5, w), ref.rmsnorm_linear_ref(x, g, 1e-5, w), **CUDA_TOL[dtype])
    up = randn(2 * cols, dim, seed=4, scale=dim ** -0.5).cuda().to(dtype)
    torch.testing.assert_close(norm_linear(x, g, 1e-5, up, swiglu=True), ref.rmsnorm_swiglu_ref(x, g, 1e-5, up),
                               **CUDA_TOL[dtype])


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOL))
def test_depth_attention_cuda(dtype):
    lanes, heads, kv_heads, d, positions, dim = 8, 8, 2, 128, 32, 1024
    angle = torch.arange(positions, dtype=torch.float32)[:, None] * (500.0 ** -(torch.arange(d // 2) / (d // 2)))
    cos, sin = angle.cos().cuda(), angle.sin().cuda()
    k_cache = randn(lanes, kv_heads, positions, d, seed=9).cuda().to(dtype)
    v_cache, want_k, want_v = k_cache.clone(), k_cache.clone(), k_cache.clone()
    wo = randn(dim, heads * d, seed=12, scale=(heads * d) ** -0.5).cuda().to(dtype)
    for pos in (0, 1, 17, 31):
        qkv = randn(lanes, (heads + 2 * kv_heads) * d, seed=pos).cuda().to(dtype)
        residual = randn(lanes, dim, seed=100 + pos).cuda().to(dtype)
        p = torch.tensor([pos], device="cuda")
        want = ref.depth_attention_out_ref(qkv, heads, kv_heads, want_k, want_v, p, cos, sin, wo, residual.clone())
        got = depth_attention(qkv, heads, kv_heads, k_cache, v_cache, p, cos, sin, wo, residual)
        torch.testing.assert_close(got, want, **CUDA_TOL[dtype])
        torch.testing.assert_close(k_cache, want_k, **CUDA_TOL[dtype])
        torch.testing.assert_close(v_cache, want_v, **CUDA_TOL[dtype])


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_next_input_cuda(dtype):
    lanes, vocab, dim = 8, 2051, 1024
    logits = randn(lanes, vocab, seed=10, scale=3).cuda().to(dtype)
    table = randn(32 * vocab, dim, seed=11).cuda().to(dtype)
    temperature = torch.tensor([0.9, 0.0, 1.3, 0.7, 0.5, 2.0, 0.9, 0.9], device="cuda")
    topk = torch.tensor([50, 50, 1, 2051, 10, 3, 50, 50], device="cuda")
    seed, counter = torch.arange(lanes, device="cuda") * 1000 + 5, torch.arange(lanes, device="cuda") * 32
    codes, nxt = torch.zeros(lanes, 32, dtype=torch.long, device="cuda"), torch.empty(lanes, dim, dtype=dtype,
                                                                                      device="cuda")
    sample_next_input(logits, temperature, topk, seed, counter, torch.tensor([7], device="cuda"), table, codes[:, 7],
                      nxt)
    want = ref.sample_topk_ref(logits, temperature, topk, seed, counter + 7)
    assert (codes[:, 7] != want).sum() <= 1
    assert torch.equal(nxt, table[codes[:, 7] + 7 * vocab])


def test_depth_attention_never_reads_nan_past_the_position():
    """Positions past pos may hold a past request's NaN (a reused lane): the kernel masks those loads."""
    lanes, heads, kv_heads, d, positions, dim, pos = 2, 4, 2, 8, 6, 20, 3
    angle = torch.arange(positions, dtype=torch.float32)[:, None] * (500.0 ** -(torch.arange(d // 2) / (d // 2)))
    cache = randn(lanes, kv_heads, positions, d, seed=21)
    cache[:, :, pos + 1:] = float("nan")
    qkv, wo = randn(lanes, (heads + 2 * kv_heads) * d, seed=22), randn(dim, heads * d, seed=23, scale=0.2)
    residual = randn(lanes, dim, seed=24)
    p = torch.tensor([pos])
    clean = cache.nan_to_num(0.0)
    want = ref.depth_attention_out_ref(qkv, heads, kv_heads, clean.clone(), clean.clone(), p, angle.cos(),
                                       angle.sin(), wo, residual)
    got = depth_attention(qkv, heads, kv_heads, cache.clone(), cache.clone(), p, angle.cos(), angle.sin(), wo,
                          residual.clone())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL)
