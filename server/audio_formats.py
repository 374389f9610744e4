"""Float samples -> the bytes of each response_format, chunk by chunk (so streams start early).

pcm is 16-bit little-endian 24 kHz mono, wav is that with a RIFF header; the compressed formats
go through PyAV (FFmpeg) into containers that can be written front to back without seeking:
mp3, ogg/opus, adts/aac, flac.
"""
from __future__ import annotations

import io
import struct

import av
import numpy as np
import torch

from misotts.runtime.audio import SAMPLE_RATE

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}
# response_format -> (container, codec, sample format)
_PYAV = {"mp3": ("mp3", "libmp3lame", "s16p"), "opus": ("ogg", "libopus", "s16"),
         "aac": ("adts", "aac", "fltp"), "flac": ("flac", "flac", "s16")}
UNKNOWN_SIZE = 0xFFFFFFFF  # a streamed WAV's sizes are not known when its header leaves


def pcm16(samples: torch.Tensor) -> bytes:
    """Mono float samples in [-1, 1] -> 16-bit little-endian PCM (clipped, rounded)."""
    x = samples.detach().float().cpu().clamp(-1.0, 1.0).mul(32767.0).round().to(torch.int16)
    return x.numpy().astype("<i2").tobytes()


def wav_header(data_bytes: int | None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte PCM16 mono WAV header; data_bytes None: unknown (streamed), sizes set to the max."""
    data = UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff = UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", data))


class _Sink:
    """A write-only file for PyAV: what the muxer writes waits here until taken."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class Encoder:
    """`add(samples)` -> the bytes ready so far; `finish()` -> the rest.  Concatenated, they are
    one file of `response_format`.  Streamed, a WAV header cannot know its sizes yet; seekable (a
    whole file, nothing leaves before finish()): the muxer goes back to fill in its header, which
    for mp3 is the LAME tag naming the encoder's delay and padding, so decoders drop them."""

    def __init__(self, response_format: str, total_samples: int | None = None, seekable: bool = False):
        if response_format not in FORMATS:
            raise ValueError(f"unknown response_format {response_format!r}")
        self.format, self.started = response_format, False
        self.total = total_samples
        self.container = None
        if response_format in _PYAV:
            container, codec, self.sample_format = _PYAV[response_format]
            self.sink = io.BytesIO() if seekable else _Sink()
            # ogg holds pages up to 1 s by default; a short page lets opus bytes leave frame by frame
            options = {"page_duration": "20000"} if container == "ogg" else {}
            self.container = av.open(self.sink, mode="w", format=container, options=options)
            self.stream = self.container.add_stream(codec, rate=SAMPLE_RATE, layout="mono")
            self.stream.format = self.sample_format
            self.pts = 0

    def add(self, samples: torch.Tensor) -> bytes:
        if self.container is None:
            head = b""
            if not self.started and self.format == "wav":
                head = wav_header(None if self.total is None else self.total * 2)
            self.started = True
            return head + pcm16(samples)
        return self._encode(samples)

    def finish(self) -> bytes:
        if self.container is None:
            if not self.started and self.format == "wav":  # no audio at all: still a valid, empty file
                self.started = True
                return wav_header(0)
            return b""
        for packet in self.stream.encode(None):  # flush the encoder's buffered frames
            self.container.mux(packet)
        self.container.close()
        return self.sink.getvalue() if isinstance(self.sink, io.BytesIO) else self.sink.take()

    def _encode(self, samples: torch.Tensor) -> bytes:
        if samples.numel() == 0:  # a stretched chunk can be empty
            return b""
        x = samples.detach().float().cpu().clamp(-1.0, 1.0).numpy()
        if self.sample_format.startswith("s16"):
            x = np.round(x * 32767.0).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format=self.sample_format, layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, self.pts
        self.pts += x.size
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        return b"" if isinstance(self.sink, io.BytesIO) else self.sink.take()

    def close(self) -> None:
        """Drop the encoder without finishing (the request ended early)."""
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # noqa: BLE001 -- a half-written file; nothing to save
                pass
            self.container = None


def encode_all(samples: torch.Tensor, response_format: str) -> bytes:
    encoder = Encoder(response_format, total_samples=samples.numel(), seekable=True)
    return encoder.add(samples) + encoder.finish() if samples.numel() else encoder.finish()


def decode_audio(data: bytes, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Any file FFmpeg reads -> mono float32 samples at sample_rate (for voices and context)."""
    out = []
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(audio=0):
            for converted in resampler.resample(frame):
                out.append(converted.to_ndarray().reshape(-1))
        for converted in resampler.resample(None):
            out.append(converted.to_ndarray().reshape(-1))
    return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0)
