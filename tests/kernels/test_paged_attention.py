"""Paged decode and prefill attention against the torch references; references against SDPA."""
import pytest
import torch
import torch.nn.functional as F

from misotts.kernels import reference as ref
from misotts.kernels.paged_attention import decode_workspace, paged_decode, paged_prefill

PAD_BLOCK = 10**9  # block-table padding: any read of it would fault, so the kernels must mask it


def make_paged(lengths, num_kv_heads, head_dim, page, generator, num_blocks=None):
    """Random caches with each sequence's blocks scattered (shuffled, high ids) over the pool."""
    needed = [-(-n // page) for n in lengths]
    num_blocks = num_blocks or 3 * sum(needed) + 5
    ids = torch.randperm(num_blocks, generator=generator)[: sum(needed)].tolist()
    table = torch.full((len(lengths), max(needed) + 1), PAD_BLOCK, dtype=torch.int32)
    for s, n in enumerate(needed):
        table[s, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    k = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=generator)
    return k, v, table, torch.tensor(lengths, dtype=torch.int32)


def contiguous_kv(cache, table_row, length):
    """Token-by-token gather (independent of reference.gather_kv)."""
    page = cache.shape[1]
    return torch.stack([cache[int(table_row[p // page]), p % page] for p in range(length)])


def sdpa(q, k, v, scale, causal_offset):
    """q [Tq,Hq,d], k/v [Tk,Hkv,d] through torch's SDPA with an explicit causal mask."""
    group = q.shape[1] // k.shape[1]
    qh = q.double().transpose(0, 1)
    kh, vh = (x.double().repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))
    mask = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + causal_offset
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)


def test_references_match_sdpa():
    g = torch.Generator().manual_seed(0)
    page, hkv, hq, d = 16, 2, 8, 32
    lengths = [1, 16, 17, 40]
    k_cache, v_cache, table, lens = make_paged(lengths, hkv, d, page, g)
    scale = 0.3
    q = torch.randn(len(lengths), hq, d, generator=g)
    got = ref.paged_decode_ref(q, k_cache, v_cache, table, lens, scale)
    for s, n in enumerate(lengths):
        k, v = contiguous_kv(k_cache, table[s], n), contiguous_kv(v_cache, table[s], n)
        torch.testing.assert_close(got[s:s + 1].double(), sdpa(q[s:s + 1], k, v, scale, n - 1), rtol=1e-5, atol=1e-5)
    q_lens = [1, 16, 5, 40]  # prefixes 0, 0, 12, 0
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=g)
    got = ref.paged_prefill_ref(q, cu, k_cache, v_cache, table, lens, scale)
    for s, (n, m) in enumerate(zip(lengths, q_lens)):
        k, v = contiguous_kv(k_cache, table[s], n), contiguous_kv(v_cache, table[s], n)
        want = sdpa(q[cu[s]:cu[s + 1]], k, v, scale, n - m)
        torch.testing.assert_close(got[cu[s]:cu[s + 1]].double(), want, rtol=1e-5, atol=1e-5)


# (query heads, kv heads, head_dim, page, partition): GQA ratios 1/4/8, head_dim 64/128, split and direct paths
DECODE_CASES = [(4, 4, 64, 16, 32), (8, 2, 128, 32, 256), (16, 2, 64, 64, 64)]


@pytest.mark.parametrize("hq,hkv,d,page,partition", DECODE_CASES)
def test_paged_decode(hq, hkv, d, page, partition):
    g = torch.Generator().manual_seed(hq * d + page)
    # exactly on a block boundary, just past it, a single token, odd lengths, an empty padding lane
    lengths = [page, page + 1, 1, 3 * page - 5, 0, 2 * page + 3]
    k_cache, v_cache, table, lens = make_paged(lengths, hkv, d, page, g)
    q = torch.randn(len(lengths), hq, d, generator=g)
    out = torch.full_like(q, float("nan"))
    workspace = decode_workspace(len(lengths), hq, d, table.shape[1], page, partition)
    for buf in workspace:
        buf.fill_(float("nan"))  # partials of splits past a sequence's end are never read
    paged_decode(q, k_cache, v_cache, table, lens, scale=d**-0.5, out=out, workspace=workspace,
                 partition_size=partition)
    want = ref.paged_decode_ref(q, k_cache, v_cache, table, lens, d**-0.5)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    assert out[4].eq(0).all()  # length 0: zeros, not NaN
    splits = workspace[0].shape[2]
    assert (splits > 1) == (partition < table.shape[1] * page)


@pytest.mark.parametrize("hq,hkv,d,page", [(4, 1, 64, 16), (4, 4, 128, 32), (8, 1, 64, 16)])
def test_paged_prefill(hq, hkv, d, page):
    g = torch.Generator().manual_seed(hq * d + page + 1)
    # (cached prefix, chunk length): fresh prompt, chunk ending on / just past a block boundary,
    # one token after a long prefix, a chunk longer than one 64-row tile, an empty chunk
    chunks = [(0, 5), (page, page), (page - 1, 2), (37, 1), (3, 70), (9, 0)]
    lengths = [p + m for p, m in chunks]
    k_cache, v_cache, table, lens = make_paged(lengths, hkv, d, page, g)
    cu = torch.tensor([0] + torch.tensor([m for _, m in chunks]).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=g)
    out = torch.full_like(q, float("nan"))
    paged_prefill(q, cu, max(m for _, m in chunks), k_cache, v_cache, table, lens, scale=0.2, out=out)
    torch.testing.assert_close(out, ref.paged_prefill_ref(q, cu, k_cache, v_cache, table, lens, 0.2),
                               rtol=2e-5, atol=2e-5)


def test_high_block_ids_use_int64_addresses(big_kv_cache, fill):
    """Block ids near the end of a > 2^31-element pool (k and v interleaved, so strided views)."""
    k_cache, v_cache = big_kv_cache
    blocks, page, hkv, d = k_cache.shape
    g = torch.Generator().manual_seed(11)
    table = torch.tensor([[blocks - 1, blocks - 40, 7, PAD_BLOCK], [blocks - 2, 3, blocks - 3, blocks - 100]],
                         dtype=torch.int32)
    used = [int(b) for b in table.flatten() if b != PAD_BLOCK]
    fill(k_cache, used, g)
    fill(v_cache, used, g)
    lens = torch.tensor([2 * page + 5, 4 * page], dtype=torch.int32)
    q = torch.randn(2, 4 * hkv, d, generator=g)
    out = paged_decode(q, k_cache, v_cache, table, lens, partition_size=32)
    torch.testing.assert_close(out, ref.paged_decode_ref(q, k_cache, v_cache, table, lens, d**-0.5),
                               rtol=2e-5, atol=2e-5)
    cu = torch.tensor([0, 6, 6 + 4 * page], dtype=torch.int32)  # second sequence: whole context is the chunk
    qp = torch.randn(int(cu[-1]), 4 * hkv, d, generator=g)
    out = paged_prefill(qp, cu, 4 * page, k_cache, v_cache, table, lens)
    torch.testing.assert_close(out, ref.paged_prefill_ref(qp, cu, k_cache, v_cache, table, lens, d**-0.5),
                               rtol=2e-5, atol=2e-5)


def test_decode_never_reads_nan_past_the_context():
    """A pool full of NaN (freed blocks keep a past request's leftovers) except each lane's context:
    the kernel masks its loads, so the NaN never reaches a score or a weight."""
    g = torch.Generator().manual_seed(3)
    lengths, page, hkv, hq, d = [1, 7, 16, 21], 16, 2, 4, 16
    blocks = [-(-n // page) + 1 for n in lengths]
    k_cache = torch.full((sum(blocks) + 1, page, hkv, d), float("nan"))
    v_cache = k_cache.clone()
    table = torch.zeros(len(lengths), max(blocks), dtype=torch.int32)
    start = 0
    for lane, (n, count) in enumerate(zip(lengths, blocks)):
        table[lane, :count] = torch.arange(start, start + count, dtype=torch.int32)
        for p in range(n):
            k_cache[start + p // page, p % page] = torch.randn(hkv, d, generator=g)
            v_cache[start + p // page, p % page] = torch.randn(hkv, d, generator=g)
        start += count
    q, lens = torch.randn(len(lengths), hq, d, generator=g), torch.tensor(lengths, dtype=torch.int32)
    got = paged_decode(q, k_cache, v_cache, table, lens, 0.25)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.paged_decode_ref(q, k_cache, v_cache, table, lens, 0.25), rtol=1e-5, atol=1e-5)


def test_decode_spreads_a_short_context_over_every_split():
    """The grid has ceil(table width / partition) splits per lane; a lane's context is spread over all of
    them in whole tiles (fp32 tiles: 16 positions), so a short context keeps them busy. The workspace's
    per-split log-sum-exp shows which splits worked (-inf: none), and the merged output is the reference's."""
    g = torch.Generator().manual_seed(4)
    lengths, page, partition = [40, 100, 3], 16, 64
    k_cache, v_cache, table, lens = make_paged(lengths, 1, 16, page, g)
    table = torch.cat([table, torch.full((3, 16 - table.shape[1]), PAD_BLOCK, dtype=torch.int32)], 1)  # 256 wide
    q = torch.randn(3, 2, 16, generator=g)
    workspace = decode_workspace(3, 2, 16, table.shape[1], page, partition)
    got = paged_decode(q, k_cache, v_cache, table, lens, 0.3, workspace=workspace, partition_size=partition)
    torch.testing.assert_close(got, ref.paged_decode_ref(q, k_cache, v_cache, table, lens, 0.3), rtol=1e-5, atol=1e-5)
    used = torch.isfinite(workspace[1]).sum(-1)  # [lane, head]: splits with positions (4 in the grid)
    # 40 positions: 4 splits of one 16-position tile would need 48 > 40, so ceil(40 / 16) = 3 splits;
    # 100: ceil(100 / 4) = 25 -> 2 tiles (32) per split -> 4 splits; 3: one split.
    assert used.tolist() == [[3, 3], [4, 4], [1, 1]]
