"""The engine's audio: one batched streaming Mimi decode per frame for the live lanes only."""
from __future__ import annotations

import copy

import torch

from misotts.runtime.codec import MimiCodec
from misotts.runtime.prompt import mimi_codes

from . import mimi_state
from .graphs import capture_buckets


def mimi_buckets(max_batch: int) -> list[int]:
    """Batch sizes the lanes' Mimi decode is captured at: 1, 2, 4, 8, then every multiple of 8 up to
    max_batch, and max_batch.  Finer than the frame's powers of two: Mimi costs about linearly in
    its batch, so a padding lane costs as much as a live one (at most 7 of them here, not n - 1)."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 8)) + [max_batch]


def smallest_bucket(buckets: list[int], n: int) -> int | None:
    """The smallest of `buckets` (sorted) holding n lanes; None if none does."""
    return next((b for b in buckets if b >= n), None)


class LaneDecoder:
    """Streaming Mimi decode for the engine's lanes: one batched call per frame for the live lanes 0..n-1.

    A private Mimi (sharing the codec's weights) holds one streaming state of `max_batch` lanes.
    A call for a batch of b lanes runs on views of the first b rows of every state tensor, so a
    lane's state carries over whatever batch size the next frame has.  The engine resets a lane
    when a request takes it and moves a lane's state when it compacts its lanes.  Decoding runs in
    the engine's thread only; moshi's own per-state CUDA graphs are off (it would capture them in
    whatever thread decodes, with global capture mode: the failure seen on the first GPU run).
    On CUDA, `capture` records the decode once per Mimi bucket instead (`mimi_buckets`, finer than
    the frame's; `graphs.capture_buckets`, one memory pool, as the frame is), and `decode` replays the
    smallest bucket that holds the live lanes.  What this needs of moshi's states beyond its
    public streaming calls is in `mimi_state.py`.
    """

    def __init__(self, codec: MimiCodec, max_batch: int):
        shared = {id(t): t for t in (*codec.mimi.parameters(), *codec.mimi.buffers())}
        self.mimi = copy.deepcopy(codec.mimi, memo=shared)
        self.cardinality, self.frame_size, self.max_batch = codec.cardinality, codec.frame_size, max_batch
        # Plain tensors even when made under a caller's inference_mode: the engine thread, which
        # runs outside it, updates this state (and the graphs' input) in place.
        with torch.inference_mode(False):
            self._streaming = self.mimi.streaming(max_batch)
            self._codes = torch.zeros(max_batch, codec.num_codebooks, dtype=torch.long, device=codec.device)
        self.states = mimi_state.states(self.mimi)  # by module name, max_batch lanes each
        mimi_state.check_layout(self.states)
        self._views: dict[int, tuple[dict, list]] = {}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its pcm)
        # The batch sizes `capture` records (by default) and `decode` replays once captured.
        self.buckets = mimi_buckets(max_batch)

    def _lane_views(self, lanes: int):
        """Per module, a view of its state on the first `lanes` lanes; and what to restore if
        moshi reassigns an attribute of a view."""
        if lanes not in self._views:
            views, watched = {}, []
            for name, state in self.states.items():
                views[name], restore = mimi_state.lane_view(state, lanes)
                watched += restore
            self._views[lanes] = views, watched
        return self._views[lanes]

    @torch.inference_mode(False)
    @torch.no_grad()
    def capture(self, buckets: list[int] | None = None) -> None:
        """CUDA: one graph of the decode per batch size in `buckets` (default `mimi_buckets(max_batch)`),
        warmed up first (moshi compiles and cuDNN picks its kernels outside capture); every lane is
        reset afterwards.  Outside inference_mode, whatever the caller's: the engine thread writes
        the graphs' input."""
        device = self._codes.device
        self.buckets = sorted(set(buckets if buckets is not None else mimi_buckets(self.max_batch)))
        self._graphs = capture_buckets(lambda b: self._decode(self._codes[:b]), self.buckets, device)
        self._reset(torch.ones(self.max_batch, dtype=torch.bool, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bucket(self, n: int) -> int:
        """How many lanes a decode of n live lanes runs: the smallest captured bucket >= n (n when no
        graph is captured, or none holds n: then it decodes eagerly)."""
        b = smallest_bucket(self.buckets, n) if self._graphs else None
        return n if b is None else b

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n, num_codebooks] of the live lanes 0..n-1 (special ids >= cardinality play as 0)
        -> float32 samples [n, frame_size], readable until the next decode.  Eagerly it decodes
        exactly these n lanes; with graphs it replays bucket(n), whose lanes n.. are padding (fed
        code 0; their state advances, and the engine resets a lane when a request takes it)."""
        n = codes.shape[0]
        b = self.bucket(n)
        if b not in self._graphs:
            return self._decode(codes)
        graph, pcm = self._graphs[b]
        self._codes[:n].copy_(codes)
        self._codes[n:b].zero_()
        graph.replay()
        return pcm[:n]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        views, watched = self._lane_views(codes.shape[0])
        mimi_state.install(self.mimi, views)
        pcm = self.mimi.decode(mimi_codes(codes, self.cardinality)[:, :, None])[:, 0].float()
        mimi_state.restore(watched)
        return pcm

    @torch.no_grad()
    def reset(self, lane: int) -> None:
        """Lane `lane` starts a new stream (as if no frame had been decoded in it)."""
        device = next(self.mimi.parameters()).device
        mask = torch.zeros(self.max_batch, dtype=torch.bool, device=device)
        mask[lane] = True
        self._reset(mask)

    def _reset(self, mask: torch.Tensor) -> None:
        # moshi's own reset, on the full states (in place, as moshi's resets are: captured graphs
        # still see the state)
        mimi_state.install(self.mimi, self.states)
        self.mimi.reset_streaming(mask)

    @torch.no_grad()
    def move(self, src: int, dst: int) -> None:
        """Lane dst takes over lane src's stream."""
        for state in self.states.values():
            mimi_state.move_lane(state, src, dst)

    def close(self) -> None:
        self._streaming.close()
