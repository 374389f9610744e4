"""Concurrent streams of the engine held at a steady load, through its public API only
(`Engine.submit(...)` -> a stream to iterate, `stream.cancel()`, `stream.stats`).

- `steady_run`: N streams started together; once every stream has its first frame (the ramp is
  over), a window of `window_frames` frames per stream is timed, and ended before any stream
  finishes; then the streams are cancelled.  Throughput is the frames taken inside the window.
- `ttfa_under_load`: `background` streams running steadily, then new streams arriving one at a
  time into that load, each timed from submit to its first frame (with audio) in the reader.

Readers: one thread per stream, whose only work per frame is noting the time, so a reader never
holds the GIL for long and is woken by the stream's own condition (no polling).  The main thread
polls the readers' counts every few ms.  The engine's loop thread needs the GIL too: N readers
each take it briefly once per frame, a cost a server with N clients pays as well.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_right
from typing import Callable

from .stats import gap_p99_ms, median, percentile, window_count, window_rate

POLL_S = 0.004  # how often the main thread looks at the readers' counts


class Readers:
    """Reader threads, one per stream: `arrivals[i]` holds the times (time.perf_counter) at which
    stream i's frames were taken; `ended[i]` is set when its stream ended."""

    def __init__(self):
        self.streams, self.arrivals, self.ended, self.errors, self._threads = [], [], [], [], []

    def add(self, stream) -> int:
        i = len(self.streams)
        self.streams.append(stream)
        self.arrivals.append([])
        self.ended.append(False)
        thread = threading.Thread(target=self._read, args=(i,), name=f"bench-reader-{i}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return i

    def _read(self, i: int) -> None:
        times = self.arrivals[i]
        try:
            for _ in self.streams[i]:
                times.append(time.perf_counter())
        except BaseException as err:  # noqa: BLE001 -- handed to the main thread by wait()
            self.errors.append(err)
        finally:
            self.ended[i] = True

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.errors:
                raise self.errors[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f} s")
            time.sleep(POLL_S)

    def close(self, timeout: float = 60.0) -> None:
        """Cancel every stream and wait for its reader to see the end."""
        for stream in self.streams:
            stream.cancel()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _start(submit: Callable[[int], object], n: int, timeout: float) -> Readers:
    """n streams (submit(i) makes stream i), every one with its first frame."""
    readers = Readers()
    for i in range(n):
        readers.add(submit(i))
    readers.wait(lambda: all(readers.arrivals), timeout, "first frame in every stream")
    return readers


def steady_run(submit: Callable[[int], object], n: int, window_frames: int, timeout: float = 300.0) -> dict:
    """N streams at once; the window (t0, t1] starts at the last stream's first frame and ends
    when every stream has taken `window_frames` more.  Returns the window's throughput (audio
    s/s), frames, length, each stream's p99 gap between frames inside it, and the ramp's length."""
    start = time.perf_counter()
    readers = _start(submit, n, timeout)
    try:
        arrivals = readers.arrivals
        t0 = max(a[0] for a in arrivals)
        ends = [bisect_right(a, t0) + window_frames for a in arrivals]  # frames each stream must reach

        def reached() -> bool:
            if any(readers.ended[i] and len(a) < e for i, (a, e) in enumerate(zip(arrivals, ends))):
                raise RuntimeError("a stream ended inside the steady window: make the streams longer")
            return all(len(a) >= e for a, e in zip(arrivals, ends))

        readers.wait(reached, timeout, f"{window_frames} frames in every stream after the ramp")
        t1 = max(a[e - 1] for a, e in zip(arrivals, ends))
        backlog = max(reader_backlog(s, len(a)) for s, a in zip(readers.streams, arrivals))
    finally:
        readers.close()
    arrivals = [list(a) for a in readers.arrivals]
    gaps = [gap_p99_ms(a, t0, t1) for a in arrivals]
    return {"streams": n, "audio_s_per_s": window_rate(arrivals, t0, t1), "frames": window_count(arrivals, t0, t1),
            "window_s": t1 - t0, "ramp_s": t0 - start, "gap_p99_ms": gaps, "worst_gap_p99_ms": max(gaps),
            "reader_backlog_frames": backlog}


def reader_backlog(stream, taken: int) -> int:
    """Frames the engine has handed to a stream (stats.frames) that its reader has not taken yet:
    0 or 1 (one in flight) when the readers keep up."""
    return max(0, getattr(getattr(stream, "stats", None), "frames", 0) - taken)


def realtime(run: dict, frame_ms: float) -> bool:
    """Every stream's p99 gap inside the window is at most one frame of audio."""
    return run["worst_gap_p99_ms"] <= frame_ms


def first_audio_ms(stream) -> dict | None:
    """The engine's first-audio breakdown of a stream (None for a stream without one)."""
    stats = getattr(stream, "stats", None)
    return stats.first_audio_ms() if hasattr(stats, "first_audio_ms") else None


def ttfa_under_load(submit: Callable[[int], object], background: int, probes: int, settle_frames: int = 2,
                    timeout: float = 300.0) -> dict:
    """`background` streams running; then `probes` new streams one after another, each taken to
    its first frame and `settle_frames` more (so arrivals are staggered), then cancelled.
    Returns each probe's time to first audio (submit to the reader taking its first frame), its
    first-audio breakdown where the stream has one, and the background's p99 gaps meanwhile."""
    readers = _start(submit, background, timeout)
    ttfa, breakdowns = [], []
    try:
        t_start = time.perf_counter()
        for k in range(probes):
            sent = time.perf_counter()
            i = readers.add(submit(background + k))
            arrivals = readers.arrivals[i]
            readers.wait(lambda: len(arrivals) >= 1 + settle_frames or readers.ended[i], timeout,
                         f"first frame of arrival {k + 1}")
            if not arrivals:
                raise RuntimeError(f"arrival {k + 1} ended without a frame")
            ttfa.append((arrivals[0] - sent) * 1e3)
            parts = first_audio_ms(readers.streams[i])
            if parts is not None:
                breakdowns.append(parts)
            readers.streams[i].cancel()
        t_end = time.perf_counter()
        if any(readers.ended[:background]):
            raise RuntimeError("a background stream ended while arrivals were timed: make the streams longer")
    finally:
        readers.close()
    gaps = [gap_p99_ms(a, t_start, t_end) for a in readers.arrivals[:background]]
    return {"background": background, "arrivals": probes, "ttfa_ms": ttfa, "ttfa_p50_ms": median(ttfa),
            "ttfa_p99_ms": percentile(ttfa, 99), "first_audio_ms": breakdowns,
            "background_gap_p99_ms": gaps}
