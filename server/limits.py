"""What one request, connection or session may cost: the numbers, and the ASGI guard that enforces
the per-request ones before the routes see a byte.

Everything here is bounded by construction: a body is refused at its Content-Length or at the
chunk that crosses the limit (never read whole first), a body must arrive within a deadline, and a
request with too many headers is refused.  The connection limits (header bytes, idle and header
timeouts, concurrency) are uvicorn's own settings: `uvicorn_settings()`.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from .errors import ApiError

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * MiB  # a 25 MB voice upload with its form, or context audio in base64
    body_timeout_s: float = 30.0  # the whole body must arrive within this (slow uploads)
    header_timeout_s: float = 10.0  # a connection's request headers must arrive within this (slowloris)
    max_headers: int = 100  # per request
    max_header_bytes: int = 64 * 1024  # the request line and headers together (h11's incomplete-event limit)
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # beyond this many connections / in-flight requests uvicorn answers 503
    ws_max_message_bytes: int = 32 * MiB  # a session.config may carry context audio
    ws_max_session_chars: int = 100_000  # the text one WebSocket session may send in all
    max_audio_bytes: int = 25 * MiB  # one audio file (voice clip, or one context turn's audio decoded from base64)


LIMITS = Limits()


def uvicorn_settings(limits: Limits = LIMITS) -> dict:
    """uvicorn.Config arguments for a server exposed to a network.  h11 (not httptools) because only
    h11 bounds the header block's size; GuardedH11 adds the header deadline uvicorn lacks."""
    from .guarded_h11 import GuardedH11

    protocol = type("GuardedH11", (GuardedH11,), {"header_timeout_s": limits.header_timeout_s})
    return {"http": protocol, "h11_max_incomplete_event_size": limits.max_header_bytes,
            "timeout_keep_alive": limits.keep_alive_s, "limit_concurrency": limits.max_connections,
            "ws_max_size": limits.ws_max_message_bytes, "server_header": False}


def _envelope(status: int, message: str, code: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, body


class RequestRefused(ApiError):
    """Raised from a guarded receive(): the routes' error handler turns it into the envelope."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(status, message, None, code, headers={"Connection": "close"})


class RequestGuard:
    """Plain ASGI middleware: too many headers, or too many header bytes -> 431; a declared Content-Length over the limit ->
    413 before any of the body is read; an undeclared (chunked) body -> 413 at the chunk that
    crosses the limit; a body still arriving after body_timeout_s -> 408."""

    def __init__(self, app, limits: Limits = LIMITS):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        limits = self.limits
        if len(scope["headers"]) > limits.max_headers:
            return await self._refuse(scope, send, 431, f"more than {limits.max_headers} request headers",
                                      "too_many_headers")
        # h11 refuses a head that arrives in pieces past max_header_bytes; one that came in a single
        # read (up to uvicorn's read size) is refused here
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > limits.max_header_bytes:
            return await self._refuse(scope, send, 431, f"the request headers are over {limits.max_header_bytes} "
                                      "bytes", "headers_too_large")
        draining = getattr(getattr(scope.get("app"), "state", None), "draining", None)
        if draining is not None and draining.started:  # shutting down: no new work
            return await self._refuse(scope, send, 503, "the server is shutting down", "shutting_down")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            value = declared[0].decode("latin-1").strip()
            if len(declared) > 1 or not (value.isascii() and value.isdigit()) or len(value) > 18:
                return await self._refuse(scope, send, 400, "a bad Content-Length header", "invalid_content_length")
            if int(value) > limits.max_body_bytes:
                return await self._refuse(scope, send, 413, f"the body is over {limits.max_body_bytes} bytes",
                                          "body_too_large")
        await self.app(scope, _limited(receive, limits), send)

    @staticmethod
    async def _refuse(scope, send, status: int, message: str, code: str) -> None:
        if scope["type"] == "websocket":  # before the handshake: an HTTP answer is not possible in ASGI
            await send({"type": "websocket.close", "code": 1009 if status == 413 else 1008})
            return
        start, body = _envelope(status, message, code)
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _limited(receive, limits: Limits):
    """receive() that counts the body's bytes and holds it to the deadline; once the body is in,
    it passes messages (the disconnect a stream waits for) through untouched."""
    state = {"seen": 0, "done": False, "deadline": None}

    async def receive_limited():
        if state["done"]:
            return await receive()
        loop = asyncio.get_running_loop()
        if state["deadline"] is None:
            state["deadline"] = loop.time() + limits.body_timeout_s
        try:
            message = await asyncio.wait_for(receive(), max(0.0, state["deadline"] - loop.time()))
        except TimeoutError:
            raise RequestRefused(408, f"the body did not arrive within {limits.body_timeout_s:.0f} s",
                                 "body_timeout") from None
        if message["type"] == "http.request":
            state["seen"] += len(message.get("body", b""))
            if state["seen"] > limits.max_body_bytes:
                state["done"] = True
                raise RequestRefused(413, f"the body is over {limits.max_body_bytes} bytes", "body_too_large")
            state["done"] = not message.get("more_body", False)
        else:
            state["done"] = True
        return message

    return receive_limited
