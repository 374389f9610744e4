"""Bounded work per request: the body limit and deadline, header limits, audio decoded up to a cap
and no further, the WebSocket session's text budget."""
import asyncio
import base64
import io
import json
import socket
import time
import tracemalloc

import httpx
import numpy as np
import pytest
import soundfile as sf
from websockets.sync.client import connect

from misotts.server import create_app
from misotts.server.audio_formats import decode_audio
from misotts.server.audio_input import AudioTooLong, decode_capped
from misotts.server.limits import Limits, RequestGuard, RequestRefused, uvicorn_settings

from .serving import running

TIMEOUT = httpx.Timeout(60.0)
BODY = {"model": "tiny", "voice": "0", "input": "Hi.", "response_format": "pcm", "max_audio_ms": 80}


def flac_of_silence(seconds: float, rate: int = 8000) -> bytes:
    """A file that is small (silence compresses ~1000x) but expands to `seconds` of audio."""
    out = io.BytesIO()
    sf.write(out, np.zeros(int(seconds * rate), dtype=np.int16), rate, format="FLAC")
    return out.getvalue()


def sine_wav(seconds: float, rate: int = 16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


# ---- the decoder ---------------------------------------------------------------------------------

def test_decode_capped_equals_the_plain_decoder_under_the_cap():
    data = sine_wav(1.5)
    assert np.array_equal(decode_capped(data, 2.0).numpy(), decode_audio(data).numpy())


def test_decode_capped_stops_at_the_cap_without_holding_the_whole_file():
    data = flac_of_silence(600)  # 10 minutes: 57 MB as 24 kHz float32
    assert len(data) < 400_000
    tracemalloc.start()
    try:
        with pytest.raises(AudioTooLong):
            decode_capped(data, 2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 2 s at 24 kHz is 192 KB of float32; the whole file would be 57 MB.  Python-side (numpy)
    # allocations are traced; 8 MB leaves room for PyAV's frames and the interpreter's own.
    assert peak < 8 * 2**20, peak


def test_a_file_that_is_not_audio_cannot_be_decoded():
    with pytest.raises(ValueError, match="cannot decode"):
        decode_capped(b"ID3" + b"\x00" * 500, 10.0)


# ---- the request guard (ASGI, no server) ---------------------------------------------------------

def run_guard(limits, headers, chunks, delay_s=0.0):
    """Drive RequestGuard around an app that reads the whole body; returns (what the app saw or
    raised, the chunks pulled from the client, the response messages the guard sent itself)."""
    pulled, sent, seen = [], [], {}

    async def receive():
        if delay_s:
            await asyncio.sleep(delay_s)
        body = chunks[len(pulled)]
        pulled.append(body)
        return {"type": "http.request", "body": body, "more_body": len(pulled) < len(chunks)}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        body = b""
        try:
            while True:
                message = await receive()
                body += message["body"]
                if not message["more_body"]:
                    break
            seen["body"] = body
        except RequestRefused as err:
            seen["refused"] = (err.status, err.code)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(RequestGuard(app, limits)(scope, receive, send))
    return seen, pulled, sent


def test_a_declared_length_over_the_limit_is_refused_before_any_body_is_read():
    seen, pulled, sent = run_guard(Limits(max_body_bytes=1000), [(b"content-length", b"5000")], [b"x" * 5000])
    assert pulled == [] and seen == {}
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == "body_too_large"


def test_a_chunked_body_is_refused_at_the_chunk_that_crosses_the_limit():
    chunks = [b"x" * 600] * 10
    seen, pulled, _ = run_guard(Limits(max_body_bytes=1000), [], chunks)
    assert seen == {"refused": (413, "body_too_large")}
    assert len(pulled) == 2  # 600 bytes, then 1,200: the rest is never read
    seen, _, _ = run_guard(Limits(max_body_bytes=6000), [], chunks)
    assert seen == {"body": b"x" * 6000}  # exactly the limit passes


def test_a_body_slower_than_its_deadline_is_refused():
    seen, pulled, _ = run_guard(Limits(body_timeout_s=0.2), [], [b"x"] * 20, delay_s=0.05)
    assert seen == {"refused": (408, "body_timeout")} and 2 <= len(pulled) < 20


def test_too_many_headers_and_a_bad_content_length_are_refused():
    headers = [(f"x-h{i}".encode(), b"1") for i in range(101)]
    _, _, sent = run_guard(Limits(), headers, [b""])
    assert sent[0]["status"] == 431
    for value in (b"-1", b"1e3", "١٢".encode(), b"9" * 40):
        _, _, sent = run_guard(Limits(), [(b"content-length", value)], [b""])
        assert sent[0]["status"] == 400, value


# ---- over loopback --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(tts):
    """The app as `misotts serve` runs it (uvicorn_settings), with small limits to test."""
    limits = Limits(max_body_bytes=200_000, header_timeout_s=0.5, ws_max_session_chars=50)
    with running(create_app(tts, model_name="tiny", limits=limits), settings=uvicorn_settings(limits)) as url:
        yield url


def test_bodies_over_the_limit_get_413_in_the_envelope(guarded):
    with httpx.Client(timeout=TIMEOUT) as client:
        big = {**BODY, "input": "x" * 250_000}
        response = client.post(f"{guarded}/v1/audio/speech", json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        chunked = client.post(f"{guarded}/v1/audio/speech", content=iter([b"{" + b" " * 100_000] * 3),
                              headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
        assert client.get(f"{guarded}/health").status_code == 200


def test_context_audio_longer_than_the_window_is_refused(server, tts):
    window_s = tts.config.max_seq_len * 0.08
    turn = {"speaker": 0, "text": "x", "audio": base64.b64encode(flac_of_silence(3 * 3600)).decode()}
    response = httpx.post(f"{server}/v1/audio/speech", json={**BODY, "context": [turn]}, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "audio_too_long" and error["param"] == "context[0].audio"
    # the cap is for all turns together: two turns of 60% of the window each
    half = {"speaker": 0, "text": "x", "audio": base64.b64encode(flac_of_silence(0.6 * window_s)).decode()}
    response = httpx.post(f"{server}/v1/audio/speech", json={**BODY, "context": [half, half]}, timeout=TIMEOUT)
    assert response.status_code == 400 and response.json()["error"]["param"] == "context[1].audio"


def test_large_headers_are_refused_by_h11(guarded):
    for size in (100_000, 4_000_000):  # one read (the guard: 431), many reads (h11 stops reading: 400)
        try:
            response = httpx.get(f"{guarded}/health", headers={"x-big": "y" * size}, timeout=TIMEOUT)
            assert response.status_code in (400, 431), size
        except httpx.TransportError:  # h11 closed the socket while the client was still sending
            pass
    assert httpx.get(f"{guarded}/health", timeout=TIMEOUT).status_code == 200
    response = httpx.get(f"{guarded}/health", headers={f"x-h{i}": "1" for i in range(150)}, timeout=TIMEOUT)
    assert response.status_code == 431


def test_a_connection_trickling_its_headers_is_closed(guarded):
    port = int(guarded.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and the rest never comes
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server (not our 30 s timeout)
        assert time.monotonic() - started < 25
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # a whole request still works
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


def test_a_websocket_session_has_a_text_budget(guarded):
    url = guarded.replace("http://", "ws://") + "/v1/audio/speech/stream"
    with connect(url) as ws:
        ws.send(json.dumps({"type": "session.config", "max_audio_ms": 80}))
        assert json.loads(ws.recv(timeout=60))["type"] == "session.ready"
        ws.send(json.dumps({"type": "text.delta", "text": "a" * 40}))
        ws.send(json.dumps({"type": "text.delta", "text": "b" * 20}))  # 60 > 50
        error = json.loads(ws.recv(timeout=60))
        assert error["type"] == "error" and error["error"]["code"] == "session_too_long"
        ws.send(json.dumps({"type": "text.delta", "text": "c" * 10}))  # 50: still within
        ws.send(json.dumps({"type": "text.done"}))
        events = []
        while not events or events[-1]["type"] != "done":
            message = ws.recv(timeout=60)
            if isinstance(message, str):
                events.append(json.loads(message))
        start = next(e for e in events if e["type"] == "segment.start")
        assert start["text"] == "a" * 40 + "c" * 10  # the refused text was dropped, the session went on


def test_connections_past_the_limit_get_503(tts):
    limits = Limits(max_connections=2)
    with running(create_app(tts, model_name="tiny", limits=limits), settings=uvicorn_settings(limits)) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        try:
            time.sleep(0.2)  # let the server register both
            with httpx.Client(timeout=TIMEOUT) as client:
                assert client.get(f"{url}/health").status_code == 503  # uvicorn's limit_concurrency
        finally:
            for sock in held:
                sock.close()
        wait_ok = time.monotonic() + 10
        while httpx.get(f"{url}/health", timeout=TIMEOUT).status_code != 200:
            assert time.monotonic() < wait_ok, "the server did not recover once the connections closed"
            time.sleep(0.1)


def test_once_shutdown_begins_new_requests_on_open_connections_get_503(tts):
    app = create_app(tts, model_name="tiny")
    with running(app) as url, httpx.Client(timeout=TIMEOUT) as client:
        assert client.get(f"{url}/health").status_code == 200  # the keep-alive connection is open
        app.state.draining.begin()
        for response in (client.get(f"{url}/health"), httpx.post(f"{url}/v1/audio/speech", json=BODY, timeout=TIMEOUT)):
            assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
            assert response.headers["connection"] == "close"
