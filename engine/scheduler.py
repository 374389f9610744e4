"""Who runs when: the waiting queue, admission, prefill planning, the running lanes, finishing,
and the prefix cache's bookkeeping.

Host side only, and it never calls the engine: it returns data (nano-vllm's shape).  Each frame
boundary the engine asks `schedule()` for a `Plan` -- lane states to move and clear (lanes left
by finished requests, compacted), then prompt chunks to prefill -- applies it on the device,
tells `prefilled()` which chunks failed and gets back the requests that join the lanes (and
their lanes), enqueues the frame, and -- once the device has made them, which may be after the
next boundary's plan (the engine keeps one frame in flight) -- hands its codes to `postprocess()`
with the lanes the frame ran.  What the callers must be
told -- each frame, and each request's end -- waits in `outbox` for the engine to hand out.

- admission is first come, first served: the head of the queue takes a lane and its KV blocks
  (cached prefix blocks first) or everyone behind it waits; a request that waits longer than
  `wait_timeout_s` fails with EngineBusy;
- prefill takes up to `prefill_chunk` prompt positions per frame boundary, oldest request first,
  all of them in one call; a request whose prompt is written joins the lanes, and its first
  frame starts from the prefill's last hidden state (the backbone runs its last row once);
- lanes 0..n-1 are always the running requests: a request that leaves is replaced by the last.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from misotts.runtime.frames import Frame, frame_ends

from .kv_cache import BlockPool, PoolFull, block_keys
from .requests import EngineBusy, Request


@dataclass
class Chunk:
    """Prompt positions start..end-1 of `req` to prefill (end > start: a prompt's last row is
    always prefilled, so a request never joins without a chunk)."""

    req: Request
    start: int
    end: int


@dataclass
class Plan:
    """One frame boundary's device work, in the order the engine applies it."""

    moves: list[tuple[int, int]] = field(default_factory=list)  # (src, dst): lane dst takes over src's state
    clears: list[int] = field(default_factory=list)  # lanes to make padding, after the moves
    prefill: list[Chunk] = field(default_factory=list)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch: int, max_waiting: int, wait_timeout_s: float,
                 prefill_chunk: int):
        self.pool = pool
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.wait_timeout_s, self.prefill_chunk = wait_timeout_s, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.lanes: list[Request] = []
        self.outbox: list[tuple[Request, object]] = []  # (request, a Frame | None: the end | the error), in order
        self._moves: list[tuple[int, int]] = []  # lane work decided since the last plan
        self._clears: list[int] = []

    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.lanes)

    def working(self) -> bool:
        """Something to prefill, a frame to run, or lane states to move or clear."""
        return bool(self.prefilling or self.lanes or self._moves or self._clears)

    def blocks_needed(self, prompt_len: int, max_frames: int) -> int:
        # positions written: the prompt, then every frame but the last is fed back
        return -(-(prompt_len + max_frames - 1) // self.pool.block_size)

    def enqueue(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise EngineBusy(f"{len(self.waiting)} requests are already waiting (max_waiting="
                             f"{self.max_waiting}); retry later")
        self.waiting.append(req)

    def admit(self) -> None:
        now = time.perf_counter()
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                self.finish(req, "cancelled")
                continue
            waited = now - req.submitted
            try:
                admitted = len(self.lanes) + len(self.prefilling) < self.max_batch and self._take_blocks(req)
            except Exception as err:  # noqa: BLE001 -- this request fails, the queue goes on
                self.waiting.popleft()
                self.finish(req, "error", err)
                continue
            if admitted:
                self.waiting.popleft()
                req.stats.wait_s = waited
                self.prefilling.append(req)
                continue
            if waited > self.wait_timeout_s:
                self.waiting.popleft()
                self.finish(req, "error", EngineBusy(
                    f"no room after waiting {waited:.1f} s: {len(self.lanes)} requests running (max_batch "
                    f"{self.max_batch}), {self.pool.available()} of {self.pool.num_blocks} KV blocks free, "
                    f"{self.blocks_needed(req.prompt_len, req.max_frames)} needed; retry later or raise "
                    f"max_batch / num_blocks / wait_timeout_s"))
                continue
            break  # first come, first served: later requests wait behind the head

    def _take_blocks(self, req: Request) -> bool:
        cached = self.pool.match(req.keys)
        try:
            req.blocks = self.pool.allocate(cached, self.blocks_needed(req.prompt_len, req.max_frames) - len(cached))
        except PoolFull:
            return False
        req.prefilled = len(cached) * self.pool.block_size
        req.stats.reused_positions = req.prefilled
        req.stats.computed_positions = req.prompt_len - req.prefilled
        self.pool.reused_positions += req.stats.reused_positions
        self.pool.computed_positions += req.stats.computed_positions
        return True

    def schedule(self) -> Plan:
        """This boundary's plan: the lane moves and clears decided since the last one, and up to
        `prefill_chunk` prompt positions of the oldest requests being prefilled."""
        plan, self._moves, self._clears = Plan(self._moves, self._clears), [], []
        budget = self.prefill_chunk
        for req in list(self.prefilling):
            if budget <= 0:
                break
            if req.cancelled:
                self.finish(req, "cancelled")
                continue
            end = min(req.prompt_len, req.prefilled + budget)
            plan.prefill.append(Chunk(req, req.prefilled, end))
            budget -= end - req.prefilled
        return plan

    def prefilled(self, plan: Plan, failed: dict) -> list[tuple[int, Request]]:
        """The engine wrote `plan`'s chunks but those of the requests in `failed` ({request:
        error}; they fail alone).  Returns the requests whose prompt is now written, each with
        the lane it joins: the engine sets them up on the device before the frame."""
        joins = []
        for chunk in plan.prefill:
            req = chunk.req
            if req in failed:
                self.finish(req, "error", failed[req])
                continue
            try:
                self._register_blocks(req, chunk.start, chunk.end)
            except Exception as err:  # noqa: BLE001 -- this request fails, the others go on
                self.finish(req, "error", err)
                continue
            req.prefilled = chunk.end
            if req.prefilled == req.prompt_len:
                joins.append((len(self.lanes), req))
                self.lanes.append(req)
                self.prefilling.remove(req)
        return joins

    def postprocess(self, lanes: list[Request], codes, audio, codes_at: float | None = None,
                    audio_at: float | None = None) -> None:
        """A frame ran `lanes` (the requests in lanes 0..n-1 when it was enqueued) and made codes
        [n, num_codebooks] (CPU) and audio [n, samples] or None, on the host at perf_counter times
        codes_at and audio_at (default: now).  The frames go to the outbox, the blocks they
        complete are keyed, finished requests leave (their ends to the outbox, their lanes
        compacted by the next plan's moves and clears).  A request that ended since the frame was
        enqueued is skipped: with a frame in flight, one frame runs past every end."""
        now = time.perf_counter()
        codes_at = now if codes_at is None else codes_at
        audio_at = codes_at if audio_at is None else audio_at
        # Which lanes end their generation, for all lanes at once (per-lane tensor ops cost the host µs each).
        ends = frame_ends(codes, [len(r.generated) for r in lanes], [r.params.stop_on_eos for r in lanes])
        finished = []
        rows = codes.unbind(0)  # one call for every lane's view (indexing lane by lane costs µs each)
        pcm = audio.unbind(0) if audio is not None else None
        for lane, (req, end) in enumerate(zip(lanes, ends)):
            if req.stats.finish:  # ended after this frame was enqueued: its work here is void
                continue
            if isinstance(end, Exception):  # a non-finite frame: its KV is not worth keying either
                finished.append((req, end))
                continue
            frame = rows[lane]
            req.generated.append(frame)
            if req.cancelled:
                finished.append((req, "cancelled"))
                continue
            if end:
                finished.append((req, end))
                continue
            if req.stats.frames == 0:
                req.stats.first_frame_s = codes_at - req.submitted
                req.stats.audio_ready_s = (audio_at if req.audio else codes_at) - req.submitted
            req.stats.frames += 1
            self.outbox.append((req, Frame(frame, pcm[lane] if req.audio else None)))
            if req.stats.frames == req.max_frames:
                finished.append((req, "max_frames"))
        # Highest lane first, so that a move never carries a lane that leaves in this same frame.
        finished.sort(key=lambda item: self.lanes.index(item[0]), reverse=True)
        for req, reason in finished:
            if isinstance(reason, Exception):
                self.finish(req, "error", reason)
            else:
                # The blocks its frames filled are keyed once, as it ends (not one block at a time
                # on the per-frame path): frame g >= 1 wrote the row of frame g - 1, so the KV
                # written is the prompt and all generated frames but the last.
                self._register_blocks(req, req.prompt_len, req.prompt_len - 1 + len(req.generated))
                self.finish(req, reason)

    def _register_blocks(self, req: Request, start: int, end: int) -> None:
        """Key the blocks completed by writing positions start..end-1 (keys chain from block 0)."""
        bs = self.pool.block_size
        first, last = start // bs, end // bs
        if last > len(req.keys):  # blocks that end after the prompt's keys: key them from their rows, in one call
            frames, mask = req.rows(len(req.keys) * bs, last * bs)
            req.keys += block_keys(frames, mask, bs, parent=req.keys[-1] if req.keys else b"")
        for i in range(first, last):
            self.pool.register(req.blocks[i], req.keys[i])

    def finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        """End a request wherever it is: free its lane (the last lane's request takes it: a move
        and a clear for the next plan) and blocks; its end goes to the outbox."""
        if req in self.lanes:
            lane, last = self.lanes.index(req), len(self.lanes) - 1
            self.lanes[lane] = self.lanes[last]
            self.lanes.pop()
            if lane != last:
                self._moves.append((last, lane))
            self._clears.append(last)
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)
        if req.blocks:
            self.pool.release(req.blocks)
            req.blocks = []
        req.stats.finish = reason
        req.stats.total_s = time.perf_counter() - req.submitted
        self.outbox.append((req, error))

    def drop_in_flight(self, error: BaseException) -> None:
        """A step failed: fail every request being prefilled or run, and clear every lane in the
        next plan (what the device holds for them is not to be trusted)."""
        for req in [*self.prefilling, *self.lanes]:
            self.finish(req, "error", error)
        self._moves, self._clears = [], list(range(self.max_batch))

    def drop_all(self, error: BaseException) -> None:
        """Fail every request, queued ones too (the loop is ending: no plan follows)."""
        for req in [*self.waiting, *self.prefilling, *self.lanes]:
            self.finish(req, "error", error)
        self._moves, self._clears = [], []

    def take_outbox(self) -> list[tuple[Request, object]]:
        out, self.outbox = self.outbox, []
        return out
