"""Fused RVQ frame embedding: one launch for the masked sum of 32 audio rows and a text row."""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, INT_DTYPES, check, check_same_device, launch, next_pow2


@triton.jit
def _rvq_embed_kernel(frames, mask, text_table, audio_table, out, audio_vocab, dim,
                      NUM_CODEBOOKS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (batch, position) row per program
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_dim = cols < dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(NUM_CODEBOOKS):
        code = tl.load(frames + row * (NUM_CODEBOOKS + 1) + k).to(tl.int64)
        # masked-out column: an empty column range, so its (possibly garbage) code is never dereferenced
        width = tl.where(tl.load(mask + row * (NUM_CODEBOOKS + 1) + k) != 0, dim, 0)
        table_row = code + k * audio_vocab
        acc += tl.load(audio_table + table_row * dim + cols, mask=cols < width, other=0.0).to(tl.float32)
    token = tl.load(frames + row * (NUM_CODEBOOKS + 1) + NUM_CODEBOOKS).to(tl.int64)
    width = tl.where(tl.load(mask + row * (NUM_CODEBOOKS + 1) + NUM_CODEBOOKS) != 0, dim, 0)
    acc += tl.load(text_table + token * dim + cols, mask=cols < width, other=0.0).to(tl.float32)
    tl.store(out + row * dim + cols, acc.to(out.dtype.element_ty), mask=in_dim)


def rvq_embed(frames, mask, text_table, audio_table, out=None):
    """Embed backbone frames.

    frames: int32/int64 [B, S, K+1] (K audio codebooks then one text token), contiguous
    mask:   bool [B, S, K+1], contiguous; unmasked entries are never read (may hold garbage)
    text_table: [V_text, D]; audio_table: [K*V_audio, D] (codebook k's code c is row c + k*V_audio)
    out:    optional [B, S, D] in the table dtype. Returns out.
    The sum is accumulated in fp32 and rounded once to the table dtype. Codes are not range checked.
    """
    check("frames", frames, shape=(None, None, None), dtypes=INT_DTYPES, contiguous=True)
    check("mask", mask, shape=tuple(frames.shape), dtypes=(torch.bool,), contiguous=True)
    check("text_table", text_table, shape=(None, None), dtypes=FLOAT_DTYPES, contiguous=True)
    dim = text_table.shape[1]
    check("audio_table", audio_table, shape=(None, dim), dtypes=(text_table.dtype,), contiguous=True)
    num_codebooks = frames.shape[-1] - 1
    if num_codebooks < 1 or audio_table.shape[0] % num_codebooks:
        raise ValueError(f"audio_table rows ({audio_table.shape[0]}) must be a multiple of the "
                         f"{num_codebooks} audio columns of frames")
    batch, seq = frames.shape[:2]
    if out is None:
        out = torch.empty(batch, seq, dim, dtype=text_table.dtype, device=text_table.device)
    check("out", out, shape=(batch, seq, dim), dtypes=(text_table.dtype,), contiguous=True)
    check_same_device(frames=frames, mask=mask, text_table=text_table, audio_table=audio_table, out=out)
    block_d = min(next_pow2(dim), 1024)
    grid = (batch * seq, triton.cdiv(dim, block_d))
    launch(_rvq_embed_kernel, grid, frames, mask.view(torch.uint8), text_table, audio_table, out,
           audio_table.shape[0] // num_codebooks, dim, NUM_CODEBOOKS=num_codebooks, BLOCK_D=block_d,
           num_warps=4)
    return out
