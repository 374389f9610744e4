"""The WebSocket's formats (pcm, opus, G.711 mu-law / A-law at 8 kHz), speed and voice names, and
client hang-ups that leave no error behind."""
import json
import logging
import socket
import time

import numpy as np
import pytest
import soxr
from websockets.sync.client import connect

from misotts.server import create_app

from .serving import decode, expected_pcm, no_blocks_held, running, wait_for
from .test_stream_ws import RECV_S, messages_until, ws_url

TEXT = "Hello there."


def spoken(url, **config) -> tuple[dict, bytes]:
    """One sentence in a session configured so: (session.ready, the segment's bytes)."""
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "session.config", "seed": 2, "max_audio_ms": 240, **config}))
        ws.send(json.dumps({"type": "text.delta", "text": TEXT}))
        ws.send(json.dumps({"type": "text.done"}))
        events, audio = messages_until(ws, "done")
    assert [e["type"] for e in events] == ["session.ready", "segment.start", "segment.done", "done"]
    return events[0], audio


def reference(tts, speaker=0) -> np.ndarray:
    return np.frombuffer(expected_pcm(tts, TEXT, speaker=speaker, seed=2, max_audio_ms=240), "<i2") / 32767.0


def g711_decode(data: bytes, law: str) -> np.ndarray:
    """ITU-T G.711, written out from the standard (independent of FFmpeg's tables): bytes -> [-1, 1]."""
    b = np.frombuffer(data, np.uint8).astype(np.int32)
    if law == "ulaw":
        u = ~b & 0xFF
        exp, mant = (u >> 4) & 7, u & 0x0F
        mag = (((mant << 3) + 0x84) << exp) - 0x84  # 14-bit magnitude, times 4
        return np.where(u & 0x80, -mag, mag) / 32768.0
    a = b ^ 0x55
    exp, mant = (a >> 4) & 7, a & 0x0F
    mag = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    return np.where(a & 0x80, mag, -mag) / 32768.0


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_g711_is_the_audio_at_8khz(server, tts, law):
    ready, data = spoken(server, response_format=f"g711_{law}")
    assert ready["format"] == f"g711_{law}" and ready["sample_rate"] == 8000
    want = soxr.resample(reference(tts), 24_000, 8_000)  # soxr on the whole signal, at once
    got = g711_decode(data, law)
    assert len(got) == len(want)
    # G.711 keeps 4 mantissa bits per octave: its error is at most 1/32 of the level plus the
    # smallest step (2 / 8,192 for mu-law, 16 / 32,768 for A-law's first segment)
    assert np.all(np.abs(got - want) <= np.abs(want) / 32 + 1e-3), np.abs(got - want).max()


def test_opus_is_one_ogg_file_per_segment_of_the_exact_length(server, tts):
    ready, data = spoken(server, response_format="opus")
    assert ready["sample_rate"] == 48000 and data[:4] == b"OggS"
    rate, samples = decode(data)
    pcm = reference(tts)
    assert rate == 48_000 and len(samples) == 2 * len(pcm)  # the pre-skip and end trim declared
    back = soxr.resample(samples, 48_000, 24_000)
    assert np.corrcoef(back, pcm)[0, 1] > 0.9  # lossy, but the same audio, in place


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_and_voice_names_as_the_http_route(server, tts, speed):
    ready, data = spoken(server, voice="cedar", speed=speed)
    pcm = reference(tts, speaker=12)
    assert ready["voice"] == "cedar" and ready["speed"] == speed
    assert len(data) // 2 == round(len(pcm) / speed)
    _, plain = spoken(server, voice="cedar")
    assert plain == expected_pcm(tts, TEXT, speaker=12, seed=2, max_audio_ms=240)


def test_bad_format_and_stream_format_are_error_messages(server):
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "session.config", "response_format": "mp3"}))
        assert json.loads(ws.recv(timeout=RECV_S))["error"]["param"] == "response_format"
        ws.send(json.dumps({"type": "session.config", "speed": 9}))
        assert json.loads(ws.recv(timeout=RECV_S))["error"]["param"] == "speed"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_hanging_up_is_no_error(tts):
    """A clean close and a dropped connection, both mid-sentence: nothing at WARNING or above from
    uvicorn, the app or asyncio, and the sentence's blocks are freed."""
    with running(create_app(tts)) as url:
        seen = Records()
        loggers = [logging.getLogger(n) for n in ("uvicorn.error", "misotts.server", "asyncio", "")]
        for lg in loggers:  # added after uvicorn configured its logging
            lg.addHandler(seen)
        try:
            for abrupt in (False, True):
                with connect(ws_url(url)) as ws:
                    ws.send(json.dumps({"type": "session.config", "max_audio_ms": 60_000}))
                    ws.send(json.dumps({"type": "text.delta", "text": "A long one. "}))
                    while not isinstance(ws.recv(timeout=RECV_S), bytes):
                        pass
                    if abrupt:
                        ws.socket.shutdown(socket.SHUT_RDWR)
                        ws.socket.close()
                wait_for(lambda: no_blocks_held(tts), 30, "the abandoned sentence to free its blocks")
                time.sleep(0.5)  # what is logged after the close (not timed: only lets the server finish)
        finally:
            for lg in loggers:
                lg.removeHandler(seen)
    assert [r.getMessage() for r in seen.records] == []
