"""Load test: N concurrent streaming speech requests; time to first audio, errors, leaked blocks.

    python -m misotts.server.loadtest --requests 64              # serves `tiny` itself on 127.0.0.1
    python -m misotts.server.loadtest --url http://127.0.0.1:8000 --requests 64

Bounded: every request has a timeout, and the whole run a deadline after which what is still
running is cancelled (and counted as an error).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx

FRAME_BYTES = 1920 * 2  # one 80 ms frame of pcm16


@dataclass
class LoadResult:
    requests: int
    completed: int = 0
    errors: dict = field(default_factory=dict)  # status code or exception name -> count
    ttfa_s: list = field(default_factory=list)
    total_s: list = field(default_factory=list)
    audio_s: float = 0.0
    wall_s: float = 0.0
    blocks_in_use_after: float | None = None  # from /metrics, once the server is idle

    def percentile(self, values, q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else \
            (values[0] if values else float("nan"))

    def summary(self) -> dict:
        return {"requests": self.requests, "completed": self.completed, "errors": self.errors,
                "ttfa_p50_ms": round(self.percentile(self.ttfa_s, 50) * 1000, 1),
                "ttfa_p99_ms": round(self.percentile(self.ttfa_s, 99) * 1000, 1),
                "total_p50_ms": round(self.percentile(self.total_s, 50) * 1000, 1),
                "audio_s": round(self.audio_s, 2), "wall_s": round(self.wall_s, 2),
                "audio_s_per_wall_s": round(self.audio_s / self.wall_s, 3) if self.wall_s else None,
                "blocks_in_use_after": self.blocks_in_use_after}


async def _one(client: httpx.AsyncClient, url: str, i: int, max_audio_ms: float, result: LoadResult) -> None:
    body = {"model": "load", "voice": str(abs(i) % 4), "input": f"Request number {i} is speaking now.",
            "response_format": "pcm", "stream_format": "audio", "max_audio_ms": max_audio_ms, "seed": abs(i)}
    start, first, size = time.perf_counter(), None, 0
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            if response.status_code != 200:
                key = str(response.status_code)
                result.errors[key] = result.errors.get(key, 0) + 1
                return
            async for data in response.aiter_raw():
                first = first or time.perf_counter()
                size += len(data)
    except (httpx.HTTPError, asyncio.CancelledError) as err:
        key = type(err).__name__
        result.errors[key] = result.errors.get(key, 0) + 1
        if isinstance(err, asyncio.CancelledError):
            raise
        return
    result.completed += 1
    result.ttfa_s.append(first - start)
    result.total_s.append(time.perf_counter() - start)
    result.audio_s += size / FRAME_BYTES * 0.08


async def run_load(url: str, requests: int = 64, max_audio_ms: float = 160, request_timeout_s: float = 120,
                   deadline_s: float = 300, idle_timeout_s: float = 30, warmup: int = 0) -> LoadResult:
    """All `requests` at once; then waits (at most idle_timeout_s) for the server's KV blocks in use
    to drop to zero, and reports what it found.  warmup: requests sent together first and not
    counted (the first batches of a fresh server pay one-time costs)."""
    result = LoadResult(requests)
    limits = httpx.Limits(max_connections=requests + 4, max_keepalive_connections=requests + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s), limits=limits) as client:
        if warmup:
            scratch = LoadResult(warmup)
            await asyncio.wait_for(asyncio.gather(*(_one(client, url, -1 - i, max_audio_ms, scratch)
                                                    for i in range(warmup))), deadline_s)
        start = time.perf_counter()
        tasks = [asyncio.create_task(_one(client, url, i, max_audio_ms, result)) for i in range(requests)]
        done, late = await asyncio.wait(tasks, timeout=deadline_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result.wall_s = time.perf_counter() - start
        deadline = time.monotonic() + idle_timeout_s
        while True:
            result.blocks_in_use_after = _gauge((await client.get(f"{url}/metrics")).text, "misotts_kv_blocks_in_use")
            # None: the server reports no engine gauges (the Ray Serve API: its replicas hold the engines)
            if result.blocks_in_use_after in (0, None) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    return result


def _gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m misotts.server.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server; default: serve `--model` here on 127.0.0.1")
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-audio-ms", type=float, default=160)
    p.add_argument("--deadline-s", type=float, default=300)
    p.add_argument("--warmup", type=int, default=8, help="requests sent together first, not counted")
    args = p.parse_args(argv)
    if args.url:
        result = asyncio.run(run_load(args.url, args.requests, args.max_audio_ms, deadline_s=args.deadline_s,
                                      warmup=args.warmup))
    else:
        import misotts
        from misotts.server import create_app
        from misotts.server.background import serving

        tts = misotts.load(args.model, progress=False, engine={"max_waiting": max(64, args.requests)})
        try:
            with serving(create_app(tts, model_name=args.model)) as url:
                result = asyncio.run(run_load(url, args.requests, args.max_audio_ms, deadline_s=args.deadline_s,
                                              warmup=args.warmup))
        finally:
            tts.close()
    print(json.dumps(result.summary(), indent=1))
    return 0 if not result.errors and result.blocks_in_use_after in (0, None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
