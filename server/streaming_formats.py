"""The WebSocket's audio: each spoken segment's samples -> the bytes of the session's format,
at the session's speed, as they are made.

    pcm        16-bit little-endian 24 kHz mono (the model's own samples)
    opus       each segment one Ogg Opus file (48 kHz when decoded), pages of 20 ms
    g711_ulaw  8 kHz G.711 mu-law, one byte a sample (telephony: Twilio, SIP trunks)
    g711_alaw  8 kHz G.711 A-law

G.711 is resampled 24 -> 8 kHz by soxr's streaming resampler (its filter state crosses the chunk
seams) and encoded by FFmpeg's pcm_mulaw / pcm_alaw codecs.
"""
from __future__ import annotations

import av
import numpy as np
import soxr
import torch

from misotts.runtime.audio import SAMPLE_RATE

from .audio_formats import Encoder, pcm16
from .stretch import Stretcher

WS_FORMATS = {"pcm": SAMPLE_RATE, "opus": 48_000, "g711_ulaw": 8_000, "g711_alaw": 8_000}  # -> rate heard
TELEPHONY_RATE = 8_000
_G711 = {"g711_ulaw": "pcm_mulaw", "g711_alaw": "pcm_alaw"}


class SegmentEncoder:
    """add(samples) -> bytes ready; finish() -> the rest of the segment (for opus, the end of its file)."""

    def __init__(self, fmt: str, speed: float = 1.0):
        if fmt not in WS_FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.format = fmt
        self.stretcher = Stretcher(speed) if speed != 1.0 else None
        self.file = Encoder("opus") if fmt == "opus" else None
        self.resampler = self.codec = None
        if fmt in _G711:
            self.resampler = soxr.ResampleStream(SAMPLE_RATE, TELEPHONY_RATE, 1, dtype="float32")
            self.codec = av.CodecContext.create(_G711[fmt], "w")
            self.codec.sample_rate, self.codec.layout, self.codec.format = TELEPHONY_RATE, "mono", "s16"

    def add(self, samples: torch.Tensor) -> bytes:
        if self.stretcher is not None:
            samples = self.stretcher.add(samples)
        return self._encode(samples, last=False)

    def finish(self) -> bytes:
        tail = self.stretcher.finish() if self.stretcher is not None else torch.zeros(0)
        return self._encode(tail, last=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _encode(self, samples: torch.Tensor, last: bool) -> bytes:
        if self.file is not None:
            data = self.file.add(samples) if samples.numel() else b""
            return data + self.file.finish() if last else data
        if self.codec is None:
            return pcm16(samples)
        x = samples.detach().float().cpu().numpy()
        y = self.resampler.resample_chunk(x, last=last)
        if y.size == 0:
            return b""
        y = np.round(np.clip(y, -1.0, 1.0) * 32767.0).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(y, format="s16", layout="mono")
        frame.sample_rate = TELEPHONY_RATE
        return b"".join(bytes(packet) for packet in self.codec.encode(frame))
