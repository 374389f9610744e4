"""Normal life is quiet: a client that leaves (mid-upload, mid-stream) is counted as disconnected,
never as an error, with no traceback; every request is one log line, its error in it."""
import json
import logging
import socket
import time

import httpx

from misotts.server import create_app

from .serving import no_blocks_held, running, wait_for

TIMEOUT = httpx.Timeout(60.0)


def counters(url) -> dict:
    lines = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text.splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines
            if line.startswith(("misotts_errors_total{", "misotts_requests_total{"))}


def post_raw(port: int, body: bytes, length: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


def test_clients_that_leave_are_not_errors_and_each_request_is_one_line(tts, caplog):
    with running(create_app(tts, model_name="tiny")) as url, caplog.at_level(logging.INFO):
        port = int(url.rsplit(":", 1)[1])
        # leaves mid-upload: 1,000 bytes promised, 8 sent
        post_raw(port, b'{"model"', length=1000).close()
        # leaves mid-stream, for each response shape
        for stream in ("audio", "sse", None):
            body = {"model": "t", "voice": "0", "input": "Go on.", "response_format": "pcm", "max_audio_ms": 20_000}
            if stream:
                body["stream_format"] = stream
            sock = post_raw(port, json.dumps(body).encode())
            if stream:
                assert sock.recv(12).startswith(b"HTTP/1.1 200")  # the stream began
            else:
                time.sleep(0.5)  # the whole file is being made
            sock.close()
        wait_for(lambda: no_blocks_held(tts), 30, "the abandoned requests to free their blocks")
        wait_for(lambda: counters(url).get('misotts_requests_total{outcome="disconnected",route="speech"}') == 4,
                 30, "four disconnects counted")
        bad = httpx.post(f"{url}/v1/audio/speech", json={"model": "t"}, timeout=TIMEOUT)
        assert bad.status_code == 400
        seen = counters(url)
    assert not any(key.startswith("misotts_errors_total") and "internal_error" in key for key in seen), seen
    records = [r for r in caplog.records if r.name.startswith(("misotts", "uvicorn"))]
    assert not [r for r in records if r.levelno >= logging.WARNING or r.exc_info], \
        [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    ids = [r.getMessage().split()[0] for r in records if r.name == "misotts.server"]
    assert len(ids) == len(set(ids))  # one line per request
    line = next(r.getMessage() for r in records if r.name == "misotts.server" and "-> 400" in r.getMessage())
    assert "input is required" in line  # the error is in it
