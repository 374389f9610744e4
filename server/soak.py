"""Fault soak: valid, malformed and oversized requests, clients that leave mid-stream, clients that
trickle their bytes, and WebSocket sessions, all against one server, while a probe times /health.

    python -m misotts.server.soak --requests 300        # serves `tiny` itself on 127.0.0.1
    python -m misotts.server.soak --url http://127.0.0.1:8000 --requests 300

It fails (exit 1) on any 500, a /health slower than --health-ms (100) or not 200, resident memory
grown by more than --max-rss-growth-mb (when it serves the model itself), or KV blocks still in
use once the server is idle.  Bounded: a fixed number of requests, each with a timeout, and a
deadline for the run; loopback only when it serves itself.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

KINDS = ("valid", "malformed", "oversized", "disconnect", "slow", "valid_stream", "websocket", "slowloris")
MALFORMED = [b"{nope", b"[" * 50_000 + b"]" * 50_000, b'{"model": "s", "voice": "0", "input": "Hi.", "seed": 1' +
             b"0" * 5000 + b"}", b'{"model": "s", "voice": "\xd9\xa3", "input": "Hi."}',
             b'{"model": "s", "voice": "0", "input": "Hi.", "temperature": 1e999}',
             b'{"model": "s", "voice": "0", "input": "Hi.", "context": [{"text": "a", "codes": [[]]}]}',
             b'{"model": "s", "voice": "' + b"1" * 5000 + b'", "input": "Hi."}', b"null", b"\xff\xfe"]


@dataclass
class SoakResult:
    requests: int
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # kind:status -> count
    health_ms: list = field(default_factory=list)
    health_failures: int = 0
    rss_growth_mb: float | None = None
    blocks_in_use_after: float | None = None
    failures: list = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        ms = sorted(self.health_ms)
        return {"requests": self.requests, "outcomes": dict(sorted(self.outcomes.items())),
                "health_probes": len(ms), "health_max_ms": round(ms[-1], 1) if ms else None,
                "health_p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1) if ms else None,
                "rss_growth_mb": None if self.rss_growth_mb is None else round(self.rss_growth_mb, 1),
                "blocks_in_use_after": self.blocks_in_use_after, "wall_s": round(self.wall_s, 1),
                "failures": self.failures[:20]}


def _speech(i: int, **extra) -> dict:
    return {"model": "soak", "voice": str(i % 4), "input": f"Soak {i}.", "response_format": "pcm",
            "max_audio_ms": 160, "seed": i, **extra}


async def _post(client, url, body: bytes) -> int:
    response = await client.post(f"{url}/v1/audio/speech", content=body, headers={"content-type": "application/json"})
    return response.status_code


async def _raw(url: str, head: bytes, body: bytes, pieces: int = 1, pause_s: float = 0.0) -> int:
    """A request written by hand (in `pieces`, `pause_s` apart): the response's status, 0 if closed."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        data = head + body
        step = max(1, len(data) // pieces)
        for start in range(0, len(data), step):
            writer.write(data[start:start + step])
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        line = await reader.readline()
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0
    except ConnectionError:
        return 0
    finally:
        writer.close()


def _head(url: str, length: int) -> bytes:
    return (f"POST /v1/audio/speech HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def _one(kind: str, i: int, client, url: str, body_limit: int, header_timeout_s: float) -> str:
    """One request of `kind`; returns its outcome (a status, or what happened)."""
    if kind == "valid":
        return str(await _post(client, url, json.dumps(_speech(i)).encode()))
    if kind == "valid_stream":
        fmt = ("audio", "sse")[i % 2]
        async with client.stream("POST", f"{url}/v1/audio/speech", json=_speech(i, stream_format=fmt)) as response:
            async for _ in response.aiter_raw():
                pass
            return str(response.status_code)
    if kind == "malformed":
        return str(await _post(client, url, MALFORMED[i % len(MALFORMED)]))
    if kind == "oversized":  # declared over the limit: refused before the body is sent
        return str(await _raw(url, _head(url, body_limit + 1), b"{" + b" " * 1000))
    if kind == "disconnect":  # leaves after the first audio
        body = json.dumps(_speech(i, max_audio_ms=5000, stream_format="audio")).encode()
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(_head(url, len(body)) + body)
        await writer.drain()
        line = await reader.readline()
        await reader.read(100)
        writer.close()
        return f"{int(line.split()[1]) if line else 0}-left"
    if kind == "slow":  # a whole request, trickled in 6 pieces
        body = json.dumps(_speech(i)).encode()
        return str(await _raw(url, _head(url, len(body)), body, pieces=6, pause_s=0.15))
    if kind == "slowloris":  # a head that never ends: the server must close it
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        try:
            closed = await asyncio.wait_for(reader.read(100), header_timeout_s + 5) == b""
        except asyncio.TimeoutError:
            closed = False
        writer.close()
        return "closed" if closed else "held-open"
    if kind == "websocket":
        from websockets.asyncio.client import connect

        async with connect(url.replace("http://", "ws://") + "/v1/audio/speech/stream") as ws:
            await ws.send(json.dumps({"type": "session.config", "max_audio_ms": 80}))
            await ws.send("not json")
            await ws.send(json.dumps({"type": "text.delta", "text": "Hi there. "}))
            await ws.send(json.dumps({"type": "text.done"}))
            kinds = []
            while not kinds or kinds[-1] != "done":
                message = await ws.recv()
                if isinstance(message, str):
                    kinds.append(json.loads(message)["type"])
            return "ws-ok" if kinds.count("error") == 1 else f"ws-{kinds}"
    raise ValueError(kind)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _HealthProbe(threading.Thread):
    """GET /health every interval on one keep-alive connection, timing each, in a thread of its own."""

    def __init__(self, url: str, result: SoakResult, interval_s: float = 0.1):
        super().__init__(name="soak-health", daemon=True)
        self.url, self.result, self.interval_s, self.stop = url, result, interval_s, threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.wait(self.interval_s):
                start = time.perf_counter()
                try:
                    ok = client.get(f"{self.url}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.result.health_ms.append((time.perf_counter() - start) * 1000)
                self.result.health_failures += not ok


async def run_soak(url: str, requests: int = 200, concurrency: int = 8, body_limit: int = 32 * 2**20,
                   header_timeout_s: float = 10.0, request_timeout_s: float = 60, deadline_s: float = 300,
                   health_ms: float = 100, max_rss_growth_mb: float | None = None) -> SoakResult:
    result = SoakResult(requests)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s)) as client:
        await asyncio.gather(*(_one("valid", -1 - k, client, url, body_limit, header_timeout_s) for k in range(4)))
        rss_before = _rss_mb() if max_rss_growth_mb is not None else None
        probe = _HealthProbe(url, result)
        probe.start()
        start, next_i = time.monotonic(), iter(range(requests))

        async def worker():
            for i in next_i:
                kind = KINDS[i % len(KINDS)]
                try:
                    outcome = await asyncio.wait_for(_one(kind, i, client, url, body_limit, header_timeout_s),
                                                     request_timeout_s)
                except (httpx.HTTPError, OSError, asyncio.TimeoutError) as err:
                    outcome = type(err).__name__
                result.outcomes[f"{kind}:{outcome}"] += 1

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, late = await asyncio.wait(workers, timeout=deadline_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        result.wall_s = time.monotonic() - start
        probe.stop.set()
        probe.join(15)
        if late:
            result.failures.append(f"the run passed its {deadline_s:.0f} s deadline")
        deadline = time.monotonic() + 30
        while True:
            metrics = (await client.get(f"{url}/metrics")).text
            result.blocks_in_use_after = next((float(line.split()[-1]) for line in metrics.splitlines()
                                               if line.startswith("misotts_kv_blocks_in_use ")), None)
            if result.blocks_in_use_after in (0, None) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    if rss_before is not None:
        result.rss_growth_mb = _rss_mb() - rss_before
    _judge(result, health_ms, max_rss_growth_mb)
    return result


def _judge(result: SoakResult, health_ms: float, max_rss_growth_mb: float | None) -> None:
    expected = {"valid": {"200"}, "valid_stream": {"200"}, "slow": {"200"}, "oversized": {"413"},
                "disconnect": {"200-left"}, "slowloris": {"closed"}, "websocket": {"ws-ok"}}
    for key, count in result.outcomes.items():
        kind, outcome = key.split(":", 1)
        if outcome.startswith("5") or outcome.startswith("ws-[") or \
                (kind in expected and outcome not in expected[kind] and outcome != "429") or \
                (kind == "malformed" and not outcome.startswith("4")):
            result.failures.append(f"{count} x {kind} -> {outcome}")
    if result.health_failures:
        result.failures.append(f"/health failed {result.health_failures} times")
    if result.health_ms and max(result.health_ms) > health_ms:
        result.failures.append(f"/health took {max(result.health_ms):.0f} ms (limit {health_ms:.0f})")
    if max_rss_growth_mb is not None and result.rss_growth_mb > max_rss_growth_mb:
        result.failures.append(f"resident memory grew {result.rss_growth_mb:.0f} MB (limit {max_rss_growth_mb:.0f})")
    if result.blocks_in_use_after not in (0, None):
        result.failures.append(f"{result.blocks_in_use_after:.0f} KV blocks still in use once idle")


def soak_here(model: str = "tiny", **kwargs) -> SoakResult:
    """Serve `model` on 127.0.0.1 (as `misotts serve` does, with small body and header limits so
    that oversized and slow requests are cheap) and soak it."""
    import misotts

    from .app import create_app
    from .background import serving
    from .limits import Limits, uvicorn_settings

    limits = Limits(max_body_bytes=2**20, header_timeout_s=2.0)
    tts = misotts.load(model, progress=False, engine={"max_waiting": 256})
    try:
        with serving(create_app(tts, model_name=model, limits=limits), settings=uvicorn_settings(limits)) as url:
            return asyncio.run(run_soak(url, body_limit=limits.max_body_bytes, header_timeout_s=limits.header_timeout_s,
                                        **kwargs))
    finally:
        tts.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m misotts.server.soak", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server; default: serve --model here on 127.0.0.1")
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--deadline-s", type=float, default=300)
    p.add_argument("--health-ms", type=float, default=100)
    p.add_argument("--max-rss-growth-mb", type=float, default=300, help="when serving here")
    p.add_argument("--body-limit", type=int, default=32 * 2**20, help="the server's body limit (with --url)")
    args = p.parse_args(argv)
    common = dict(requests=args.requests, concurrency=args.concurrency, deadline_s=args.deadline_s,
                  health_ms=args.health_ms)
    if args.url:
        result = asyncio.run(run_soak(args.url, body_limit=args.body_limit, **common))
    else:
        result = soak_here(args.model, max_rss_growth_mb=args.max_rss_growth_mb, **common)
    print(json.dumps(result.summary(), indent=1))
    return 1 if result.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
