"""`misotts serve` shut down by SIGTERM: no new connections, streams and WebSocket sessions in
flight get the grace and are then ended with an error, exit 0; a second signal exits at once."""
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from misotts.server.background import free_port

START_TIMEOUT_S = 120
LONG = {"model": "tiny", "voice": "0", "input": "Go on.", "response_format": "pcm", "stream_format": "sse",
        "max_audio_ms": 60_000}  # untrained weights never end a turn: a minute of frames, far past the grace


def start(tmp_path, grace_s: float):
    port = free_port()
    cmd = [sys.executable, "-m", "misotts", "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
           "--voices-dir", str(tmp_path / "voices"), "--max-batch", "2", "--shutdown-grace", str(grace_s)]
    # default SIGINT / SIGTERM in the child: a test run started in the background has SIGINT ignored
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_default_signals)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + START_TIMEOUT_S
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the server did not open its port"
        try:
            httpx.get(f"{url}/health", timeout=5)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def _default_signals():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_sigterm_gives_streams_the_grace_then_ends_them_with_an_error_and_exits_0(tmp_path):
    proc, url = start(tmp_path, grace_s=3)
    try:
        events, refused_during_grace = [], False
        ws = connect(url.replace("http://", "ws://") + "/v1/audio/speech/stream")
        ws.send(json.dumps({"type": "session.config", "max_audio_ms": 60_000}))
        ws.send(json.dumps({"type": "text.delta", "text": "Keep talking. "}))
        while not isinstance(ws.recv(timeout=60), bytes):  # the session is speaking
            pass
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=LONG, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    break
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2.5  # within the grace the port closes (polled every 0.1 s)
            while time.monotonic() < deadline and not refused_during_grace:
                try:
                    httpx.get(f"{url}/health", timeout=2)
                    time.sleep(0.1)
                except httpx.TransportError:
                    refused_during_grace = True
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert refused_during_grace, "the port still accepted connections after SIGTERM"
        assert proc.wait(30) == 0, proc.stdout.read().decode()[-3000:]
        kinds = [e["type"] for e in events]
        assert kinds[0] == "speech.audio.delta" and kinds[-1] == "error", kinds[-3:]
        assert "speech.audio.done" not in kinds
        assert events[-1]["error"]["code"] == "shutting_down"
        # the stream ran on through the grace: 3 s at tiny's CPU speed is well over 2 deltas
        assert kinds.count("speech.audio.delta") > 2
        # the WebSocket session too: audio through the grace, then an error, then the close
        messages = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                messages.append(ws.recv(timeout=30))
        assert closed.value.rcvd.code == 1012  # service restart: reconnect elsewhere
        said = [json.loads(m) for m in messages if isinstance(m, str)]
        assert said[-1]["type"] == "error" and said[-1]["error"]["code"] == "shutting_down", said
        assert sum(isinstance(m, bytes) for m in messages) > 2
    finally:
        stop(proc)


def test_a_second_signal_exits_at_once(tmp_path):
    proc, url = start(tmp_path, grace_s=600)
    try:
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=LONG, timeout=60) as response:
            lines = response.iter_lines()  # held: a dropped iterator would close the response
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # the stream has its (long) grace
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 128 + signal.SIGTERM  # not the 600 s grace
    finally:
        stop(proc)
