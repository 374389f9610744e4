"""The op-set contract: both op sets implement every method `OpSet` names, and make_ops picks by device."""
import pytest
import torch

from misotts.engine.ops import OpSet, TorchOps, TritonOps, make_ops


@pytest.mark.parametrize("ops", [TorchOps(), TritonOps()], ids=["torch", "triton"])
def test_op_sets_implement_the_contract(ops):
    assert isinstance(ops, OpSet)
    methods = [name for name, value in vars(OpSet).items() if callable(value) and not name.startswith("_")]
    assert len(methods) == 10
    assert [name for name in methods if not callable(getattr(ops, name, None))] == []
    assert isinstance(ops.fused_rows, int) and ops.fused_rows >= 0


def test_make_ops_by_device_and_name():
    assert isinstance(make_ops("auto", torch.device("cpu")), TorchOps)
    assert isinstance(make_ops("auto", torch.device("meta")), TorchOps)
    assert isinstance(make_ops("triton", torch.device("cpu")), TritonOps)
    with pytest.raises(ValueError, match="unknown ops"):
        make_ops("cuda", torch.device("cpu"))


def test_an_incomplete_op_set_is_not_an_op_set():
    class Half:
        name, fused_rows = "half", 0

        def embed(self, *args): ...

    assert not isinstance(Half(), OpSet)


def nan_pool_with_lanes(lengths, page=4, kv_heads=2, head_dim=8, seed=0):
    """A KV pool whose every slot is NaN (a past request's leftovers) except each lane's first
    lengths[n] positions; each lane's table is padded with a NaN block."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // page) + 1 for n in lengths]  # + 1: a whole NaN block past the context
    k_cache = torch.full((sum(blocks) + 1, page, kv_heads, head_dim), float("nan"))
    v_cache = k_cache.clone()
    table = torch.zeros(len(lengths), max(blocks), dtype=torch.int32)
    start = 0
    for lane, (n, count) in enumerate(zip(lengths, blocks)):
        ids = torch.arange(start, start + count, dtype=torch.int32)
        table[lane, :count] = ids
        start += count
        for p in range(n):
            k_cache[ids[p // page], p % page] = torch.randn(kv_heads, head_dim, generator=g)
            v_cache[ids[p // page], p % page] = torch.randn(kv_heads, head_dim, generator=g)
    q = torch.randn(len(lengths), 2 * kv_heads, head_dim, generator=g)
    return q, k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32)


def test_torch_decode_attention_never_reads_nan_past_the_context():
    """Freed blocks keep whatever a past request left, NaN included; a lane's attention must not
    see it (masking alone gives 0 * NaN = NaN). Reference: paged_decode_ref gathers only the context."""
    from misotts.kernels import reference as ref

    q, k_cache, v_cache, table, lens = nan_pool_with_lanes([1, 5, 8, 11])
    got = TorchOps().decode_attention(q, k_cache, v_cache, table, lens, 0.3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.paged_decode_ref(q, k_cache, v_cache, table, lens, 0.3), rtol=1e-6, atol=1e-6)
