"""The engine's audio: one batched streaming Mimi decode per frame for all running lanes."""
from __future__ import annotations

import copy

import torch

from misotts.runtime.codec import MimiCodec
from misotts.runtime.prompt import mimi_codes

from . import mimi_state
from .graphs import capture_buckets


class LaneDecoder:
    """Streaming Mimi decode for the engine's lanes: one batched call per frame for lanes 0..n-1.

    A private Mimi (sharing the codec's weights) holds one streaming state of `max_batch` lanes.
    A call for a batch of b lanes runs on views of the first b rows of every state tensor, so a
    lane's state carries over whatever batch size the next frame has.  The engine resets a lane
    when a request takes it and moves a lane's state when it compacts its lanes.  Decoding runs in
    the engine's thread only; moshi's own per-state CUDA graphs are off (it would capture them in
    whatever thread decodes, with global capture mode: the failure seen on the first GPU run).
    On CUDA, `capture` records the decode once per batch bucket instead (`graphs.capture_buckets`,
    as the frame is), and `decode` replays it.  What this needs of moshi's states beyond its
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
    def capture(self, buckets: list[int]) -> None:
        """CUDA: one graph of `decode` per batch size in `buckets`, warmed up first (moshi compiles
        and cuDNN picks its kernels outside capture); every lane is reset afterwards.  Outside
        inference_mode, whatever the caller's: the engine thread writes the graphs' input."""
        device = self._codes.device
        self._graphs = capture_buckets(lambda b: self._decode(self._codes[:b]), buckets, device)
        self._reset(torch.ones(self.max_batch, dtype=torch.bool, device=device))
        torch.cuda.synchronize(device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [b, num_codebooks] of lanes 0..b-1 (special ids >= cardinality play as 0) ->
        float32 samples [b, frame_size]; every lane's state advances one frame.  A captured
        batch size returns the graph's output tensor: read it before the next decode."""
        if codes.shape[0] in self._graphs:
            graph, pcm = self._graphs[codes.shape[0]]
            self._codes[:codes.shape[0]].copy_(codes)
            graph.replay()
            return pcm
        return self._decode(codes)

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
