"""The op-set contract: both op sets implement every method `OpSet` names, and make_ops picks by device."""
import os

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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through Triton's interpreter")
def test_triton_linear_add_takes_the_gemv_up_to_gemv_rows():
    """Both paths add a @ W.T into the residual in place, as the reference does; the Triton GEMV runs
    only up to gemv_rows rows (a launch recorded through the kernels' launch seam), cuBLAS above."""
    from misotts.kernels import _utils
    from misotts.kernels import reference as ref

    g = torch.Generator().manual_seed(1)
    ops = TritonOps(gemv_rows=4)
    for rows, launches in ((3, 1), (5, 0)):
        a, w, residual = torch.randn(rows, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(rows, 40)
        want = ref.linear_residual_ref(a, w, residual)
        seen = []

        class Spy(list):
            def append(self, item):
                seen.append(item[0].__name__)
                kernel, grid, args, meta = item
                kernel[grid](*args, **meta)

        saved, _utils._recorder = _utils._recorder, Spy()
        try:
            got = ops.linear_add(a, w, residual)
        finally:
            _utils._recorder = saved
        assert got is residual and len(seen) == launches
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gemv_rows"):
        TritonOps(gemv_rows=65)


def test_torch_depth_attention_never_reads_nan_past_the_position():
    """The depth caches keep the previous frame's positions past pos (a past request's NaN, when the
    lane is reused); the reference attends to 0..pos only, as if those positions were clean."""
    from misotts.kernels import reference as ref
    from misotts.runtime.config import TransformerConfig

    cfg = TransformerConfig(dim=12, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8, head_dim=6)
    g = torch.Generator().manual_seed(2)
    lanes, positions, pos = 3, 5, 2
    qkv = torch.randn(lanes, 8 * 6, generator=g)
    clean = torch.randn(lanes, 2, positions, 6, generator=g)
    clean[:, :, pos + 1:] = 0.0
    poisoned = clean.clone()
    poisoned[:, :, pos + 1:] = float("nan")
    angle = torch.arange(positions)[:, None] * torch.rand(3, generator=g)
    wo, residual = torch.randn(12, 24, generator=g), torch.randn(lanes, 12, generator=g)
    args = (torch.tensor([pos]), angle.cos(), angle.sin(), None, wo, residual)
    got = TorchOps().depth_attention(qkv, cfg, poisoned, poisoned.clone(), *args)
    want = TorchOps().depth_attention(qkv, cfg, clean, clean.clone(), *args)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
