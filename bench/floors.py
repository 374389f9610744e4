"""Lower bounds on latency: the bytes a step must read over the bandwidth measured in the same run.

A frame reads every backbone layer weight once (one new position per stream), `codebook0_head`
and `projection` once, then runs the depth decoder as the engine does: 32 passes (position 0 on
the projected backbone state, then one position per codebook 1..31), each reading the decoder's
layers, and 31 `audio_head` slices.  (Merging positions 0 and 1 into one pass would save one read
of the decoder; the engine does not, so neither does its floor.)  Per stream it also reads its KV
cache and a few embedding rows (the fed-back frame's 32, and the 31 depth inputs: rows of the
precomputed projection of the audio embeddings).  The first audio reads the same depth part once
more after a prefill that reads the backbone weights, the prompt's embedding rows and its KV, then
Mimi's decoder weights.
Norm weights are counted; RoPE tables, sampling and activations are not (they stay on chip).
"""
from __future__ import annotations

import time

import torch


def kv_elems(t, positions: int) -> int:
    """Elements of K and V that attention over `positions` cached positions reads, all layers."""
    return 2 * t.n_layers * t.n_kv_heads * t.head_dim * positions


def backbone_bytes(cfg, embed_rows: int, kv_len: int, dtype_bytes: int, streams: int = 1) -> int:
    """One backbone pass: its layer weights once, and per stream `embed_rows` embedding rows
    gathered and K/V read over `kv_len` positions."""
    t = cfg.backbone
    per_stream = embed_rows * t.dim + kv_elems(t, kv_len)
    return (t.num_parameters() + streams * per_stream) * dtype_bytes


def depth_bytes(cfg, dtype_bytes: int, streams: int = 1) -> int:
    """codebook0 head and projection, then the depth decoder's 32 passes and 31 heads."""
    bb, t, n, v = cfg.backbone, cfg.decoder, cfg.num_codebooks, cfg.audio_vocab_size
    weights = v * bb.dim + bb.dim * t.dim + n * t.num_parameters() + (n - 1) * t.dim * v
    # pass i (0..n-1) attends positions 0..i: 1 + 2 + ... + n of them; n-1 depth inputs of t.dim
    per_stream = (n - 1) * t.dim + kv_elems(t, n * (n + 1) // 2)
    return (weights + streams * per_stream) * dtype_bytes


def frame_bytes(cfg, kv_len: int, dtype_bytes: int, streams: int = 1) -> int:
    """A decode step making one frame for each of `streams` streams that attend `kv_len` positions."""
    return backbone_bytes(cfg, cfg.num_codebooks, kv_len, dtype_bytes, streams) + depth_bytes(cfg, dtype_bytes, streams)


def first_audio_bytes(cfg, text_rows: int, audio_rows: int, dtype_bytes: int, mimi_bytes: int = 0) -> int:
    """Prefill of a prompt (text rows embed one row each, audio rows one per codebook), the first
    frame's depth part, and Mimi's decoder weights for the first PCM chunk."""
    rows = text_rows + cfg.num_codebooks * audio_rows
    return (backbone_bytes(cfg, rows, text_rows + audio_rows, dtype_bytes) + depth_bytes(cfg, dtype_bytes)
            + mimi_bytes)


def prefill_flops(cfg, positions: int) -> int:
    """Matmul FLOPs of a backbone prefill: 2 per weight per position, plus causal attention."""
    t = cfg.backbone
    matmul_weights = t.num_parameters() - t.n_layers * 2 * t.dim - t.dim  # less the norms
    attention = 2 * t.n_layers * t.n_heads * t.head_dim * positions * (positions + 1)  # QK^T and PV, causal
    return 2 * positions * matmul_weights + attention


def mimi_decode_bytes(codec) -> int:
    """Parameter bytes on Mimi's decode path (its encoder half is not read to decode)."""
    return sum(p.numel() * p.element_size() for name, p in codec.mimi.named_parameters()
               if not name.startswith(("encoder", "downsample")))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second (read + written) of the best of `repeats` large device-to-device copies."""
    device = torch.device(device)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_time(lambda: dst.copy_(src), device, repeats)


def matmul_flops(device, dtype, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square matmuls (the compute roof for the prefill floor)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_time(lambda: a @ b, device, repeats)
