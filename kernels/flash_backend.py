"""Optional flash-attn backend with the paged_decode / paged_prefill signatures.

flash-attn is imported on first call, never at module import, and is never required. Its paged KV
cache has our layout ([num_blocks, block_size, Hkv, d] + int32 block table) but flash-attn 2 wants
block_size divisible by 256. Causal masking with more keys than queries is bottom-right aligned in
flash-attn >= 2.1, which is our prefill semantics (chunk token i sits at context_len - chunk_len + i).
Not exercised by the CPU test suite (no GPU, no flash-attn there); the GPU benchmark compares it.
"""
import torch


def _flash():
    try:
        import flash_attn
    except ImportError as e:
        raise RuntimeError("the flash backend needs flash-attn (pip install misotts[flash]) and a CUDA GPU") from e
    return flash_attn


def flash_decode(q, k_cache, v_cache, block_tables, context_lens, scale=None, out=None):
    """Same contract as paged_attention.paged_decode (no workspace: flash-attn splits internally)."""
    result = _flash().flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=context_lens,
                                              block_table=block_tables, softmax_scale=scale, causal=True)[:, 0]
    return result if out is None else out.copy_(result)


def flash_prefill(q, cu_seqlens_q, max_seqlen_q, k_cache, v_cache, block_tables, context_lens, scale=None, out=None):
    """Same contract as paged_attention.paged_prefill (needs flash-attn >= 2.6 for block_table)."""
    cu_seqlens_k = torch.nn.functional.pad(context_lens.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen_k = block_tables.shape[1] * k_cache.shape[1]  # an upper bound, no device sync
    result = _flash().flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, softmax_scale=scale, causal=True, block_table=block_tables)
    return result if out is None else out.copy_(result)
