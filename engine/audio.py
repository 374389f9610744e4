"""The engine's audio: one batched streaming Mimi decode per frame for all running lanes."""
from __future__ import annotations

import copy

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache
from moshi.utils.compile import CUDAGraphed

from misotts.runtime.codec import MimiCodec
from misotts.runtime.prompt import mimi_codes


class LaneDecoder:
    """Streaming Mimi decode for the engine's lanes: one batched call per frame for lanes 0..n-1.

    A private Mimi (sharing the codec's weights) holds one streaming state of `max_batch` lanes.
    A call for a batch of b lanes runs on views of the first b rows of every state tensor, so a
    lane's state carries over whatever batch size the next frame has.  The engine resets a lane
    when a request takes it and moves a lane's state when it compacts its lanes.  Decoding runs in
    the engine's thread only; moshi's own per-state CUDA graphs are off (it would capture them in
    whatever thread decodes, with global capture mode: the failure seen on the first GPU run).
    On CUDA, `capture` records the decode once per batch bucket instead (ours: on a side stream,
    thread-local capture mode), and `decode` replays it.
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
        self.states = [(m, m._streaming_state) for m in self.mimi.modules()
                       if isinstance(m, StreamingModule) and m._streaming_state is not None]
        self._views: dict[int, tuple[list, list]] = {}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its pcm)

    def _lane_views(self, lanes: int):
        """Per module, a copy of its state whose batch tensors are views of the first `lanes` rows;
        and the (object, attribute, view) triples to restore if moshi reassigns an attribute."""
        if lanes not in self._views:
            views, watched = [], []
            for module, state in self.states:
                view = copy.copy(state)
                view.batch_size = lanes
                for name, value in vars(state).items():
                    if _is_batch_tensor(value, state.batch_size):
                        setattr(view, name, value[:lanes])
                        watched.append((view, name, value[:lanes]))
                    elif isinstance(value, RingKVCache):
                        kv = copy.copy(value)
                        kv.cache, kv.end_offset = value.cache[:, :lanes], value.end_offset[:lanes]
                        setattr(view, name, kv)
                        watched += [(kv, "cache", kv.cache), (kv, "end_offset", kv.end_offset)]
                    elif isinstance(value, CUDAGraphed):
                        setattr(view, name, CUDAGraphed(value.func, disable=True))
                views.append((module, view))
            self._views[lanes] = views, watched
        return self._views[lanes]

    @torch.inference_mode(False)
    @torch.no_grad()
    def capture(self, buckets: list[int]) -> None:
        """CUDA: one graph of `decode` per batch size in `buckets`, warmed up first (moshi compiles
        and cuDNN picks its kernels outside capture); every lane is reset afterwards.  Outside
        inference_mode, whatever the caller's: the engine thread writes the graphs' input."""
        device = self._codes.device
        pool = None
        for b in sorted(buckets, reverse=True):  # largest first: the smaller ones fit in its pool
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode(self._codes[:b])
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                pcm = self._decode(self._codes[:b])
            pool = graph.pool()
            self._graphs[b] = (graph, pcm)
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
        for module, view in views:
            module._streaming_state = view
        pcm = self.mimi.decode(mimi_codes(codes, self.cardinality)[:, :, None])[:, 0].float()
        for obj, name, view in watched:  # an attribute moshi replaced: its value goes back into the view
            value = getattr(obj, name)
            if value is not view:
                view.copy_(value)
                setattr(obj, name, view)
        return pcm

    @torch.no_grad()
    def reset(self, lane: int) -> None:
        """Lane `lane` starts a new stream (as if no frame had been decoded in it)."""
        device = next(self.mimi.parameters()).device
        mask = torch.zeros(self.max_batch, dtype=torch.bool, device=device)
        mask[lane] = True
        self._reset(mask)

    def _reset(self, mask: torch.Tensor) -> None:
        for _, state in self.states:  # in place (moshi's resets are), so captured graphs still see the state
            state.reset(mask)

    @torch.no_grad()
    def move(self, src: int, dst: int) -> None:
        """Lane dst takes over lane src's stream."""
        for _, state in self.states:
            for value in vars(state).values():
                if _is_batch_tensor(value, state.batch_size):
                    value[dst] = value[src]
                elif isinstance(value, RingKVCache):
                    value.cache[:, dst] = value.cache[:, src]
                    value.end_offset[dst] = value.end_offset[src]

    def close(self) -> None:
        self._streaming.close()


def _is_batch_tensor(value, batch_size: int) -> bool:
    # moshi's streaming states keep their per-item tensors batch-first
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size
