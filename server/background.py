"""Serve an app from a background thread on 127.0.0.1 (tests, the load test): uvicorn on a
socket bound to a free port, with a bounded wait for it to start and to stop."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn


def free_port() -> int:
    """A loopback port free now (for a server started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, start_timeout_s: float = 30.0, log_level: str = "warning", settings: dict | None = None):
    """Yields the base URL (http://127.0.0.1:PORT); the server stops when the block ends.
    settings: more uvicorn.Config arguments (limits.uvicorn_settings(): as `misotts serve`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # loopback only
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, **(settings or {})))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="misotts-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
