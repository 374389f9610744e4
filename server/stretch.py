"""`speed`: a pitch-preserving time stretch of the audio as it streams (audiotsm's WSOLA).

WSOLA cuts the signal into overlapping frames, moves each to its new place in time (a step of
`speed` x the output hop in the input) and nudges it by up to a frame's tolerance to where its
waveform lines up with what is already written, so the pitch stays and no phase smear appears.
audiotsm keeps its buffers between calls: the audio stretched chunk by chunk is the same, sample
for sample, as the whole signal stretched at once, so nothing happens at the chunk seams.
"""
from __future__ import annotations

from contextlib import aclosing
from dataclasses import replace

import audiotsm
import numpy as np
import torch
from audiotsm.io.array import ArrayReader, ArrayWriter

MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's range
FRAME = 1024  # 43 ms at 24 kHz: longer than a pitch period of any voice, shorter than a phoneme
# A quarter-frame hop keeps the analysis hop (speed x hop) within a frame up to speed 4: with a
# larger one audiotsm skips input between frames and the output comes out shorter than it should.
HOP = FRAME // 4
LATENCY = FRAME - HOP  # output samples audiotsm writes before the first input sample's place


class Stretcher:
    """add(samples) -> the stretched samples ready so far; finish() -> the rest.  Together they
    are round(n / speed) samples for n in, starting at the input's first sample."""

    def __init__(self, speed: float):
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speed must be in {MIN_SPEED}..{MAX_SPEED}, got {speed}")
        self.speed = speed
        self.tsm = audiotsm.wsola(1, speed=speed, frame_length=FRAME, synthesis_hop=HOP)
        self.taken = self.given = 0  # samples in, samples out (after the latency)
        self.skip = LATENCY
        # audiotsm steps int(HOP * speed) input samples per frame; the fraction it drops would add
        # up (0.2% at speed 1.1).  So each call steps floor or ceil, whichever keeps the input read
        # on speed x the output written.
        self.frames = self.read = 0  # frames made, input samples stepped over by them
        self.hop = int(HOP * speed)
        self.tsm.set_speed(self.hop / HOP)

    def add(self, samples: torch.Tensor) -> torch.Tensor:
        x = samples.detach().to("cpu", torch.float64).numpy().reshape(1, -1)
        self.taken += x.shape[1]
        return self._out(self._run(x, flush=False))

    def _run(self, x: np.ndarray, flush: bool) -> np.ndarray:
        writer = ArrayWriter(1)
        self.tsm.run(ArrayReader(x), writer, flush=flush)
        y = writer.data[0]
        made = y.size // HOP  # each frame makes HOP output samples
        self.frames, self.read = self.frames + made, self.read + made * self.hop
        behind = self.read < self.frames * HOP * self.speed
        hop = int(HOP * self.speed) + (1 if behind else 0)
        if hop != self.hop and not flush:
            self.hop = hop
            self.tsm.set_speed(hop / HOP)  # HOP is a power of two: hop / HOP * HOP is exactly hop
        return y

    def finish(self) -> torch.Tensor:
        """Push the last frames through with silence, then cut to the exact length."""
        want = round(self.taken / self.speed) - self.given
        # silence past the end, enough to carry the last real frames out whatever the step
        tail = self._out(self._run(np.zeros((1, 2 * FRAME + int(self.speed * LATENCY))), flush=True))
        if tail.numel() < want:
            tail = torch.cat([tail, torch.zeros(want - tail.numel())])
        tail = tail[:max(want, 0)]
        self.given += tail.numel() - want  # = round(taken / speed) from here on
        return tail

    def _out(self, y: np.ndarray) -> torch.Tensor:
        cut = min(self.skip, y.size)
        self.skip -= cut
        y = y[cut:]
        self.given += y.size
        return torch.from_numpy(y.astype(np.float32))


def stretch_chunks(chunks, speed: float):
    """Audio chunks at `speed` x (1.0: the chunks themselves, untouched)."""
    return chunks if speed == 1.0 else _stretched(chunks, speed)


async def _stretched(chunks, speed: float):
    """Each chunk keeps its codes (frame counts stay the model's); the samples left at the end
    leave in one last chunk with no codes."""
    stretcher, last = Stretcher(speed), None
    async with aclosing(chunks):  # closing this closes the generation at once (a client that left)
        async for chunk in chunks:
            last = chunk
            yield replace(chunk, samples=stretcher.add(chunk.samples))
    if last is not None:
        yield replace(last, samples=stretcher.finish(), codes=last.codes[:0])
