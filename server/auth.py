"""Who may call: the API key, and for a server without one, which browser pages may.

With a key, every /v1 route needs it (a browser page cannot send it cross-origin without a CORS
preflight, which this server never grants).  Without a key, nothing stops a page a user visits
from posting to a server on their machine or network, so a keyless server refuses requests that
carry a foreign `Origin` (browsers send it; other clients do not) and takes speech bodies only as
`application/json` (which a page cannot send cross-origin without that preflight either)."""
from __future__ import annotations

from urllib.parse import urlsplit


def check_api_key(key: str) -> str:
    """The key as given, or ValueError: an empty key would switch auth off silently, and one with
    characters outside printable ASCII cannot be sent in a header, so it could never match."""
    if not key:
        raise ValueError("the API key is empty: give a key, or unset MISOTTS_API_KEY / drop --api-key to serve "
                         "without one")
    if not (key.isascii() and key.isprintable()) or key != key.strip() or " " in key:
        raise ValueError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


def foreign_origin(headers, host_header: str | None) -> str | None:
    """The request's Origin if it names a site other than the server itself, else None."""
    origin = headers.get("origin")
    if origin is None:
        return None
    if origin == "null":  # sandboxed frames, file:// pages
        return origin
    return None if urlsplit(origin).netloc.lower() == (host_header or "").lower() else origin
