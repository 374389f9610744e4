"""The serving engine: one model, many concurrent requests, continuous batching at frame boundaries.

    engine = Engine(tts.model)                     # preallocates, warms up, captures graphs
    stream = engine.submit(frames, mask, max_frames=125, seed=1)
    for frame in stream: ...                       # Frame(codes [32], audio) as they are made

One background thread runs the loop; callers only enqueue requests and read their streams.
Each turn of the loop is a frame boundary:

1. admit waiting requests while a lane and their KV blocks are free (cached prefix blocks are
   matched first, so a prompt that starts like an earlier one skips those positions);
2. prefill up to `prefill_chunk` prompt positions of admitted requests; a request whose prompt is
   prefilled (all but its last row, which the first frame runs) joins the batch;
3. run one frame for every lane (a CUDA graph replay on CUDA), decode every lane's audio in one
   batched streaming Mimi call (when a running request asked for audio), then read the codes --
   the one host sync per frame -- hand the frames to the streams, register completed blocks in the
   prefix cache, and let finished or cancelled requests leave (their lane is refilled at once
   by the last lane, so lanes 0..n-1 are always the running ones).

Each lane keeps its own seed and RNG counter, so a request's codes do not depend on its
neighbours (up to batch-size-dependent float rounding, which the tests check does not flip codes).
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from .generate import check_request
from .graphs import FrameGraphs
from .kv_cache import BlockPool, PagedKV, PoolFull, block_keys
from .fast_model import FastModel, make_ops
from .model import CSMModel
from .scheduler import EngineBusy, EngineStopped, Frame, Request, Stream


@dataclass
class EngineConfig:
    max_batch: int = 0  # lanes; 0: 32 on CUDA, 8 elsewhere
    block_size: int = 16  # positions per KV block (a power of two >= 16 for the Triton kernels)
    num_blocks: int = 0  # KV pool size; 0: from free GPU memory (CUDA) or max_batch full contexts (CPU)
    kv_memory_fraction: float = 0.8  # of the free GPU memory, when num_blocks is 0
    prefill_chunk: int = 512  # prompt positions prefilled per frame boundary
    max_waiting: int = 64  # requests queued for a lane or for KV blocks before submit refuses
    wait_timeout_s: float = 30.0  # how long a queued request waits before it fails with EngineBusy
    ops: str = "auto"  # "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton"
    cuda_graphs: bool = True  # capture frames on CUDA
    compile: bool = False  # CPU: Inductor-compile the depth steps (~1.7x at batch 1; ~13 s per bucket, cold cache)


class Engine:
    def __init__(self, model: CSMModel, config: EngineConfig | None = None, progress: bool = False,
                 codec=None):
        """codec: a `MimiCodec` for requests that ask for audio (decoded in the engine's thread)."""
        config = config or EngineConfig()
        self.model, self.config = model, config
        device = model.audio_head.device
        cuda = device.type == "cuda"
        self.max_batch = config.max_batch or (32 if cuda else 8)
        bs = config.block_size
        self.fast = FastModel(model, make_ops(config.ops, device), self.max_batch, bs,
                              compile=config.compile and not cuda)
        num_blocks = config.num_blocks or self._default_num_blocks(model, bs, cuda)
        self.fast.allocate_kv(num_blocks)
        self.pool = BlockPool(num_blocks, bs)
        self.graphs = FrameGraphs(self.fast.decode_frame, self.max_batch)
        if cuda and config.cuda_graphs:
            self.graphs.capture(progress)
        else:  # warm-up: first-call setup (and compiling) happens here, not in a request's frame
            for n in self.graphs.buckets if config.compile else [1]:
                self.fast.decode_frame(n)
        for lane in range(self.max_batch):
            self.fast.state.clear_lane(lane)
        self.audio = None
        if codec is not None:
            from .codec import LaneDecoder

            self.audio = LaneDecoder(codec, self.max_batch)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._lanes: list[Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.frames_run = 0

    def _default_num_blocks(self, model, bs, cuda) -> int:
        per_seq = -(-model.config.max_seq_len // bs)
        if not cuda:
            return self.max_batch * per_seq
        free, _ = torch.cuda.mem_get_info(model.audio_head.device)
        block = PagedKV.block_bytes(model.config.backbone, bs, model.audio_head.dtype)
        return max(per_seq, int(free * self.config.kv_memory_fraction) // block)

    # ---- caller side ------------------------------------------------------------------------
    def submit(self, frames: torch.Tensor, mask: torch.Tensor, max_frames: int, temperature: float = 0.9,
               topk: int = 50, seed: int = 0, stop_on_eos: bool = True, audio: bool = False) -> Stream:
        """Queue a generation for prompt rows frames, mask [S, n + 1]; returns its Stream at once.
        audio: each frame also carries its samples, decoded in the engine (needs the engine's codec).

        Raises ValueError for a request that can never run (bad settings, a prompt that leaves
        no room in the context, more KV than the whole pool) and EngineBusy when the queue is full.
        """
        frames, mask = frames.long().cpu(), mask.bool().cpu()
        check_request(self.model.config, frames, mask, max_frames, temperature, topk)  # the embedding would clamp ids
        if audio and self.audio is None:
            raise ValueError("this engine has no codec to decode audio: build it with Engine(..., codec=...)")
        bs = self.pool.block_size
        if self._blocks_needed(frames.shape[0], max_frames) > self.pool.num_blocks:
            raise ValueError(f"this request needs {self._blocks_needed(frames.shape[0], max_frames)} KV blocks of "
                             f"{bs} positions but the pool has {self.pool.num_blocks}: raise num_blocks")
        keys = block_keys(frames[:-1], mask[:-1], bs)  # the last row always runs in the first frame
        req = Request(frames, mask, max_frames, float(temperature), int(topk), int(seed), stop_on_eos, bool(audio),
                      keys)
        req.stream = Stream(req, self._wake)
        req.stats.prompt_positions = frames.shape[0]
        with self._cond:
            if self._closed:
                raise EngineStopped("the engine is closed")
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting (max_waiting="
                                 f"{self.config.max_waiting}); retry later")
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="misotts-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return req.stream

    def generate(self, frames, mask, max_frames: int, **kwargs) -> torch.Tensor:
        """All frames of one request: codes [T, num_codebooks]."""
        return self.submit(frames, mask, max_frames, **kwargs).codes()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no request is queued or running (True), or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._waiting or self._prefilling or self._lanes:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                    return False
        return True

    def close(self) -> None:
        """Stop the loop; requests still queued or running end with EngineStopped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self.audio is not None:
            self.audio.close()

    def stats(self) -> dict:
        return {"ops": self.fast.ops.name, "graphs": len(self.graphs.graphs),
                "reused_positions": self.pool.reused_positions, "computed_positions": self.pool.computed_positions,
                "frames_run": self.frames_run, "running": len(self._lanes), "waiting": len(self._waiting),
                "blocks_total": self.pool.num_blocks, "blocks_available": self.pool.available(),
                "blocks_cached": len(self.pool.block_of)}

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _blocks_needed(self, prompt_len: int, max_frames: int) -> int:
        # positions written: the prompt, then every frame but the last is fed back
        return -(-(prompt_len + max_frames - 1) // self.pool.block_size)

    # ---- the loop (engine thread only) --------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    break
                self._admit()
                if not (self._prefilling or self._lanes):
                    self._cond.notify_all()  # wake wait_idle()
                    self._cond.wait(timeout=0.05 if self._waiting else None)
                    continue
            try:
                self._prefill()
                if self._lanes:
                    self._frame()
            except Exception as err:  # noqa: BLE001 -- the requests in flight get the error; the loop goes on
                self._fail([*self._prefilling, *self._lanes], err)
        with self._cond:
            for req in [*self._waiting, *self._prefilling, *self._lanes]:
                self._finish(req, "error", EngineStopped("the engine was closed"))
            self._waiting.clear()
            self._cond.notify_all()

    def _fail(self, requests, err: Exception) -> None:
        """A step failed: the requests it served end with the error; the engine goes on."""
        print(f"misotts engine: {type(err).__name__}: {err}", file=sys.stderr)
        for req in requests:
            self._finish(req, "error", err)

    def _admit(self) -> None:
        now = time.perf_counter()
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                self._finish(req, "cancelled")
                continue
            waited = now - req.submitted
            if len(self._lanes) + len(self._prefilling) < self.max_batch:
                cached = self.pool.match(req.keys)
                fresh = self._blocks_needed(req.prompt_len, req.max_frames) - len(cached)
                try:
                    req.blocks = self.pool.allocate(cached, fresh)
                except PoolFull:
                    pass
                else:
                    self._waiting.popleft()
                    req.prefilled = len(cached) * self.pool.block_size
                    req.stats.wait_s = waited
                    req.stats.reused_positions = req.prefilled
                    req.stats.computed_positions = req.prompt_len - req.prefilled
                    self.pool.reused_positions += req.stats.reused_positions
                    self.pool.computed_positions += req.stats.computed_positions
                    self._prefilling.append(req)
                    continue
            if waited > self.config.wait_timeout_s:
                self._waiting.popleft()
                self._finish(req, "error", EngineBusy(
                    f"no room after waiting {waited:.1f} s: {len(self._lanes)} requests running (max_batch "
                    f"{self.max_batch}), {self.pool.available()} of {self.pool.num_blocks} KV blocks free, "
                    f"{self._blocks_needed(req.prompt_len, req.max_frames)} needed; retry later or raise "
                    f"max_batch / num_blocks / wait_timeout_s"))
                continue
            break  # first come, first served: later requests wait behind the head

    def _prefill(self) -> None:
        budget = self.config.prefill_chunk
        while self._prefilling and budget > 0:
            req = self._prefilling[0]
            if req.cancelled:
                self._prefilling.pop(0)
                self._finish(req, "cancelled")
                continue
            end = min(req.prompt_len - 1, req.prefilled + budget)
            try:
                if end > req.prefilled:
                    self.fast.prefill(req.frames[req.prefilled:end], req.mask[req.prefilled:end], req.prefilled,
                                      req.blocks)
                    budget -= end - req.prefilled
                    self._register_blocks(req, req.prefilled, end)
                    req.prefilled = end
                if req.prefilled == req.prompt_len - 1:
                    lane = len(self._lanes)
                    self.fast.state.set_lane(lane, req.frames[-1], req.mask[-1], req.prompt_len - 1,
                                             req.blocks, req.seed, req.temperature, req.topk)
                    if self.audio is not None:
                        self.audio.reset(lane)
                    self._lanes.append(req)
                    self._prefilling.pop(0)
            except Exception as err:  # noqa: BLE001 -- this request fails, the others go on
                self._fail([req], err)

    def _register_blocks(self, req: Request, start: int, end: int) -> None:
        """Key the blocks completed by writing positions start..end-1 (keys chain from block 0)."""
        bs = self.pool.block_size
        for i in range(start // bs, end // bs):
            if i == len(req.keys):  # a block that ends after the prompt: key it from its rows
                frames, mask = req.rows(i * bs, (i + 1) * bs)
                req.keys += block_keys(frames, mask, bs, parent=req.keys[-1] if req.keys else b"")
            key = req.keys[i]
            self.pool.register(req.blocks[i], key)

    def _frame(self) -> None:
        n = len(self._lanes)
        bucket = self.graphs.run(n)
        audio = None
        if self.audio is not None and any(req.audio for req in self._lanes):
            audio = self.audio.decode(self.fast.state.codes[:bucket])[:n].to("cpu")
        codes = self.fast.state.codes[:n].to("cpu", copy=True)  # the one host sync of a frame
        self.frames_run += 1
        now, finished = time.perf_counter(), []
        for lane, req in enumerate(self._lanes):
            position = req.prompt_len - 1 + len(req.generated)  # the row this frame ran
            frame = codes[lane]
            req.generated.append(frame)
            if (position + 1) % self.pool.block_size == 0:
                self._register_blocks(req, position, position + 1)
            if req.cancelled:
                finished.append((lane, "cancelled"))
                continue
            if req.stop_on_eos and not frame.any():
                finished.append((lane, "eos"))
                continue
            if req.stats.frames == 0:
                req.stats.first_frame_s = now - req.submitted
            req.stats.frames += 1
            req.stream._put(Frame(frame, audio[lane] if req.audio else None))
            if req.stats.frames == req.max_frames:
                finished.append((lane, "max_frames"))
        for lane, reason in reversed(finished):  # highest lane first, so moves never touch a finished lane
            self._finish(self._lanes[lane], reason)

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        """End a request wherever it is: free its lane and blocks, close its stream (even if the
        device fails meanwhile: a caller never waits forever)."""
        try:
            if req in self._lanes:
                lane, last = self._lanes.index(req), len(self._lanes) - 1
                self._lanes[lane] = self._lanes[last]
                self._lanes.pop()
                if lane != last:
                    self.fast.state.move_lane(last, lane)
                    if self.audio is not None:
                        self.audio.move(last, lane)
                self.fast.state.clear_lane(last)
        finally:
            if req in self._prefilling:
                self._prefilling.remove(req)
            if req.blocks:
                self.pool.release(req.blocks)
                req.blocks = []
            req.stats.finish = reason
            req.stats.total_s = time.perf_counter() - req.submitted
            req.stream._end(error)
