"""What generation hands back: `Audio` chunks made from frames, the timings of a generation, and
the stream contract every source of chunks keeps.

Every path (the engine's streams, conversations, the server's turns) turns its frames -- codes
plus decoded samples -- into chunks here, so chunking, timing and concatenation are one code.
`ChunkStream` is what `TTS.stream` / `TTS.astream` return and what a Ray remote stream
(`server.remote_tts`) returns too: chunks, and the generation's own stats and prompt accounting
on the stream itself, so a caller never asks anybody else for them.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Protocol, runtime_checkable

import torch

from misotts.runtime.audio import SAMPLE_RATE, save_wav


@dataclass
class Audio:
    """Generated speech: mono float32 samples [N] at `sample_rate`, and the Mimi codes [T, 32]."""

    samples: torch.Tensor
    sample_rate: int
    codes: torch.Tensor
    stats: GenerationStats | None = None  # the generation's, on what `TTS.generate` returns

    @property
    def duration_s(self) -> float:
        return self.samples.numel() / self.sample_rate

    def save(self, path: str | Path) -> Path:
        """Write a 16-bit WAV atomically (a failed write leaves an old file as it was); returns
        the path written, ``~`` expanded."""
        return save_wav(path, self.samples, self.sample_rate)

    @staticmethod
    def concat(chunks: list[Audio], num_codebooks: int) -> Audio:
        """One Audio from consecutive chunks (an empty one, with no frames, from none)."""
        if not chunks:
            return Audio(torch.zeros(0), SAMPLE_RATE, torch.zeros(0, num_codebooks, dtype=torch.long))
        return Audio(torch.cat([c.samples for c in chunks]), chunks[0].sample_rate, torch.cat([c.codes for c in chunks]))


@dataclass
class GenerationStats:
    """Timings of one generation (seconds), filled in as its chunks are made."""

    first_audio_s: float = float("nan")
    total_s: float = float("nan")
    frames: int = 0
    audio_s: float = 0.0
    prompt_positions: int = 0  # the prompt's length in backbone positions
    reused_positions: int = 0  # prompt positions served from the engine's prefix cache
    computed_positions: int = 0  # prompt positions prefilled
    served_by: str = ""  # the replica that ran it, behind Ray Serve ("" in one process)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.total_s if self.total_s > 0 else float("nan")

    @property
    def real_time_factor(self) -> float:
        return self.total_s / self.audio_s if self.audio_s > 0 else float("nan")


def check_chunking(first_chunk_frames: int, chunk_frames: int) -> None:
    for value in (first_chunk_frames, chunk_frames):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"first_chunk_frames and chunk_frames must be integers >= 1, got "
                             f"{first_chunk_frames!r}, {chunk_frames!r}")


class Chunker:
    """Frames (codes [n], samples [frame_size]) -> `Audio` chunks: the first after
    `first_chunk_frames` frames, then every `chunk_frames`; `flush()` gives the rest."""

    def __init__(self, stats: GenerationStats, first_chunk_frames: int = 1, chunk_frames: int = 1):
        check_chunking(first_chunk_frames, chunk_frames)
        self.stats, self.first, self.size = stats, first_chunk_frames, chunk_frames
        self.start = time.perf_counter()
        self.codes: list[torch.Tensor] = []
        self.samples: list[torch.Tensor] = []

    def account(self, request) -> None:
        """Copy the prompt accounting of `request` (its frame stream's RequestStats) over."""
        self.stats.prompt_positions = request.prompt_positions
        self.stats.reused_positions = request.reused_positions
        self.stats.computed_positions = request.computed_positions

    def add(self, codes: torch.Tensor, samples: torch.Tensor, request=None) -> Audio | None:
        """One frame; `request`: its stream's stats, whose prompt accounting is copied over."""
        if request is not None:
            self.account(request)
        self.codes.append(codes)
        self.samples.append(samples)
        return self.flush() if len(self.codes) == (self.first if self.stats.frames == 0 else self.size) else None

    def flush(self) -> Audio | None:
        if not self.codes:
            return None
        chunk = Audio(torch.cat(self.samples).float().cpu(), SAMPLE_RATE, torch.stack(self.codes).cpu())
        self.codes, self.samples = [], []
        s, now = self.stats, time.perf_counter() - self.start
        if s.frames == 0:
            s.first_audio_s = now
        s.frames += len(chunk.codes)
        s.audio_s = chunk.samples.numel() / SAMPLE_RATE + s.audio_s
        s.total_s = now
        return chunk


@runtime_checkable
class ChunkStream(Protocol):
    """One generation's `Audio` chunks (iterate, or `async for`) and its `stats`, filled in as the
    chunks are made (timings, frames, the prompt's positions and how many came from the prefix
    cache).  Closing it (`close()` / `aclose()`, or leaving the loop and dropping it) cancels the
    generation.  Kept by `AudioStream` (one process) and `server.remote_tts.RemoteStream` (Ray)."""

    stats: GenerationStats

    def __aiter__(self) -> AsyncIterator[Audio]: ...

    async def aclose(self) -> None: ...


class AudioStream:
    """`ChunkStream` over a stream of frames: `start()` (or `await start_async()`) submits the
    generation at the first chunk asked for and returns its frame stream (`runtime.frames.FrameStream`);
    the frames become chunks with a `Chunker`.  Iterated once, either way: as a generator is."""

    def __init__(self, start: Callable[[], object], start_async: Callable[[], object], chunker: Chunker):
        self._start, self._start_async, self._chunker = start, start_async, chunker
        self.stats = chunker.stats
        self._gen = self._agen = None

    def __iter__(self) -> Iterator[Audio]:
        return self

    def __next__(self) -> Audio:
        if self._gen is None:
            self._gen = self._chunks()
        return next(self._gen)

    def close(self) -> None:
        """Stop: the generation is cancelled (its blocks are freed at the next frame boundary)."""
        if self._gen is not None:
            self._gen.close()

    def __aiter__(self) -> AsyncIterator[Audio]:
        return self

    async def __anext__(self) -> Audio:
        if self._agen is None:
            self._agen = self._achunks()
        return await anext(self._agen)

    async def aclose(self) -> None:
        if self._agen is not None:
            await self._agen.aclose()
        self.close()

    def _chunks(self):
        frames = self._start()
        self._chunker.account(frames.stats)
        try:
            for frame in frames:
                if (chunk := self._chunker.add(frame.codes, frame.audio, frames.stats)) is not None:
                    yield chunk
            if (chunk := self._chunker.flush()) is not None:
                yield chunk
        finally:
            frames.cancel()
            self._chunker.account(frames.stats)

    async def _achunks(self):
        frames = await self._start_async()
        self._chunker.account(frames.stats)
        try:
            async for frame in frames:
                if (chunk := self._chunker.add(frame.codes, frame.audio, frames.stats)) is not None:
                    yield chunk
            if (chunk := self._chunker.flush()) is not None:
                yield chunk
        finally:
            frames.cancel()
            self._chunker.account(frames.stats)
