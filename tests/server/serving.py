"""Helpers for the server tests. A real server on loopback: uvicorn in a background thread, on a socket bound to a free port."""
import contextlib
import io
import socket
import threading
import time

import av
import numpy as np
import torch
import uvicorn

from misotts.server.audio_formats import pcm16

START_TIMEOUT_S = 30


@contextlib.contextmanager
def running(app):
    """Serve `app` on 127.0.0.1:<free port>; yields the base URL; stops the server after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


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
