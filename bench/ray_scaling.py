"""Throughput of `misotts serve --ray` with 1, 2, ... engine replicas, and of `misotts serve` in one
process (the peer), side by side in one run.

    python -m misotts.bench.ray_scaling --replicas 1,2 --model tiny --requests 32 --max-audio-ms 800

One local Ray; for each replica count the same deployment (one API replica, N engine replicas of
`--threads` torch threads each) serves the same bounded load (`misotts.server.loadtest`: every
request at once, streaming pcm, a deadline), then is removed.  Writes ray-scaling.json and
ray-scaling.md to --out (default bench/results/<date>-<device>-ray-scaling).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import time
from pathlib import Path

import torch

from misotts.server.background import free_port

from .run import default_out, device_name


def measure_single_process(model: str, threads: int, lanes: int, requests: int, max_audio_ms: float, warmup: int,
                           deadline_s: float) -> dict:
    """The peer: `misotts serve` (one process, no Ray) under the same load."""
    import subprocess
    import sys

    import httpx

    from misotts.server.loadtest import run_load

    port = free_port()
    cmd = [sys.executable, "-m", "misotts", "serve", "--model", model, "--device", "cpu", "--port", str(port),
           "--max-batch", str(lanes), "--max-waiting", str(requests + warmup)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        start, deadline = time.perf_counter(), time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"misotts serve did not start (exit {proc.poll()})")
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        up_s = time.perf_counter() - start
        result = asyncio.run(run_load(f"http://127.0.0.1:{port}", requests, max_audio_ms, deadline_s=deadline_s,
                                      idle_timeout_s=30, warmup=warmup))
    finally:
        proc.terminate()
        proc.wait(60)
    return {"replicas": "single process", "threads_per_replica": threads, "lanes_per_replica": lanes,
            "deploy_s": round(up_s, 1), **result.summary()}


def measure(counts: list[int], model: str, threads: int, lanes: int, requests: int, max_audio_ms: float,
            warmup: int, deadline_s: float) -> list[dict]:
    import ray
    from ray import serve

    from misotts.server.loadtest import run_load
    from misotts.server.ray_config import ReplicaConfig, Scaling
    from misotts.server.ray_serve import build

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for n in counts:
            config = ReplicaConfig(model=model, device="cpu", threads=threads,
                                   engine={"max_batch": lanes, "max_waiting": requests + warmup, "wait_timeout_s": 600})
            name = f"replicas-{n}"
            start = time.perf_counter()
            serve.run(build(config, Scaling(replicas=n, cpus=threads, max_queued=requests + warmup)), name=name,
                      route_prefix=f"/{name}")
            up_s = time.perf_counter() - start
            result = asyncio.run(run_load(f"http://127.0.0.1:{port}/{name}", requests, max_audio_ms,
                                          deadline_s=deadline_s, idle_timeout_s=0, warmup=warmup))
            serve.delete(name)
            row = {"replicas": n, "threads_per_replica": threads, "lanes_per_replica": lanes,
                   "deploy_s": round(up_s, 1), **result.summary()}
            row.pop("blocks_in_use_after", None)  # the API holds no engine: the gauge is the replicas'
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    ray_rows = [r for r in rows if isinstance(r["replicas"], int)]
    base = (ray_rows[0]["audio_s_per_wall_s"] if ray_rows else None) or float("nan")
    lines = [f"# serve --ray throughput, {meta['model']}, {meta['device']}", "",
             f"{meta['date']}; {meta['requests']} streaming requests at once of {meta['max_audio_ms']:.0f} ms of "
             f"audio each, after {meta['warmup']} warm-up requests; one API replica; engine replicas (and the "
             f"single-process peer, `misotts serve`) of "
             f"{rows[0]['threads_per_replica']} torch thread(s) and {rows[0]['lanes_per_replica']} lanes.", "",
             "| engine replicas | audio s / wall s | vs 1 Ray replica | TTFA p50 ms | TTFA p99 ms | request p50 ms "
             "| completed | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        speedup = (r["audio_s_per_wall_s"] or float("nan")) / base
        lines.append(f"| {r['replicas']} | {r['audio_s_per_wall_s']} | {speedup:.2f}x | {r['ttfa_p50_ms']} | "
                     f"{r['ttfa_p99_ms']} | {r['total_p50_ms']} | {r['completed']}/{r['requests']} | "
                     f"{r['errors'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m misotts.bench.ray_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--replicas", default="1,2", help="engine replica counts to measure, e.g. 1,2")
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine replica")
    p.add_argument("--lanes", type=int, default=8, help="engine lanes (max_batch) per replica")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-audio-ms", type=float, default=800)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--deadline-s", type=float, default=600, help="per replica count; late requests are cancelled")
    p.add_argument("--no-single-process", dest="single_process", action="store_false",
                   help="skip the peer row: `misotts serve` in one process, no Ray")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",")]
    torch.set_num_threads(args.threads)
    device = device_name(torch.device("cpu"))
    cpu_out = default_out(torch.device("cpu"))
    out = Path(args.out) if args.out else cpu_out.with_name(f"{cpu_out.name}-ray-scaling")
    load = (args.model, args.threads, args.lanes, args.requests, args.max_audio_ms, args.warmup, args.deadline_s)
    rows = [measure_single_process(*load)] if args.single_process else []
    if rows:
        print(json.dumps(rows[0]), flush=True)
    rows += measure(counts, *load)
    meta = {"date": datetime.date.today().isoformat(), "device": device, "cores": os.cpu_count(), "model": args.model,
            "requests": args.requests, "max_audio_ms": args.max_audio_ms, "warmup": args.warmup}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray-scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "ray-scaling.md").write_text(markdown(meta, rows))
    print(f"wrote {out}/ray-scaling.md")
    return 0 if all(r["completed"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
