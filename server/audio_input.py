"""Audio files from clients (voice clips, context turns) -> mono float samples, with bounded work:
the file's bytes are capped before decoding, and decoding stops at the first frame past the
duration cap, so a small file that expands to hours of audio never costs more than the cap."""
from __future__ import annotations

import io
import itertools

import av
import numpy as np
import torch

from misotts.runtime.audio import SAMPLE_RATE


class AudioTooLong(ValueError):
    def __init__(self, max_seconds: float):
        super().__init__(f"the audio is longer than {max_seconds:.1f} s")
        self.max_seconds = max_seconds


def decode_capped(data: bytes, max_seconds: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Any file FFmpeg reads -> mono float32 samples at sample_rate.  Raises AudioTooLong as soon as
    more than max_seconds are decoded (at most one frame past the cap is ever held), ValueError for
    a file that cannot be decoded."""
    cap = int(max_seconds * sample_rate)
    out, total = [], 0
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise ValueError("the file has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            # lazily, frame by frame; None at the end flushes the resampler
            for frame in itertools.chain(container.decode(audio=0), [None]):
                for converted in resampler.resample(frame):
                    samples = converted.to_ndarray().reshape(-1)
                    total += samples.size
                    if total > cap:
                        raise AudioTooLong(max_seconds)
                    out.append(samples)
    except (AudioTooLong, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 -- whatever FFmpeg says about a file it cannot read
        raise ValueError(f"cannot decode the audio: {err}") from None
    return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0)

