"""Paged attention over a block-table KV cache: decode (split-KV + log-sum-exp merge) and prefill.

Cache layout: [num_blocks, block_size, num_kv_heads, head_dim], block_size a power of two, last dim
contiguous. A sequence's logical token p lives in block block_tables[seq, p // block_size] at
offset p % block_size. Tiles of BLOCK_N tokens gather their block ids per token, so the tile size
does not depend on the page size. Softmax runs in fp32 in the exp2 domain (scale folded with log2 e).
"""

import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check, check_same_device, launch, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(cache, block_table, pos, valid, kv_head, dims, stride_b, stride_s, stride_h, PAGE: tl.constexpr):
    page = tl.load(block_table + pos // PAGE, mask=valid, other=0).to(tl.int64)  # int64: page * stride > 2^31
    offs = page * stride_b + (pos % PAGE) * stride_s + kv_head * stride_h
    return tl.load(cache + offs[:, None] + dims[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full-precision products (tl.dot's default is tf32 on sm_80+), so the engine's fp32
    # codes match the fp32 reference path; bf16/fp16 ignore it.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _partition(length, max_splits, BLOCK_N: tl.constexpr):
    """Positions per split of a lane: its context spread over all the grid's splits (whole tiles of
    BLOCK_N, at least one), so a short context still keeps every split busy (not one of 8)."""
    return tl.maximum(tl.cdiv(tl.cdiv(length, max_splits), BLOCK_N), 1) * BLOCK_N


@triton.jit
def _decode_kernel(q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, qk_scale,
                   stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   stride_bt, stride_on, stride_oh, max_splits,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr):
    seq, kv_head, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    length = tl.load(context_lens + seq)
    part = _partition(length, max_splits, BLOCK_N)
    start = split * part
    end = tl.minimum(start + part, length)  # empty when this split is past the sequence
    rows = tl.arange(0, GROUP_PAD)  # the query heads sharing this kv head (padded to >= 16 rows for dot)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q_tile = tl.load(q + seq * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                     mask=(rows < GROUP)[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        k = _load_kv_tile(k_cache, table, pos, valid, kv_head, dims, stride_kb, stride_ks, stride_kh, PAGE)
        s = _dot(q_tile, tl.trans(k), IEEE) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has >= 1 valid token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = _load_kv_tile(v_cache, table, pos, valid, kv_head, dims, stride_vb, stride_vs, stride_vh, PAGE)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    out_tile = acc / tl.where(l > 0, l, 1.0)[:, None]  # zeros for an empty (length 0) padding lane
    row_mask = (rows < GROUP)[:, None]
    if DIRECT:
        tl.store(out + seq * stride_on + heads[:, None] * stride_oh + dims[None, :],
                 out_tile.to(out.dtype.element_ty), mask=row_mask)
    else:
        slot = (seq * (GROUP * tl.num_programs(1)) + heads) * max_splits + split  # [seq, head, split]
        tl.store(part_out + slot[:, None] * HEAD_DIM + dims[None, :], out_tile, mask=row_mask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))  # -inf: empty split
        tl.store(part_lse + slot, lse, mask=rows < GROUP)


@triton.jit
def _decode_merge_kernel(part_out, part_lse, context_lens, out, stride_on, stride_oh, max_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_PAD: tl.constexpr):
    seq, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    length = tl.load(context_lens + seq)
    num_splits = tl.cdiv(length, _partition(length, max_splits, BLOCK_N))
    splits = tl.arange(0, SPLITS_PAD)
    used = splits < num_splits
    base = (seq * tl.num_programs(1) + head) * max_splits
    lse = tl.load(part_lse + base + splits, mask=used, other=float("-inf"))
    top = tl.where(num_splits > 0, tl.max(lse, axis=0), 0.0)  # 0 for an empty lane: no -inf - -inf
    weight = tl.where(used, tl.exp2(lse - top), 0.0)
    dims = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out + (base + splits)[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
    total = tl.sum(weight, axis=0)
    merged = tl.sum(tl.where(used[:, None], parts * weight[:, None], 0.0), axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out + seq * stride_on + head * stride_oh + dims, merged.to(out.dtype.element_ty))


def _check_cache(q, k_cache, v_cache, block_tables, num_seqs):
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    check("k_cache", k_cache, shape=(None, None, None, head_dim), dtypes=(q.dtype,), last_contiguous=True)
    check("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=(q.dtype,), last_contiguous=True)
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if page < 16 or page & (page - 1):
        raise ValueError(f"block_size (k_cache.shape[1]) must be a power of two >= 16, got {page}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    check("block_tables", block_tables, shape=(num_seqs, None), dtypes=(torch.int32,), last_contiguous=True)
    return num_kv_heads, page


def decode_workspace(num_seqs, num_q_heads, head_dim, max_blocks, block_size, partition_size=256, device=None):
    """Preallocated split-KV partials for paged_decode (allocate once, e.g. before CUDA graph capture).

    Returns (part_out fp32 [num_seqs, Hq, splits, d], part_lse fp32 [num_seqs, Hq, splits]) with
    splits = ceil(max_blocks * block_size / partition_size).
    """
    splits = triton.cdiv(max_blocks * block_size, partition_size)
    return (torch.empty(num_seqs, num_q_heads, splits, head_dim, dtype=torch.float32, device=device),
            torch.empty(num_seqs, num_q_heads, splits, dtype=torch.float32, device=device))


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale=None, out=None, workspace=None,
                 partition_size=256):
    """Decode attention: one query token per sequence over its paged context.

    q: [num_seqs, Hq, d] (fp32/fp16/bf16, last dim contiguous); k_cache, v_cache: [blocks, block_size, Hkv, d]
    of q's dtype; block_tables: int32 [num_seqs, max_blocks]; context_lens: int32 [num_seqs]
    (<= max_blocks * block_size; 0 gives a zero output row). scale: default d**-0.5.
    The launch grid depends only on shapes (num_seqs, Hkv, ceil(max_blocks*block_size/partition_size)),
    so the call can be captured in a CUDA graph; each lane spreads its context over all those splits
    (whole tiles; a short context uses fewer). With more than one split the partials go to
    `workspace` (see decode_workspace; allocated here when None) and a second kernel merges them.
    out: optional [num_seqs, Hq, d] of q's dtype. Returns out.
    """
    check("q", q, shape=(None, None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, page = _check_cache(q, k_cache, v_cache, block_tables, num_seqs)
    check("context_lens", context_lens, shape=(num_seqs,), dtypes=(torch.int32,), contiguous=True)
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    if out is None:
        out = torch.empty_like(q)
    check("out", out, shape=tuple(q.shape), dtypes=(q.dtype,), last_contiguous=True)
    max_splits = triton.cdiv(block_tables.shape[1] * page, partition_size)
    if max_splits > 1 and workspace is None:
        workspace = decode_workspace(num_seqs, num_q_heads, head_dim, block_tables.shape[1], page,
                                     partition_size, q.device)
    part_out, part_lse = (out, out) if max_splits == 1 else workspace
    if max_splits > 1:
        check("workspace[0]", part_out, shape=(num_seqs, num_q_heads, max_splits, head_dim),
              dtypes=(torch.float32,), contiguous=True)
        check("workspace[1]", part_lse, shape=(num_seqs, num_q_heads, max_splits), dtypes=(torch.float32,),
              contiguous=True)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens,
                      out=out, part_out=part_out, part_lse=part_lse)
    if num_seqs == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    group = num_q_heads // num_kv_heads
    block_n = min(16 if q.dtype == torch.float32 else 64, partition_size)  # fp32: as in paged_prefill
    launch(_decode_kernel, (num_seqs, num_kv_heads, max_splits), q, k_cache, v_cache, block_tables, context_lens,
           out, part_out, part_lse, scale * LOG2E, q.stride(0), q.stride(1), *k_cache.stride()[:3],
           *v_cache.stride()[:3], block_tables.stride(0), out.stride(0), out.stride(1), max_splits,
           GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim, PAGE=page, BLOCK_N=block_n,
           DIRECT=max_splits == 1, IEEE=q.dtype == torch.float32,
           num_warps=4)
    if max_splits > 1:
        launch(_decode_merge_kernel, (num_seqs, num_q_heads), part_out, part_lse, context_lens, out,
               out.stride(0), out.stride(1), max_splits, HEAD_DIM=head_dim, BLOCK_N=block_n,
               SPLITS_PAD=next_pow2(max_splits), num_warps=4)
    return out


@triton.jit
def _prefill_kernel(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, qk_scale,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_bt, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    m_block, seq, head = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_seqlens_q + seq).to(tl.int64)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    length = tl.load(context_lens + seq)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within this chunk
    row_valid = rows < q_len
    q_pos = length - q_len + rows  # absolute position: the chunk comes after its cached prefix
    dims = tl.arange(0, HEAD_DIM)
    q_tile = tl.load(q + (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                     mask=row_valid[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables + seq * stride_bt
    kv_end = tl.minimum(length, length - q_len + (m_block + 1) * BLOCK_M)  # causal: nothing past the last row
    kv_end = tl.where(m_block * BLOCK_M < q_len, kv_end, 0)  # tiles past this chunk's end do nothing
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        k = _load_kv_tile(k_cache, table, pos, valid, kv_head, dims, stride_kb, stride_ks, stride_kh, PAGE)
        s = _dot(q_tile, tl.trans(k), IEEE) * qk_scale
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite from the first tile on: key 0 is visible to all
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = _load_kv_tile(v_cache, table, pos, valid, kv_head, dims, stride_vb, stride_vs, stride_vh, PAGE)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    out_tile = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out_tile.to(out.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill(q, cu_seqlens_q, max_seqlen_q, k_cache, v_cache, block_tables, context_lens, scale=None,
                  out=None):
    """Prefill attention for packed variable-length chunks over a paged cache.

    q: [T, Hq, d] packed chunks; cu_seqlens_q: int32 [num_seqs + 1] chunk offsets into q;
    max_seqlen_q: int, the longest chunk (sizes the grid; no device sync needed).
    context_lens: int32 [num_seqs], total cached tokens of each sequence *including* its chunk,
    whose k/v must already be in the cache (rope_kv_write). Chunk token i sits at position
    context_lens - chunk_len + i and sees the cached prefix and chunk tokens <= itself.
    k_cache, v_cache, block_tables, scale: as in paged_decode. out: optional [T, Hq, d]. Returns out.
    """
    check("q", q, shape=(None, None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    check("cu_seqlens_q", cu_seqlens_q, shape=(None,), dtypes=(torch.int32,), contiguous=True)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("cu_seqlens_q must hold num_seqs + 1 offsets")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page = _check_cache(q, k_cache, v_cache, block_tables, num_seqs)
    check("context_lens", context_lens, shape=(num_seqs,), dtypes=(torch.int32,), contiguous=True)
    if out is None:
        out = torch.empty_like(q)
    check("out", out, shape=tuple(q.shape), dtypes=(q.dtype,), last_contiguous=True)
    check_same_device(q=q, cu_seqlens_q=cu_seqlens_q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                      context_lens=context_lens, out=out)
    if num_seqs == 0 or num_tokens == 0 or max_seqlen_q <= 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    block_m, block_n = (64, 64) if head_dim <= 128 else (32, 32)
    if q.dtype == torch.float32:  # ieee fp32 dots are FMA loops: small tiles, or registers spill
        block_m, block_n = 16, 16
    launch(_prefill_kernel, (triton.cdiv(max_seqlen_q, block_m), num_seqs, num_q_heads), q, k_cache, v_cache,
           block_tables, cu_seqlens_q, context_lens, out, scale * LOG2E, q.stride(0), q.stride(1),
           *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0), out.stride(0), out.stride(1),
           GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
           IEEE=q.dtype == torch.float32, num_warps=8 if head_dim >= 128 else 4)  # 4 warps spill a 64x128 fp32 accumulator on sm_80
    return out
