"""Every kernel against its reference at the real models' shapes, in fp32, bf16 and fp16 (CUDA only).

The interpreter cannot check half precision (its tl.dot multiplies bf16 bit patterns as integers),
so these run on the GPU suite.  Each case feeds the kernel and the reference the same inputs (already
rounded to the dtype) and compares the kernel's output with the reference's math done in fp32:

| kernel                       | fp32          | bf16          | fp16          | why                        |
|------------------------------|---------------|---------------|---------------|----------------------------|
| rvq_embed, rmsnorm, swiglu,  | 1e-5 / 1e-5   | 1e-2 / 1e-2   | 2e-3 / 2e-3   | one rounding of the output |
| rope_kv_write                |               |               |               | (bf16: 2^-8 relative)      |
| paged_decode, paged_prefill  | 1e-4 / 1e-4   | 2e-2 / 2e-2   | 4e-3 / 4e-3   | + probabilities rounded to |
|                              |               |               |               | the dtype before P @ V     |
| depth_step logits (fp32 out) | 1e-4 / 1e-4   | 1e-2 / 1e-2   | 2e-3 / 2e-3   | dtype inputs, fp32 sums    |

(atol / rtol.)  Sampling is compared exactly: the kernel's tokens are the reference sampler's on the
same fp32 logits (one RNG, bit-exact across torch and Triton).
"""
import pytest
import torch

from misotts.kernels import reference as ref
from misotts.runtime.config import PRESETS
from misotts.runtime.model import rope_inv_freq

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ELEMENTWISE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
ATTENTION = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
GEMV = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
PAGE = 16
CONTEXTS = [1, 15, 16, 17, 255, 256, 257, 1000, 2047, 2048]  # > 256: split over partitions, then merged
PARTS = [(p, part) for p in ("csm-1b", "miso-8b") for part in ("backbone", "decoder")]


def close(got, want, tolerances, dtype):
    atol, rtol = tolerances[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def randn(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def paged_cache(lengths, hkv, d, dtype, g):
    """Caches with each sequence's blocks scattered over the pool, and the block table."""
    needed = [-(-n // PAGE) for n in lengths]
    num_blocks = 2 * sum(needed) + 3
    ids = torch.randperm(num_blocks, generator=g, device="cuda")[:sum(needed)].int()
    table = torch.zeros(len(lengths), max(needed), dtype=torch.int32, device="cuda")
    start = 0
    for s, n in enumerate(needed):
        table[s, :n] = ids[start:start + n]
        start += n
    k, v = (randn(num_blocks, PAGE, hkv, d, dtype=dtype, g=g) for _ in range(2))
    return k, v, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset,part", PARTS)
def test_paged_decode_at_real_shapes(preset, part, dtype):
    from misotts.kernels.paged_attention import paged_decode

    c = getattr(PRESETS[preset], part)
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v, table = paged_cache(CONTEXTS, c.n_kv_heads, c.head_dim, dtype, g)
    q = randn(len(CONTEXTS), c.n_heads, c.head_dim, dtype=dtype, g=g)
    lens = torch.tensor(CONTEXTS, dtype=torch.int32, device="cuda")
    scale = c.head_dim ** -0.5
    got = paged_decode(q, k, v, table, lens, scale)
    close(got, ref.paged_decode_ref(q.float(), k.float(), v.float(), table, lens, scale), ATTENTION, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset,part", PARTS[::2])  # the backbone prefills
def test_paged_prefill_with_cached_prefix_at_real_shapes(preset, part, dtype):
    from misotts.kernels.paged_attention import paged_prefill

    c = getattr(PRESETS[preset], part)
    g = torch.Generator(device="cuda").manual_seed(1)
    chunks, prefixes = [1, 16, 37, 512], [0, 100, 1000, 1536]  # positions already cached before each chunk
    lengths = [p + n for p, n in zip(prefixes, chunks)]
    k, v, table = paged_cache(lengths, c.n_kv_heads, c.head_dim, dtype, g)
    cu = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = randn(sum(chunks), c.n_heads, c.head_dim, dtype=dtype, g=g)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    scale = c.head_dim ** -0.5
    got = paged_prefill(q, cu, max(chunks), k, v, table, lens, scale)
    close(got, ref.paged_prefill_ref(q.float(), cu, k.float(), v.float(), table, lens, scale), ATTENTION, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset,part", PARTS)
def test_rope_kv_write_at_real_shapes(preset, part, dtype):
    from misotts.kernels.rope import rope_kv_write

    c = getattr(PRESETS[preset], part)
    g = torch.Generator(device="cuda").manual_seed(2)
    t = 64
    q = randn(t, c.n_heads, c.head_dim, dtype=dtype, g=g)
    k, v = (randn(t, c.n_kv_heads, c.head_dim, dtype=dtype, g=g) for _ in range(2))
    positions = torch.randint(0, 2048, (t,), generator=g, device="cuda")
    slots = torch.randperm(40 * PAGE, generator=g, device="cuda")[:t]
    inv_freq = rope_inv_freq(c, "cuda")
    caches = [torch.zeros(40, PAGE, c.n_kv_heads, c.head_dim, dtype=dtype, device="cuda") for _ in range(4)]
    want = [x.float() for x in caches[2:]]
    want_q = ref.rope_kv_write_ref(q.float(), k.float(), v.float(), positions, inv_freq, *want, slots)
    got_q = rope_kv_write(q, k, v, positions, inv_freq, caches[0], caches[1], slots)  # rotates q in place
    close(got_q, want_q, ELEMENTWISE, dtype)
    close(caches[0], want[0], ELEMENTWISE, dtype)
    close(caches[1], want[1], ELEMENTWISE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset,part", PARTS)
def test_rmsnorm_and_swiglu_at_real_shapes(preset, part, dtype):
    from misotts.kernels.rmsnorm import rmsnorm
    from misotts.kernels.swiglu import swiglu

    c = getattr(PRESETS[preset], part)
    g = torch.Generator(device="cuda").manual_seed(3)
    x, residual = randn(64, c.dim, dtype=dtype, g=g), randn(64, c.dim, dtype=dtype, g=g)
    weight = randn(c.dim, dtype=dtype, g=g)
    want_out, want_h = ref.rmsnorm_ref(x.float(), weight.float(), c.norm_eps, residual.float())
    got_out, got_h = rmsnorm(x, weight, c.norm_eps, residual.clone())
    close(got_out, want_out, ELEMENTWISE, dtype)
    close(got_h, want_h, ELEMENTWISE, dtype)
    gate_up = randn(64, 2 * c.ffn_dim, dtype=dtype, g=g)
    close(swiglu(gate_up), ref.swiglu_ref(gate_up.float()), ELEMENTWISE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["csm-1b", "miso-8b"])
def test_rvq_embed_at_real_shapes(preset, dtype):
    from misotts.kernels.embedding import rvq_embed

    cfg = PRESETS[preset]
    g = torch.Generator(device="cuda").manual_seed(4)
    n, vocab, dim = cfg.num_codebooks, cfg.audio_vocab_size, cfg.backbone.dim
    text, audio = randn(cfg.text_vocab_size, dim, dtype=dtype, g=g), randn(n * vocab, dim, dtype=dtype, g=g)
    frames = torch.randint(0, vocab, (2, 48, n + 1), generator=g, device="cuda")
    frames[..., -1] = torch.randint(0, cfg.text_vocab_size, (2, 48), generator=g, device="cuda")
    mask = torch.rand(2, 48, n + 1, generator=g, device="cuda") < 0.7
    close(rvq_embed(frames, mask, text, audio), ref.rvq_embed_ref(frames, mask, text.float(), audio.float()),
          ELEMENTWISE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["csm-1b", "miso-8b"])
def test_depth_step_and_sampler_at_real_shapes(preset, dtype):
    """Logits within the GEMV tolerance; tokens and next inputs exactly the reference sampler's on the
    kernel's own logits, per lane (greedy, top-1, top-50, whole-vocabulary lanes)."""
    from misotts.kernels.sampling import depth_step, sample_topk

    cfg = PRESETS[preset]
    g = torch.Generator(device="cuda").manual_seed(5)
    b, n, vocab, dec = 8, cfg.num_codebooks, cfg.audio_vocab_size, cfg.decoder.dim
    h, head = randn(b, dec, dtype=dtype, g=g), randn(dec, vocab, dtype=dtype, g=g, scale=dec ** -0.5)
    table = randn(n * vocab, dec, dtype=dtype, g=g)
    seed, counter = torch.arange(b, device="cuda") * 7 + 1, torch.arange(b, device="cuda") * 32
    temperature = torch.tensor([0.0, 0.9, 0.9, 1.3, 0.5, 0.9, 2.0, 0.7], device="cuda")
    topk = torch.tensor([50, 1, 50, 50, 5, vocab, 100, 2051], device="cuda")
    codes = torch.zeros(b, n, dtype=torch.long, device="cuda")
    next_input = torch.empty(b, dec, dtype=dtype, device="cuda")
    logits = torch.empty(b, vocab, device="cuda")
    depth_step(h, head, 3, table, codes, next_input, seed, counter, temperature, topk, logits=logits)
    close(logits, h.float() @ head.float(), GEMV, dtype)
    want = ref.sample_topk_ref(logits, temperature, topk, seed, counter)
    assert torch.equal(codes[:, 3], want)
    assert torch.equal(next_input, table[want + 3 * vocab])
    assert torch.equal(sample_topk(logits, temperature, topk, seed, counter), want)
