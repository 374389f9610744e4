"""Who runs when: the waiting queue, admission, prefill planning, the running lanes, finishing,
and the prefix cache's bookkeeping.

Host side only.  The device work that a decision implies -- a request taking a lane, a lane's
state moving when lanes are compacted, a lane cleared -- goes through `lane_ops` (the engine's
model runner and audio decoder), so this file reads as the policy:

- admission is first come, first served: the head of the queue takes a lane and its KV blocks
  (cached prefix blocks first) or everyone behind it waits; a request that waits longer than
  `wait_timeout_s` fails with EngineBusy;
- prefill takes up to `prefill_chunk` prompt positions per frame boundary, oldest request first;
  a request whose prompt is written (all but its last row, which its first frame runs) joins
  the lanes;
- lanes 0..n-1 are always the running requests: a request that leaves is replaced by the last.
"""
from __future__ import annotations

import time
from collections import deque

from misotts.runtime.frames import Frame, frame_end

from .kv_cache import BlockPool, PoolFull, block_keys
from .requests import EngineBusy, Request


class Scheduler:
    def __init__(self, pool: BlockPool, lane_ops, max_batch: int, max_waiting: int, wait_timeout_s: float,
                 prefill_chunk: int):
        self.pool, self.lane_ops = pool, lane_ops
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.wait_timeout_s, self.prefill_chunk = wait_timeout_s, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.lanes: list[Request] = []

    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.lanes)

    def working(self) -> bool:
        """Something to prefill or a frame to run."""
        return bool(self.prefilling or self.lanes)

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

    def prefill(self, run) -> None:
        """Plan this boundary's prefill and have `run(req, start, end)` write each chunk's KV."""
        budget = self.prefill_chunk
        while self.prefilling and budget > 0:
            req = self.prefilling[0]
            if req.cancelled:
                self.finish(req, "cancelled")
                continue
            end = min(req.prompt_len - 1, req.prefilled + budget)
            try:
                if end > req.prefilled:
                    run(req, req.prefilled, end)
                    budget -= end - req.prefilled
                    self._register_blocks(req, req.prefilled, end)
                    req.prefilled = end
                if req.prefilled == req.prompt_len - 1:
                    self.lane_ops.join(len(self.lanes), req)
                    self.lanes.append(req)
                    self.prefilling.pop(0)
            except Exception as err:  # noqa: BLE001 -- this request fails, the others go on
                self.finish(req, "error", err)

    def frame_done(self, codes, audio) -> None:
        """Lanes 0..n-1 made codes [n, num_codebooks] (CPU) and audio [n, samples] or None: hand
        out the frames, key the blocks they complete, let finished requests leave."""
        now, finished = time.perf_counter(), []
        for lane, req in enumerate(self.lanes):
            position = req.prompt_len - 1 + len(req.generated)  # the row this frame ran
            frame = codes[lane]
            end = frame_end(frame, len(req.generated), req.params.stop_on_eos)
            if isinstance(end, Exception):  # a non-finite frame: its KV is not worth keying either
                finished.append((lane, end))
                continue
            req.generated.append(frame)
            if (position + 1) % self.pool.block_size == 0:
                self._register_blocks(req, position, position + 1)
            if req.cancelled:
                finished.append((lane, "cancelled"))
                continue
            if end:
                finished.append((lane, end))
                continue
            if req.stats.frames == 0:
                req.stats.first_frame_s = now - req.submitted
            req.stats.frames += 1
            req.stream._put(Frame(frame, audio[lane] if req.audio else None))
            if req.stats.frames == req.max_frames:
                finished.append((lane, "max_frames"))
        for lane, reason in reversed(finished):  # highest lane first, so moves never touch a finished lane
            if isinstance(reason, Exception):
                self.finish(self.lanes[lane], "error", reason)
            else:
                self.finish(self.lanes[lane], reason)

    def _register_blocks(self, req: Request, start: int, end: int) -> None:
        """Key the blocks completed by writing positions start..end-1 (keys chain from block 0)."""
        bs = self.pool.block_size
        for i in range(start // bs, end // bs):
            if i == len(req.keys):  # a block that ends after the prompt: key it from its rows
                frames, mask = req.rows(i * bs, (i + 1) * bs)
                req.keys += block_keys(frames, mask, bs, parent=req.keys[-1] if req.keys else b"")
            self.pool.register(req.blocks[i], req.keys[i])

    def finish(self, req: Request, reason: str, error: BaseException | None = None, device: bool = True) -> None:
        """End a request wherever it is: free its lane and blocks, close its stream (even if the
        device fails meanwhile: a caller never waits forever).  device=False: host bookkeeping
        only, the lane's device state is left as it is (the caller clears it, or the engine stops)."""
        try:
            if req in self.lanes and not device:
                self.lanes.remove(req)
            elif req in self.lanes:
                lane, last = self.lanes.index(req), len(self.lanes) - 1
                self.lanes[lane] = self.lanes[last]
                self.lanes.pop()
                if lane != last:
                    self.lane_ops.move(last, lane)
                self.lane_ops.clear(last)
        finally:
            if req in self.waiting:
                self.waiting.remove(req)
            if req in self.prefilling:
                self.prefilling.remove(req)
            if req.blocks:
                self.pool.release(req.blocks)
                req.blocks = []
            req.stats.finish = reason
            req.stats.total_s = time.perf_counter() - req.submitted
            req.stream._end(error)

    def drop_in_flight(self, error: BaseException) -> None:
        """Fail every request being prefilled or run, touching no device memory (a failed step:
        the device may be unusable)."""
        for req in [*self.prefilling, *self.lanes]:
            self.finish(req, "error", error, device=False)

    def drop_all(self, error: BaseException) -> None:
        """Fail every request, queued ones too (the loop is ending), touching no device memory."""
        for req in [*self.waiting, *self.prefilling, *self.lanes]:
            self.finish(req, "error", error, device=False)
