"""`misotts serve`'s server: the port bound before the model loads (a port in use is an argument
error, found at once), uvicorn with the connection limits and the shutdown deadline."""
from __future__ import annotations

import socket

import uvicorn

from .limits import LIMITS, Limits, uvicorn_settings
from .shutdown import GracefulServer

SHUTDOWN_GRACE_S = 5.0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening); ValueError naming the flag if it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: not an address this machine can bind ({e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); is another server "
                         "running there?") from None
    return sock


def serve(app, sock: socket.socket, grace_s: float = SHUTDOWN_GRACE_S, limits: Limits = LIMITS,
          max_connections: int | None = None) -> None:
    """Serve until SIGTERM / Ctrl-C, then shut down within grace_s (+ 2 s to end the streams)."""
    settings = uvicorn_settings(limits)
    if max_connections is not None:
        settings["limit_concurrency"] = max_connections
    # access_log off: RequestIds writes the one line per request (with its id)
    host, port = sock.getsockname()[:2]  # for uvicorn's "running on" line
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=2, **settings)
    GracefulServer(config, app.state.draining, grace_s).run(sockets=[sock])
