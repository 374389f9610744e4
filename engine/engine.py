"""The serving engine: one model, many concurrent requests, continuous batching at frame boundaries.

    engine = Engine(tts.model)                     # preallocates, warms up, captures graphs
    stream = engine.submit(frames, mask, GenerationParams(max_audio_ms=10_000, seed=1))
    for frame in stream: ...                       # Frame(codes [32], audio) as they are made

One background thread runs the loop; callers only enqueue requests and read their streams.
Each turn of the loop is a frame boundary (nano-vllm's schedule -> run -> postprocess):

1. the scheduler admits waiting requests while a lane and their KV blocks are free (cached
   prefix blocks are matched first, so a prompt that starts like an earlier one skips those
   positions) and returns a `Plan`: lane states to move and clear (lanes left by finished
   requests, compacted so that lanes 0..n-1 are always the running ones) and prompt chunks to
   prefill (up to `prefill_chunk` positions);
2. the engine applies the plan on the device -- every chunk in one varlen prefill call -- and the
   requests whose prompt is written join the lanes the scheduler gives them (their prefill ran
   their last row too: a frame of lanes that all just joined is the depth decoder alone);
3. one frame for every lane is enqueued (a CUDA graph replay on CUDA), the copy of its codes to
   pinned host memory behind an event, and on the audio stream the lanes' batched streaming Mimi
   call (when a running request asked for audio) with its copy behind another event;
4. the previous frame is read -- the host waits only for its events, while the device runs the
   frame just enqueued (`pipelined`, the default on CUDA; otherwise the frame just enqueued) --
   and `postprocess` decides who ends; the engine hands the frames and ends in its outbox to the
   streams.

The scheduler (`scheduler.py`) is host-side policy that returns data and never calls the engine;
the device side is `model_runner.py` (prefill and the batched frame), `graphs.py` (one CUDA
graph per batch-size bucket), `kv_cache.py` (the paged pool) and `audio.py` (the lanes' Mimi
decode); this file is the thread, `submit`, and the plan applied.

Nothing a request carries stops the loop: a bad request is refused by `submit`, a failing step
fails the requests it served (by host bookkeeping alone: after a device fault the device may not
answer) and the lanes are cleared before the next step.  Only a device that cannot be used any
more stops the engine; then every stream, `submit` and `health()` say why (docs/engine.md,
"Failing cleanly").

Each lane keeps its own seed and RNG counter, so a request's codes do not depend on its
neighbours (up to batch-size-dependent float rounding, which the tests check does not flip codes).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from misotts.runtime.frames import Frame
from misotts.runtime.generate import check_request
from misotts.runtime.params import GenerationParams
from misotts.runtime.sampling import is_integer, is_real
from misotts.runtime.model import CSMModel

from .graphs import FrameGraphs
from .kv_cache import BlockPool, PagedKV, block_keys
from .model_runner import LaneSetup, ModelRunner
from .ops import make_ops
from misotts.weights.quantize import quantization
from .requests import EngineStopped, Request, Stream, wake_readers
from .scheduler import Plan, Scheduler

_log = logging.getLogger("misotts.engine")

IDLE_WAIT_S = 0.5  # an idle loop looks again this often (and lets go of its engine meanwhile)
CLOSE_JOIN_S = 10.0  # how long close() (and exit) waits for the engine thread to end its turn


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
    compile: bool = False  # CPU: Inductor-compile the depth steps (faster frames, slower load: docs/bench.md)
    # Keep one frame in flight: frame t+1 is enqueued before the host reads frame t's codes, so the
    # device never waits on the host.  None: on CUDA only (a CPU runs ops as they are enqueued:
    # nothing would overlap, and each frame would reach its caller one frame later).
    pipelined: bool | None = None

    @classmethod
    def reference(cls, max_seq_len: int, block_size: int = 16) -> "EngineConfig":
        """What `backend="reference"` serves with: one lane, the torch ops (the references in
        misotts.kernels.reference), no CUDA graphs, a pool of one full context."""
        return cls(max_batch=1, ops="torch", cuda_graphs=False, block_size=block_size,
                   num_blocks=-(-max_seq_len // block_size))

    def __post_init__(self):
        """Refuse a bad setting here, with its name, not deep inside torch or as a spinning loop."""
        for name, low in (("max_batch", 0), ("block_size", 1), ("num_blocks", 0), ("prefill_chunk", 1),
                          ("max_waiting", 1)):
            _check_int(name, getattr(self, name), low)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        fraction = self.kv_memory_fraction
        if not is_real(fraction) or not 0 < fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {fraction!r}")
        if not is_real(self.wait_timeout_s) or not 0 <= self.wait_timeout_s < math.inf:
            raise ValueError(f"wait_timeout_s must be a finite number of seconds >= 0, got {self.wait_timeout_s!r}")
        if self.ops not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown ops {self.ops!r}: expected 'auto', 'torch' or 'triton'")
        for name in ("cuda_graphs", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.pipelined is not None and not isinstance(self.pipelined, bool):
            raise ValueError(f"pipelined must be True, False or None (auto), got {self.pipelined!r}")


def _check_int(name: str, value, low: int) -> None:
    if not is_integer(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# Engines whose thread may be running: closed at exit, so that no thread runs torch ops while the
# interpreter tears down (that aborted the process: "terminate called without an active exception").
_open_engines: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_open_engines):
        engine.close()


class _Wakeup:
    """The engine's lock and the flag that tells its idle thread there is news (a request, a
    cancel, close): the thread waits on it without holding the engine, so a dropped engine can be
    collected."""

    def __init__(self):
        self.cond = threading.Condition()
        self.news = False

    def notify(self) -> None:  # with cond held
        self.news = True
        self.cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self.cond:
            if not self.news:
                self.cond.wait(timeout)
            self.news = False


@contextlib.contextmanager
def _on_stream(stream):
    if stream is None:
        yield
        return
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        yield


def _serve(engine_ref: weakref.ref, wakeup: _Wakeup) -> None:
    """The engine thread: turns of the loop while the engine exists and is open.  It holds the
    engine only during a turn, so an engine nobody uses any more is freed and its thread ends."""
    engine = engine_ref()
    if engine is None:
        return
    on_device = engine.on_device()  # the model's device and the engine's stream, for the thread's life
    del engine
    with on_device:
        while True:
            engine = engine_ref()
            if engine is None:
                return
            wait = engine._turn()
            del engine
            if wait is None:
                return
            if wait > 0:
                wakeup.wait(wait)


def prefill_warmup_lengths(block_size: int, fused_rows: int) -> list[int]:
    """Prompt chunk lengths whose prefill meets every kernel variant a request can: Triton
    specialises integer arguments on == 1 and on divisibility by 16, the fused norm + GEMV takes its
    row tile from the rows (16, 32, 64: one length of each tile on either side of 16's multiples),
    and past `fused_rows` rows rmsnorm + cuBLAS take over."""
    top, lengths, tile = max(block_size, fused_rows), {1}, 16
    while tile <= top:
        lengths |= {3 if tile == 16 else tile // 2 + 1, tile}
        tile *= 2
    return sorted(lengths | {top + 1, top + 16})


def default_pipelined(cuda: bool) -> bool:
    """Whether the loop keeps a frame in flight when EngineConfig.pipelined is not set."""
    return cuda


def default_max_batch(cuda: bool) -> int:
    """Lanes when EngineConfig.max_batch is not set."""
    return 32 if cuda else 8


class Engine:
    def __init__(self, model: CSMModel, config: EngineConfig | None = None, progress: bool = False,
                 codec=None, runner=None):
        """codec: a `MimiCodec`, or a function that makes one, for requests that ask for audio
        (decoded in the engine's thread); made and set up at the first such request.
        runner: what does the device work instead of a `ModelRunner` of `model` (same methods);
        the host-cost bench (bench/host.py) drives the real loop over one that does none."""
        config = config or EngineConfig()
        self.model, self.config = model, config
        device = model.audio_head.device
        cuda = device.type == "cuda"
        self.max_batch = config.max_batch or default_max_batch(cuda)
        bs = config.block_size
        if runner is None:
            ops = make_ops(config.ops, device, quantized=quantization(model) is not None)
            runner = ModelRunner(model, ops, self.max_batch, bs, compile=config.compile and not cuda)
        self.runner = runner
        num_blocks = config.num_blocks or self._default_num_blocks(model, bs, cuda)
        self.runner.allocate_kv(num_blocks)
        self.pool = BlockPool(num_blocks, bs)
        self.graphs = FrameGraphs(self.runner.decode_frame, self.max_batch)
        # The engine's device work runs on its own stream, with the model's device current (Triton
        # launches on the current device and stream, whatever its tensors' device); the lanes' Mimi
        # decode on another, so that frame t's audio is decoded while frame t+1 runs.
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.audio_stream = torch.cuda.Stream(device) if cuda else None
        self.pipelined = default_pipelined(cuda) if config.pipelined is None else config.pipelined
        # Per in-flight slot (two: the frame being read and the one running): the frame's codes on
        # the device (what its Mimi decode reads) and on the host (pinned: copied without a sync).
        codes = self.runner.state.codes
        with torch.inference_mode(False):  # plain tensors, whatever the caller's mode: the engine thread writes them
            self._codes_dev = [torch.zeros_like(codes) for _ in range(2)]
            self._codes_host = [torch.zeros(codes.shape, dtype=codes.dtype, pin_memory=cuda) for _ in range(2)]
        self._audio_host: list[torch.Tensor] = []  # the same for the audio, made with the decoder
        self._inflight: deque[_InFlight] = deque()
        self.frames_enqueued = 0
        with self.on_device():
            self._warm_up(progress)
            self._clear_lanes()
        self._codec, self.audio = codec, None
        self.scheduler = Scheduler(self.pool, self.max_batch, config.max_waiting, config.wait_timeout_s,
                                   config.prefill_chunk)
        self._wakeup = _Wakeup()
        self._cond = self._wakeup.cond  # guards the scheduler's queues
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopped: BaseException | None = None  # why the loop ended, once it has
        self.frames_run = 0
        _open_engines.add(self)

    def on_device(self):
        """The model's device and the engine's stream made current (a no-op off CUDA)."""
        return _on_stream(self.stream)

    def _warm_up(self, progress: bool) -> None:
        """Every kernel a request can launch is compiled (and cuBLAS has picked its kernels) before
        the first request: prefill at a few chunk lengths into the scratch block, then the frame
        (captured as CUDA graphs, or run once per bucket when compiling, else once)."""
        n, scratch, bs = self.model.config.num_codebooks, self.runner.kv.scratch_block, self.pool.block_size

        def chunk(length: int) -> tuple:
            return (torch.zeros(length, n + 1, dtype=torch.long), torch.zeros(length, n + 1, dtype=torch.bool), 0,
                    [scratch] * -(-length // bs))

        for length in prefill_warmup_lengths(bs, self.runner.ops.fused_rows):
            self.runner.prefill_many([chunk(length)])
        self.runner.prefill_many([chunk(1), chunk(bs + 1)])  # several sequences: the varlen metadata
        if self.stream is not None and self.config.cuda_graphs:
            self.graphs.capture(progress)  # both frames: whole, and depth-only
        elif self.config.compile:
            self._compile_buckets(progress)
        else:
            self.runner.decode_frame(1)  # (the depth-only frame runs a subset of its kernels)
        if self.stream is not None:
            self.stream.synchronize()

    def _compile_buckets(self, progress: bool) -> None:
        """Run the frame once per batch bucket, so Inductor compiles each shape now (tens of
        seconds on a CPU), with a line per bucket on stderr when progress is on."""
        buckets, start = self.graphs.buckets, time.perf_counter()
        for i, b in enumerate(buckets):
            if progress:
                print(f"\rcompiling the depth step with Inductor: batch {b:>3} ({i + 1}/{len(buckets)}), "
                      f"{time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)
            self.runner.decode_frame(b)
        if progress:
            print(f"\rcompiled the depth step for {len(buckets)} batch size{'s' * (len(buckets) > 1)} in {time.perf_counter() - start:.1f} s"
                  + " " * 20, file=sys.stderr)

    def _default_num_blocks(self, model, bs, cuda) -> int:
        per_seq = -(-model.config.max_seq_len // bs)
        if not cuda:
            return self.max_batch * per_seq
        free, _ = torch.cuda.mem_get_info(model.audio_head.device)
        block = PagedKV.block_bytes(model.config.backbone, bs, model.audio_head.dtype)
        return max(per_seq, int(free * self.config.kv_memory_fraction) // block)

    # ---- caller side ------------------------------------------------------------------------
    def submit(self, frames: torch.Tensor, mask: torch.Tensor, params: GenerationParams | None = None,
               audio: bool = False) -> Stream:
        """Queue a generation for prompt rows frames, mask [S, n + 1] with settings `params`
        (default GenerationParams()); returns its Stream at once.
        audio: each frame also carries its samples, decoded in the engine (needs the engine's codec).

        Raises ValueError for a request that can never run (bad settings, a prompt that leaves
        no room in the context, more KV than the whole pool) and EngineBusy when the queue is full.
        """
        self._check_open()
        params = check_request(self.model.config, frames, mask, params or GenerationParams())  # the embedding would clamp ids
        frames, mask, max_frames = frames.long().cpu(), mask.bool().cpu(), params.max_frames
        if audio and self.audio is None:
            self.start_audio()
        bs, needed = self.pool.block_size, self.scheduler.blocks_needed(frames.shape[0], max_frames)
        if needed > self.pool.num_blocks:
            raise ValueError(f"this request needs {needed} KV blocks of {bs} positions but the pool has "
                             f"{self.pool.num_blocks}: raise num_blocks")
        keys = block_keys(frames[:-1], mask[:-1], bs)  # the last row is always prefilled: its hidden state starts the frame
        req = Request(frames, mask, params, bool(audio), keys)
        req.stream = Stream(req, self._wake, self._serving)
        req.stats.prompt_positions = frames.shape[0]
        with self._cond:
            self._check_open()
            self.scheduler.enqueue(req)
            if self._thread is None:
                self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._wakeup),
                                                name="misotts-engine", daemon=True)
                self._thread.start()
            self._wakeup.notify()
        return req.stream

    def _check_open(self) -> None:
        if self._closed:
            raise EngineStopped("the engine is closed")
        if self._stopped is not None:
            raise EngineStopped(f"the engine has stopped: {_describe(self._stopped)}") from self._stopped

    def _serving(self) -> bool:
        """Whether a stream of this engine can still get news (its thread is starting or running)."""
        return self._stopped is None and (self._thread is None or self._thread.is_alive())

    def start_audio(self) -> None:
        """Make the lanes' Mimi decoder now; otherwise the first request for audio does (a codec
        that cannot be had -- offline, say -- then fails that request, not the engine)."""
        if self.audio is not None:
            return
        if self._codec is None:
            raise ValueError("this engine has no codec to decode audio: build it with Engine(..., codec=...)")
        from .audio import LaneDecoder  # moshi loads with the codec, not with the engine

        decoder = LaneDecoder(self._codec() if callable(self._codec) else self._codec, self.max_batch)
        if self.stream is not None and self.config.cuda_graphs:
            with torch.cuda.device(self.stream.device):
                decoder.capture()  # its own buckets (finer than the frame's): Mimi only for live lanes
        cuda = self.stream is not None
        with torch.inference_mode(False):  # plain tensors, whatever the caller's mode: the engine thread writes them
            audio_host = [torch.zeros(self.max_batch, decoder.frame_size, pin_memory=cuda) for _ in range(2)]
        with self._cond:  # every lane of a fresh decoder is reset; lanes that join from now on want it
            if self.audio is None:
                self._audio_host = audio_host
                self.audio, decoder = decoder, None
        if decoder is not None:  # another request made one first
            decoder.close()

    def generate(self, frames, mask, params: GenerationParams | None = None) -> torch.Tensor:
        """All frames of one request: codes [T, num_codebooks]."""
        return self.submit(frames, mask, params).codes()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no request is queued or running (True), or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.scheduler.busy():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, IDLE_WAIT_S))  # timed: a loop that died cannot keep us here
        return True

    def close(self, timeout: float = CLOSE_JOIN_S) -> None:
        """Stop the loop; requests still queued or running end with EngineStopped.  Waits up to
        `timeout` seconds for the thread to end its turn.  Closing twice does nothing more."""
        with self._cond:
            self._closed = True
            self._wakeup.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                _report(f"the engine thread did not stop within {timeout} s (a frame still running)")
                return
        if thread is None:  # never started: nothing runs, nothing queued
            self._stopped = self._stopped or EngineStopped("the engine was closed")
        _open_engines.discard(self)
        self._inflight.clear()
        for stream in (self.stream, self.audio_stream):  # a frame still in flight runs on what is freed below
            if stream is not None:
                try:
                    stream.synchronize()
                except Exception as err:  # noqa: BLE001 -- after a device fault; closing must not raise
                    _report(f"waiting for the device's last frame failed: {_describe(err)}")
        audio, self.audio = self.audio, None
        if audio is not None:
            try:
                audio.close()
            except Exception as err:  # noqa: BLE001 -- after a device fault; closing must not raise (nor at exit)
                _report(f"closing the lanes' decoder failed: {_describe(err)}")
        # The KV pool (by default most of the GPU's free memory) and the graphs' memory go now, not
        # whenever the collector gets to the engine: a closed engine runs nothing more.
        self.graphs.graphs.clear()
        self.runner.release()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self) -> dict:
        """Whether the engine serves: {"ok": bool, "state": "serving" | "closed" | "failed",
        "error": why it stopped (None while ok or when closed by close())}."""
        stopped = self._stopped
        if stopped is None and not self._closed:
            return {"ok": True, "state": "serving", "error": None}
        failed = stopped is not None and not (self._closed and isinstance(stopped, EngineStopped))
        return {"ok": False, "state": "failed" if failed else "closed",
                "error": _describe(stopped) if failed else None}

    def stats(self) -> dict:
        s = self.scheduler
        return {"ops": self.runner.ops.name, "graphs": len(self.graphs.graphs), "pipelined": self.pipelined,
                "reused_positions": self.pool.reused_positions, "computed_positions": self.pool.computed_positions,
                "frames_run": self.frames_run, "running": len(s.lanes), "waiting": len(s.waiting),
                "blocks_total": self.pool.num_blocks, "blocks_available": self.pool.available(),
                "blocks_cached": len(self.pool.block_of)}

    def _wake(self) -> None:
        with self._cond:
            self._wakeup.notify()

    # ---- the loop (engine thread only) --------------------------------------------------------
    def _turn(self) -> float | None:
        """One turn of the loop: a frame boundary.  Returns how long to wait for news before the
        next turn (0: go on at once), or None when the loop has ended.  Nothing a request carries
        ends the loop: a failing step fails the requests it served; only a fault that leaves the
        device unusable (or an exception that is not an Exception) stops the engine, and then
        every stream gets the error."""
        try:
            with self._cond:
                if self._closed:
                    self._stop(EngineStopped("the engine was closed"))
                    return None
                self.scheduler.admit()
                if not self.scheduler.working() and not self._inflight:
                    self._cond.notify_all()  # wake wait_idle()
                    return 0.05 if self.scheduler.waiting else IDLE_WAIT_S
            plan = self.scheduler.schedule()
            # Moving and clearing lane states are small writes that fail only on a device that
            # cannot be used any more (after a failed step they clear every lane): a failure here
            # stops the engine, below.
            self._move_and_clear(plan)
            try:
                enqueued = self.step(plan)
                # Pipelined, the frame just enqueued stays in flight while the host reads the one before.
                while len(self._inflight) > (1 if enqueued and self.pipelined else 0):
                    self._read(self._inflight.popleft())
            except Exception as err:  # noqa: BLE001 -- the requests in flight get the error; the loop goes on
                self._fail_in_flight(err)
            return 0.0
        except BaseException as err:  # noqa: BLE001 -- the device is unusable, or the thread is being torn down
            self._stop(err)
            return None
        finally:
            self._hand_out()

    def _hand_out(self) -> None:
        """Give the streams what the scheduler decided for them: frames, and ends."""
        wakeups = {}
        for req, item in self.scheduler.take_outbox():
            if isinstance(item, Frame):
                req.stream._put(item, wakeups)
            else:
                req.stream._end(item, wakeups)
        wake_readers(wakeups)

    def _fail_in_flight(self, err: Exception) -> None:
        """A step failed: its requests get the error.  Host bookkeeping only -- after a sticky
        device fault (illegal address, device-side assert) any device op raises again -- and the
        next plan clears every lane, where a failure stops the engine.  Frames in flight are
        dropped unread (their requests have failed)."""
        _report(f"a step failed, its requests get the error: {_describe(err)}")
        self._inflight.clear()
        with self._cond:
            self.scheduler.drop_in_flight(err)

    def _clear_lanes(self) -> None:
        for lane in range(self.max_batch):
            self.runner.state.clear_lane(lane)

    def _stop(self, err: BaseException) -> None:
        """The loop ends: every request still queued or running gets EngineStopped (host only)."""
        stopped = err if isinstance(err, EngineStopped) else EngineStopped(f"the engine has stopped: {_describe(err)}")
        if stopped is not err:
            stopped.__cause__ = err
            _report(f"the engine has stopped: {_describe(err)}")
        self._inflight.clear()
        with self._cond:
            self.scheduler.drop_all(stopped)
            self._hand_out()
            self._stopped = err  # after the streams have the error: a reader that sees it finds it there
            self._cond.notify_all()

    # ---- a frame boundary: the scheduler's plan applied on the device ---------------------------
    def step(self, plan: Plan) -> bool:
        """Prefill the plan's chunks in one call (a chunk that fails fails its request alone), set
        up the requests that join, then enqueue one frame for every lane.  Nothing here waits for
        the device.  Returns whether a frame was enqueued."""
        started = self._mark(timing=True) if plan.prefill else None
        hidden, rows, failed = self._prefill(plan.prefill)
        prefilled = self._mark(timing=True) if plan.prefill else None
        joins = self.scheduler.prefilled(plan, failed)
        if joins:
            self._join(joins, hidden, rows)
        if not self.scheduler.lanes:
            return False
        fresh = len(joins) == len(self.scheduler.lanes)  # every lane's row already run by its prefill
        self._enqueue_frame(fresh, [req for _, req in joins], (started, prefilled))
        return True

    def _prefill(self, chunks: list) -> tuple:
        """The chunks' KV written in one varlen call -> (their last hidden states [k, D], each
        request's row in it, {request: error} of those that failed).  A failing call is retried
        chunk by chunk, so that a request whose chunk cannot run fails alone."""
        if not chunks:
            return None, {}, {}
        work = [(c.req.frames[c.start:c.end], c.req.mask[c.start:c.end], c.start, c.req.blocks) for c in chunks]
        try:
            return self.runner.prefill_many(work), {c.req: i for i, c in enumerate(chunks)}, {}
        except Exception:  # noqa: BLE001 -- find which request's chunk it was
            parts, rows, failed = [], {}, {}
            for c, one in zip(chunks, work):
                try:
                    parts.append(self.runner.prefill_many([one]))
                    rows[c.req] = len(parts) - 1
                except Exception as err:  # noqa: BLE001 -- this request fails, the others go on
                    failed[c.req] = err
            return (torch.cat(parts) if parts else None), rows, failed

    def _mark(self, timing: bool = False):
        """A point on the device's timeline: a CUDA event recorded on the current stream, or on a
        device that runs ops as they come, the host time now."""
        if self.stream is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=timing)
        event.record()
        return event

    @staticmethod
    def _wait(mark) -> float:
        """Block until the device has passed `mark`; returns the host time it was seen passed."""
        if isinstance(mark, float):
            return mark
        mark.synchronize()
        return time.perf_counter()

    def _enqueue_frame(self, fresh: bool, joined: list[Request], prefill_marks: tuple) -> None:
        """Enqueue a frame for every lane, the copy of its codes to the host behind an event, and
        its audio decode on the audio stream behind that event (with its copy behind another)."""
        lanes = list(self.scheduler.lanes)
        n, slot = len(lanes), self.frames_enqueued % 2
        self.graphs.run(n, backbone=not fresh)
        self.frames_enqueued += 1
        codes_dev, codes_host = self._codes_dev[slot][:n], self._codes_host[slot][:n]
        codes_dev.copy_(self.runner.state.codes[:n])
        codes_host.copy_(codes_dev, non_blocking=True)
        codes_done = self._mark()
        audio = self.audio is not None and any(req.audio for req in lanes)
        audio_done = None
        if audio:
            with self._on_audio_stream(codes_done):
                pcm = self.audio.decode(codes_dev)[:n]
                self._audio_host[slot][:n].copy_(pcm, non_blocking=True)
                audio_done = self._mark()
        self._inflight.append(_InFlight(lanes, slot, codes_done, audio_done, joined, prefill_marks))

    def _on_audio_stream(self, after=None):
        """The audio stream made current (CUDA), after the device passes `after` when given."""
        if self.audio_stream is None:
            return contextlib.nullcontext()
        if after is not None:
            self.audio_stream.wait_event(after)
        return torch.cuda.stream(self.audio_stream)

    def _read(self, frame: "_InFlight") -> None:
        """Wait for an in-flight frame's codes (and audio) and hand them to the scheduler."""
        n = len(frame.lanes)
        codes_at = self._wait(frame.codes_done)
        codes = self._codes_host[frame.slot][:n].clone()
        audio = audio_at = None
        if frame.audio_done is not None:
            audio_at = self._wait(frame.audio_done)
            audio = self._audio_host[frame.slot][:n].clone()
        started, prefilled = frame.prefill_marks
        if frame.joined and isinstance(started, torch.cuda.Event):
            # On a GPU the prefill ran after the host enqueued it: its device time belongs to the prefill.
            device_s = started.elapsed_time(prefilled) / 1e3
            for req in frame.joined:
                req.stats.prompt_written_s = min(req.stats.prompt_written_s + device_s, codes_at - req.submitted)
        self.frames_run += 1
        self.scheduler.postprocess(frame.lanes, codes, audio, codes_at, audio_at)

    def _move_and_clear(self, plan: Plan) -> None:
        for src, dst in plan.moves:
            self.runner.state.move_lane(src, dst)
        for lane in plan.clears:
            self.runner.state.clear_lane(lane)
        if self.audio is not None and plan.moves:
            with self._on_audio_stream():
                for src, dst in plan.moves:
                    self.audio.move(src, dst)

    def _join(self, joins: list[tuple[int, Request]], hidden, rows: dict) -> None:
        now = time.perf_counter()
        setups = []
        for lane, req in joins:
            p = req.params
            setups.append(LaneSetup(lane, req.frames[-1], req.mask[-1], req.prompt_len - 1, req.blocks, p.seed,
                                    p.temperature, p.topk, rows[req]))
            req.stats.prompt_written_s = now - req.submitted
        self.runner.state.set_lanes(setups, hidden)
        if self.audio is not None:
            with self._on_audio_stream():
                for lane, _ in joins:
                    self.audio.reset(lane)


@dataclass
class _InFlight:
    """A frame on the device whose codes the host has not read yet."""

    lanes: list[Request]  # the requests in lanes 0..n-1 when it was enqueued
    slot: int  # which of the engine's two code (and audio) buffers it writes
    codes_done: object  # `Engine._mark()`s: its codes on the host, its audio on the host (or None)
    audio_done: object
    joined: list[Request]  # requests whose first frame it is
    prefill_marks: tuple  # marks around the prefill enqueued before it (None, None without one)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _report(message: str) -> None:
    """Log, whatever stderr is: a closed pipe must not turn an engine error into a dead engine."""
    try:
        _log.error("misotts engine: %s", message)
    except Exception:  # noqa: BLE001
        pass
