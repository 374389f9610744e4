"""A shutdown with a deadline.

SIGTERM (or Ctrl-C): the port stops accepting and new requests on open connections get a 503;
streams in flight get `grace_s` to finish; then each is ended with an error (an `error` event on
SSE and the WebSocket, the envelope for a response not yet started, a cut transfer for raw
audio) and the process exits 0.  A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from typing import AsyncIterator

import uvicorn

from .errors import ApiError

log = logging.getLogger("misotts.server")
END_S = 2.0  # after the grace: time for the streams to send their error and close


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down: retry on another replica", code="shutting_down",
                    type="server_error", headers={"Connection": "close", "Retry-After": "1"})


class Draining:
    """The app's side of a shutdown: whether one began, and an event set when its grace is over."""

    def __init__(self):
        self.started = False
        self._expired: asyncio.Event | None = None

    def expired(self) -> asyncio.Event:
        if self._expired is None:  # made on first use, in the server's loop
            self._expired = asyncio.Event()
        return self._expired

    def begin(self) -> None:
        self.started = True

    def expire(self) -> None:
        self.started = True
        self.expired().set()


async def until_expired(chunks: AsyncIterator, draining: Draining | None) -> AsyncIterator:
    """chunks, until the shutdown's grace is over: then ShuttingDown (an ApiError 503) is raised
    in the consumer, which ends its stream with it.  Closing this closes chunks."""
    if draining is None:
        async for chunk in chunks:
            yield chunk
        return
    expired, step, waiter = draining.expired(), None, None
    try:
        while True:
            if expired.is_set():
                raise shutting_down()
            step = asyncio.ensure_future(anext(chunks))
            waiter = asyncio.ensure_future(expired.wait())
            await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not step.done():
                raise shutting_down()
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if waiter is not None:
            waiter.cancel()
        if step is not None and not step.done():  # the generator is running in it: stop it before closing
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
        await chunks.aclose()


class GracefulServer(uvicorn.Server):
    """uvicorn.Server with the shutdown above; its signal handlers exit 0 (uvicorn's own re-raise
    the signal when it returns, so the process would die of it)."""

    def __init__(self, config: uvicorn.Config, draining: Draining, grace_s: float):
        super().__init__(config)
        self.draining, self.grace_s = draining, grace_s

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # a server in a thread: no signals
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:  # the second signal: no more grace
            os.write(2, b"misotts serve: second signal, exiting now\n")
            os._exit(128 + sig)
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # stop accepting now; uvicorn closes the connections after the grace
            server.close()
        self.draining.begin()
        if self.server_state.tasks:
            log.info("shutting down: %d request(s) in flight get %.1f s to finish", len(self.server_state.tasks),
                     self.grace_s)
        await self._wait_for_tasks(self.grace_s)
        if self.server_state.tasks:
            log.info("shutting down: ending %d request(s) still in flight", len(self.server_state.tasks))
        self.draining.expire()
        await self._wait_for_tasks(END_S)
        await super().shutdown(sockets)

    async def _wait_for_tasks(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.server_state.tasks and loop.time() < deadline:
            await asyncio.sleep(0.05)
