"""Requests and their streams: what a caller holds while the engine works for it.

A `Request` is one generation: its prompt rows, sampling settings, and where it stands (its
blocks, its lane in the running batch, the frames made so far).  Its `Stream` is the caller's
end: iterate it (threads) or `async for` over it (asyncio) to get a `Frame` (codes, and audio
when asked for) per frame; closing it, breaking out of the loop or cancelling the task cancels
the request, and the engine frees its blocks at the next frame boundary.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from misotts.runtime.frames import RequestStats, stack_codes
from misotts.runtime.params import GenerationParams
from misotts.runtime.prompt import audio_rows


class EngineBusy(RuntimeError):
    """The request could not be served: the waiting queue was full, or no KV blocks freed up in time."""


class EngineStopped(RuntimeError):
    """The engine was closed before the request finished."""


_END = object()
WAIT_POLL_S = 0.1  # a reader waiting for a frame looks this often whether the engine still runs


@dataclass(eq=False)
class Request:
    frames: torch.Tensor  # prompt rows [S, n + 1] (CPU)
    mask: torch.Tensor
    params: GenerationParams  # validated
    audio: bool  # decode each frame to samples in the engine
    keys: list  # chained keys of the prompt's full blocks (kv_cache.block_keys)
    submitted: float = field(default_factory=time.perf_counter)
    blocks: list = field(default_factory=list)
    prefilled: int = 0  # prompt positions whose KV is written
    generated: list = field(default_factory=list)  # codes [n] per frame (CPU), fed back as rows
    cancelled: bool = False
    stats: RequestStats = field(default_factory=RequestStats)
    stream: "Stream" = None

    def __post_init__(self):
        self.max_frames = self.params.max_frames  # read every frame: computed once

    @property
    def prompt_len(self) -> int:
        return self.frames.shape[0]

    def rows(self, start: int, end: int):
        """Backbone rows (frames, mask) of positions start..end-1: prompt rows, then generated frames."""
        s, parts = self.prompt_len, []
        if start < s:
            parts.append((self.frames[start:min(end, s)], self.mask[start:min(end, s)]))
        if end > s:
            parts.append(audio_rows(torch.stack(self.generated[max(start, s) - s:end - s]), end_of_audio=False))
        frames, mask = zip(*parts)
        return torch.cat(frames), torch.cat(mask)


def wake_readers(wakeups: dict) -> None:
    """Resolve the asyncio readers' futures {loop: [futures]}: one call into each loop."""
    for loop, futures in wakeups.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass


def _resolve(futures) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


class Stream:
    """The caller's end of a request: a `Frame` per frame, then the end.

    Errors met by the engine for this request are raised here.  `stats` fills in as it runs.
    Every wait is timed: Ctrl-C reaches a reader, and a reader whose engine thread is gone gets
    EngineStopped instead of waiting forever.
    """

    def __init__(self, request: Request, wake, serving=lambda: True):
        self.request, self._wake, self._serving = request, wake, serving
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waiter = None  # (loop, future) of an async consumer waiting for an item

    @property
    def stats(self) -> RequestStats:
        return self.request.stats

    # engine side
    def _put(self, item, wakeups: dict | None = None) -> None:
        """Hand an item to the reader.  An asyncio reader's wake-up goes to `wakeups` ({loop:
        [futures]}) when given, for `wake_readers` to send once per loop (one call into each event
        loop per frame, not one per stream: each is a syscall and a thread switch); else now."""
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, fut = waiter
            if wakeups is None:
                wake_readers({loop: [fut]})
            else:
                wakeups.setdefault(loop, []).append(fut)

    def _end(self, error: BaseException | None = None, wakeups: dict | None = None) -> None:
        self._put(_END if error is None else error, wakeups)

    # caller side
    def cancel(self) -> None:
        """Stop generating; the engine frees the request's blocks at the next frame boundary."""
        if not self.request.cancelled:
            self.request.cancelled = True
            self._wake()

    close = cancel

    def _unpack(self, item):
        if item is _END:
            self._items.appendleft(_END)  # stay ended for later reads
            raise StopIteration
        if isinstance(item, BaseException):
            self._items.appendleft(_END)
            raise item
        stats = self.request.stats
        if stats.received_s != stats.received_s:  # nan: this is the first frame the caller takes
            stats.received_s = time.perf_counter() - self.request.submitted
        return item

    def _engine_gone(self) -> EngineStopped:
        return EngineStopped("the engine stopped without finishing this request")

    def __iter__(self):
        try:
            while True:
                with self._cond:
                    while not self._items:
                        if not self._cond.wait(WAIT_POLL_S) and not self._items and not self._serving():
                            self._items.append(self._engine_gone())
                    item = self._items.popleft()
                try:
                    codes = self._unpack(item)
                except StopIteration:
                    return
                yield codes
        finally:
            self.cancel()  # a no-op once finished; frees the blocks when the caller stops early

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._cond:
                    item = self._items.popleft() if self._items else None
                    if item is None:
                        fut = loop.create_future()
                        self._waiter = (loop, fut)
                if item is None:  # the loop runs on meanwhile; cancelling the task stops here
                    done, _ = await asyncio.wait({fut}, timeout=WAIT_POLL_S)
                    if not done and not self._serving():
                        with self._cond:
                            if not self._items:
                                self._items.append(self._engine_gone())
                    continue
                try:
                    codes = self._unpack(item)
                except StopIteration:
                    return
                yield codes
        finally:
            with self._cond:
                self._waiter = None
            self.cancel()

    def codes(self) -> torch.Tensor:
        """All frames' codes [T, num_codebooks] (T may be 0)."""
        frames = [frame.codes for frame in self]
        n = self.request.frames.shape[1] - 1
        return stack_codes(frames, n)
