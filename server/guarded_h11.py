"""uvicorn's h11 protocol with the one limit uvicorn lacks: a deadline for a request's headers.

uvicorn closes an idle keep-alive connection, but a client that trickles its headers a byte at a
time (slowloris) holds the connection for ever.  Here each connection, when it opens and after
each response, gets header_timeout_s to deliver the next request's headers whole; one that has
not is closed.
"""
from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import LIMITS


class GuardedH11(H11Protocol):
    header_timeout_s = LIMITS.header_timeout_s

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._generation = 0
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._generation += 1
        self.loop.call_later(self.header_timeout_s, self._headers_due, self._generation)

    def _headers_due(self, generation: int) -> None:
        # IDLE: h11 has not parsed a whole request head since the deadline was armed
        if generation == self._generation and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
