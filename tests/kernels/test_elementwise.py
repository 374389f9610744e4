"""RVQ embedding, RMSNorm(+residual) and SwiGLU against their torch references (fp32, interpreter)."""
import pytest
import torch

from misotts.kernels import reference as ref
from misotts.kernels.embedding import rvq_embed
from misotts.kernels.rmsnorm import rmsnorm
from misotts.kernels.swiglu import swiglu

NUM_CODEBOOKS, AUDIO_VOCAB = 32, 2051


def test_rvq_embed_reference_is_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 50, (2, 3, NUM_CODEBOOKS + 1), generator=g)
    mask = torch.rand(2, 3, NUM_CODEBOOKS + 1, generator=g) > 0.4
    text, audio = torch.randn(50, 8, generator=g), torch.randn(NUM_CODEBOOKS * 50, 8, generator=g)
    want = torch.zeros(2, 3, 8)
    for b in range(2):
        for s in range(3):
            for k in range(NUM_CODEBOOKS + 1):
                if mask[b, s, k]:
                    code = int(frames[b, s, k])
                    want[b, s] += text[code] if k == NUM_CODEBOOKS else audio[code + k * 50]
    torch.testing.assert_close(ref.rvq_embed_ref(frames, mask, text, audio), want)


@pytest.mark.parametrize("dim,frame_dtype", [(72, torch.int64), (1100, torch.int32)])
def test_rvq_embed(dim, frame_dtype):
    g = torch.Generator().manual_seed(dim)
    batch, seq = 2, 5
    frames = torch.randint(0, AUDIO_VOCAB, (batch, seq, NUM_CODEBOOKS + 1), generator=g)
    frames[..., -1] = torch.randint(0, 300, (batch, seq), generator=g)
    mask = torch.rand(batch, seq, NUM_CODEBOOKS + 1, generator=g) > 0.3
    mask[0, 0] = False  # an all-masked row embeds to zeros
    mask[0, 1, :NUM_CODEBOOKS] = False  # text only
    frames = torch.where(mask, frames, torch.full_like(frames, -7))  # garbage where masked: never read
    frames = frames.to(frame_dtype)
    text, audio = torch.randn(300, dim, generator=g), torch.randn(NUM_CODEBOOKS * AUDIO_VOCAB, dim, generator=g)
    out = torch.full((batch, seq, dim), float("nan"))
    rvq_embed(frames, mask, text, audio, out=out)
    torch.testing.assert_close(out, ref.rvq_embed_ref(frames, mask, text, audio), rtol=1e-5, atol=1e-5)
    assert out[0, 0].eq(0).all()


def test_rmsnorm_reference_matches_hf_formula():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 33, generator=g, dtype=torch.float64), torch.randn(33, generator=g, dtype=torch.float64)
    want = w * x / torch.sqrt((x * x).sum(-1, keepdim=True) / 33 + 1e-6)
    torch.testing.assert_close(ref.rmsnorm_ref(x.float(), w.float(), 1e-6)[0].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [96, 1000])
def test_rmsnorm_with_residual(dim):
    g = torch.Generator().manual_seed(dim)
    rows = 5
    x = torch.randn(rows, dim + 8, generator=g)[:, :dim]  # strided rows
    residual = torch.randn(rows, dim, generator=g)
    weight = torch.randn(dim, generator=g)
    want_out, want_res = ref.rmsnorm_ref(x, weight, 1e-5, residual.clone())
    out = torch.full((rows, dim), float("nan"))
    got_out, got_res = rmsnorm(x, weight, 1e-5, residual=residual, out=out)
    assert got_out is out and got_res is residual  # residual updated in place
    torch.testing.assert_close(residual, want_res, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)


def test_rmsnorm_without_residual():
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(3, 300, generator=g), torch.randn(300, generator=g)
    out, res = rmsnorm(x, weight, 1e-6)
    assert res is None
    torch.testing.assert_close(out, ref.rmsnorm_ref(x, weight, 1e-6)[0], rtol=1e-5, atol=1e-5)


def test_swiglu_reference_matches_formula():
    g = torch.Generator().manual_seed(4)
    gate, up = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    torch.testing.assert_close(ref.swiglu_ref(torch.cat([gate, up], -1)), gate / (1 + torch.exp(-gate)) * up)


@pytest.mark.parametrize("shape", [(7, 2 * 300), (2, 3, 2 * 1500)])
def test_swiglu(shape):
    g = torch.Generator().manual_seed(shape[-1])
    gate_up = torch.randn(*shape, generator=g) * 3
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"))
    swiglu(gate_up, out=out)
    torch.testing.assert_close(out, ref.swiglu_ref(gate_up), rtol=1e-5, atol=1e-6)


def test_swiglu_strided_rows():
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(6, 2 * 40 + 16, generator=g)[:, :80]  # e.g. a slice of a wider buffer
    torch.testing.assert_close(swiglu(fused), ref.swiglu_ref(fused), rtol=1e-5, atol=1e-6)
