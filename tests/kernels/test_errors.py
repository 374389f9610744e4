"""Launchers reject bad arguments with clear ValueErrors before anything is launched."""
import pytest
import torch
import triton

from misotts.kernels.embedding import rvq_embed
from misotts.kernels.paged_attention import paged_decode, paged_prefill
from misotts.kernels.rmsnorm import rmsnorm
from misotts.kernels.rope import rope_kv_write
from misotts.kernels.sampling import depth_step, sample_topk
from misotts.kernels.swiglu import swiglu


def decode_args(**over):
    args = dict(q=torch.randn(2, 4, 64), k_cache=torch.randn(8, 16, 2, 64), v_cache=torch.randn(8, 16, 2, 64),
                block_tables=torch.zeros(2, 3, dtype=torch.int32), context_lens=torch.ones(2, dtype=torch.int32))
    args.update(over)
    return args


@pytest.mark.parametrize("over,message", [
    (dict(q=torch.randn(2, 4, 64).half()), "k_cache must have dtype"),
    (dict(q=torch.randn(2, 3, 64)), "multiple of kv heads"),
    (dict(k_cache=torch.randn(8, 24, 2, 64), v_cache=torch.randn(8, 24, 2, 64)), "power of two >= 16"),
    (dict(v_cache=torch.randn(8, 16, 2, 32)), "v_cache must have shape"),
    (dict(block_tables=torch.zeros(2, 3, dtype=torch.int64)), "block_tables must have dtype"),
    (dict(context_lens=torch.ones(3, dtype=torch.int32)), "context_lens must have shape"),
    (dict(q=torch.randn(2, 64, 4).transpose(1, 2)), "unit stride"),
    (dict(q=[1, 2]), "must be a torch.Tensor"),
])
def test_paged_decode_errors(over, message):
    with pytest.raises(ValueError, match=message):
        paged_decode(**decode_args(**over))


def test_paged_decode_workspace_and_partition_errors():
    with pytest.raises(ValueError, match="partition_size"):
        paged_decode(**decode_args(), partition_size=100)
    with pytest.raises(ValueError, match="workspace"):
        paged_decode(**decode_args(), partition_size=16, workspace=(torch.empty(1), torch.empty(1)))


def test_paged_prefill_errors():
    args = decode_args()
    with pytest.raises(ValueError, match="cu_seqlens_q must have dtype"):
        paged_prefill(args["q"], torch.tensor([0, 1, 2]), 1, args["k_cache"], args["v_cache"], args["block_tables"],
                      args["context_lens"])
    with pytest.raises(ValueError, match="block_tables must have shape"):
        paged_prefill(args["q"], torch.tensor([0, 2], dtype=torch.int32), 2, args["k_cache"], args["v_cache"],
                      args["block_tables"], args["context_lens"][:1])


def test_device_checks(monkeypatch):
    with pytest.raises(ValueError, match="one device"):
        swiglu(torch.randn(2, 8), out=torch.empty(2, 4, device="meta"))
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        swiglu(torch.randn(2, 8))


def test_elementwise_errors():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match="out must have shape"):
        swiglu(torch.randn(2, 8), out=torch.empty(2, 8))
    with pytest.raises(ValueError, match="weight must have shape"):
        rmsnorm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="residual must have shape"):
        rmsnorm(torch.randn(2, 8), torch.randn(8), 1e-5, residual=torch.randn(3, 8))
    frames, mask = torch.zeros(1, 2, 33, dtype=torch.int64), torch.ones(1, 2, 33, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask must have dtype"):
        rvq_embed(frames, mask.int(), torch.randn(10, 4), torch.randn(64, 4))
    with pytest.raises(ValueError, match="multiple of the 32 audio columns"):
        rvq_embed(frames, mask, torch.randn(10, 4), torch.randn(65, 4))
    with pytest.raises(ValueError, match="audio_table must have dtype"):
        rvq_embed(frames, mask, torch.randn(10, 4), torch.randn(64, 4).double())


def test_rope_errors():
    q, k, v = torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    cache, pos, inv, slots = torch.randn(4, 16, 2, 64), torch.arange(3), torch.ones(32), torch.arange(3)
    with pytest.raises(ValueError, match="inv_freq must have shape"):
        rope_kv_write(q, k, v, pos, torch.ones(64), cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        rope_kv_write(q, k, v, pos, inv, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        rope_kv_write(torch.randn(3, 4, 48), torch.randn(3, 2, 48), torch.randn(3, 2, 48), pos, torch.ones(24),
                      torch.randn(4, 16, 2, 48), torch.randn(4, 16, 2, 48), slots)
    with pytest.raises(ValueError, match="block_size"):
        rope_kv_write(q, k, v, pos, inv, torch.randn(4, 12, 2, 64), torch.randn(4, 12, 2, 64), slots)


def test_sampler_errors():
    logits, seed = torch.randn(2, 50), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="topk"):
        sample_topk(logits, 1.0, 0, seed, seed)
    with pytest.raises(ValueError, match="temperature"):
        sample_topk(logits, -1.0, 5, seed, seed)
    with pytest.raises(ValueError, match="counter must have shape"):
        sample_topk(logits, 1.0, 5, seed, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="both be Python numbers or both be tensors"):
        sample_topk(logits, torch.ones(2), 5, seed, seed)
    with pytest.raises(ValueError, match="temperature must have dtype"):
        sample_topk(logits, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.int64), seed, seed)
    with pytest.raises(ValueError, match="counter_offset"):
        sample_topk(logits, 1.0, 5, seed, seed, counter_offset=1.5)
    h, head, embed = torch.randn(2, 16), torch.randn(16, 50), torch.randn(32 * 50, 8)
    codes, nxt = torch.zeros(2, 32, dtype=torch.int64), torch.empty(2, 8)
    with pytest.raises(ValueError, match="codebook must be an int in"):
        depth_step(h, head, 32, embed, codes, nxt, seed, seed, 1.0, 5)
    with pytest.raises(ValueError, match="embed_table rows"):
        depth_step(h, head, 1, torch.randn(32 * 50 + 1, 8), codes, nxt, seed, seed, 1.0, 5)
    with pytest.raises(ValueError, match="head must have"):
        depth_step(h, head.half(), 1, embed, codes, nxt, seed, seed, 1.0, 5)
    with pytest.raises(ValueError, match="logits must have shape"):
        depth_step(h, head, 1, embed, codes, nxt, seed, seed, 1.0, 5, logits=torch.empty(2, 49))


def test_flash_backend_is_optional():
    import importlib.util

    from misotts.kernels.flash_backend import flash_decode  # importable without flash-attn
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    with pytest.raises(RuntimeError, match="needs flash-attn"):
        flash_decode(**decode_args())
