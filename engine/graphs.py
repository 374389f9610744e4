"""CUDA graphs of one frame (`ModelRunner.decode_frame`), one per batch-size bucket; and
`capture_buckets`, the one capture loop (the frame here, the lanes' Mimi decode in `audio.py`).

A frame is ~30 small launches per layer of the backbone and 31 depth steps of the decoder: at
small batch the GPU would mostly wait for the host to launch them.  Captured once per bucket
(1, 2, 4, ..., max_batch), a frame is one `replay()`.  All buckets share one memory pool,
captured largest first so the smaller ones fit in its blocks.  Inputs and outputs are the
tensors of `BatchState`, written between replays; nothing is copied in or out by the graph.
Without CUDA (or with graphs off) `run` calls the same function eagerly at the bucket size,
so the CPU runs exactly the code that would be captured.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import torch


def batch_buckets(max_batch: int) -> list[int]:
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


def capture_buckets(step: Callable[[int], object], buckets: list[int], device=None,
                    on_bucket: Callable[[int, int], None] | None = None) -> dict[int, tuple]:
    """CUDA only: {b: (graph, its output)} of `step(b)` for each batch size b in `buckets`.

    Each is warmed up twice on a side stream first (Triton compiles, cuBLAS / cuDNN pick their
    kernels, outside capture), then captured in thread-local mode (other threads may use CUDA
    meanwhile).  Largest first, all in one memory pool, so the smaller ones fit in its blocks.
    on_bucket(i, b) is called before each (progress)."""
    graphs, pool = {}, None
    for i, b in enumerate(sorted(buckets, reverse=True)):
        if on_bucket is not None:
            on_bucket(i, b)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(b)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = step(b)
        pool = graph.pool()
        graphs[b] = (graph, out)
    torch.cuda.synchronize(device)
    return graphs


class FrameGraphs:
    """The frame's graphs: per bucket, the full frame and the depth-only one (every lane's
    backbone row already run by its prefill: `ModelRunner.decode_frame(n, backbone=False)`)."""

    def __init__(self, step, max_batch: int):
        self.step = step  # step(n, backbone): one frame for lanes 0..n-1, on static tensors only
        self.buckets = batch_buckets(max_batch)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (bucket, backbone) -> graph

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def capture(self, progress: bool = False, depth_only: bool = True) -> None:
        """Warm up and capture every bucket, of both kinds unless depth_only is False (CUDA only).
        The step's writes land on padding lanes."""
        kinds = (True, False) if depth_only else (True,)
        start, total = time.perf_counter(), len(kinds) * len(self.buckets)
        for k, backbone in enumerate(kinds):
            def report(i: int, n: int) -> None:
                if progress:
                    print(f"\rcapturing CUDA graphs: batch {n:>3}{'' if backbone else ', depth only'} "
                          f"({k * len(self.buckets) + i + 1}/{total})", end="", file=sys.stderr)

            captured = capture_buckets(lambda b: self.step(b, backbone), self.buckets, on_bucket=report)
            self.graphs.update({(n, backbone): graph for n, (graph, _) in captured.items()})
        if progress:
            print(f"\rcaptured {len(self.graphs)} CUDA graphs in {time.perf_counter() - start:.1f} s" + " " * 20,
                  file=sys.stderr)

    def run(self, n: int, backbone: bool = True) -> int:
        """One frame for lanes 0..n-1 (padded up to a bucket); returns the bucket used."""
        b = self.bucket(n)
        if (b, backbone) in self.graphs:
            self.graphs[(b, backbone)].replay()
        else:
            self.step(b, backbone)
        return b
