"""The CPU's int8 frame against its float32 frame, in one run (a script, never a test):

    python -m misotts.bench.quant_cpu [--preset csm-1b] [--frames 6] [--rounds 2] [--threads N]

Both models are the preset with the same seeded random weights (the int8 one quantised as it
is drawn), served by the engine at batch 1 on the CPU.  Rounds alternate float32 and int8, so
a neighbour's load on a shared machine falls on both; each round times `--frames` frames after
the first (the first pays the prefill), and the table gives each model's median ms per frame.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import misotts
from misotts.weights.quantize import SCHEMES

from .run import default_out


def frame_times(tts, frames: int, seed: int) -> list[float]:
    """Seconds between frames of one greedy stream, after its first frame."""
    stamps = []
    for _ in tts.submit("Timing the frames of the quantised model.", max_audio_ms=(frames + 1) * 80,
                        temperature=0.0, seed=seed, stop_on_eos=False):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m misotts.bench.quant_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--weights", default="int8", choices=["int8"], help="the CPU's scheme")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    assert args.weights in SCHEMES
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for weights in (None, args.weights):
        name = weights or "float32"
        models[name] = misotts.load(args.preset, device="cpu", dtype=torch.float32, random_init=True, seed=0,
                                    weights=weights, engine={"max_batch": 1}, progress=False)
        frame_times(models[name], 1, seed=0)  # warm-up: first allocations, the prompt path
    times = {name: [] for name in models}
    for r in range(args.rounds):
        for name, tts in models.items():
            times[name] += frame_times(tts, args.frames, seed=r)
            print(f"round {r}: {name} {statistics.median(times[name]) * 1e3:.0f} ms/frame so far", flush=True)
    result = {"preset": args.preset, "threads": torch.get_num_threads(), "frames_per_round": args.frames,
              "rounds": args.rounds}
    for name, tts in models.items():
        result[name] = {"median_ms": statistics.median(times[name]) * 1e3, "min_ms": min(times[name]) * 1e3,
                        "weight_bytes": tts.info()["weight_bytes"], "frames": len(times[name])}
        tts.close()
    speedup = result["float32"]["median_ms"] / result[args.weights]["median_ms"]
    result["speedup"] = speedup
    print(f"\n| {args.preset}, CPU, {result['threads']} threads, batch 1 | ms/frame (median) | min | weights GiB |")
    print("|---|---|---|---|")
    for name in models:
        r = result[name]
        print(f"| {name} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['weight_bytes'] / 2**30:.2f} |")
    print(f"\n{args.weights} frame: {speedup:.2f}x faster than float32")
    out = default_out(torch.device("cpu")) if args.out is None else args.out
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"quant_cpu_{args.preset}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
