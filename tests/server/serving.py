"""Helpers for the server tests; `running` serves an app on loopback from a background thread."""
import io
import time

import av
import numpy as np

from misotts.server.audio_formats import pcm16
from misotts.server.background import serving as running  # noqa: F401 -- for the tests



def expected_pcm(tts, text, **kwargs) -> bytes:
    return pcm16(tts.generate(text, **kwargs).samples)


def decode(data: bytes):
    """Any encoded file -> (its stream's sample rate, mono float samples)."""
    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.audio[0].codec_context.sample_rate
        frames = [f.to_ndarray()[0] for f in container.decode(audio=0)]  # mono: channel 0 (planar or not)
    return rate, np.concatenate(frames) if frames else np.zeros(0)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def no_blocks_held(tts) -> bool:
    s = tts.engine.stats()
    return s["running"] == 0 and s["waiting"] == 0 and s["blocks_available"] == s["blocks_total"]
