"""`python -m misotts.bench` / `misotts bench`: latency, throughput and memory of each system on
each preset (seeded random weights), next to transformers and the bandwidth floor.

For every model: load it, measure the copy bandwidth and matmul rate, then for every system
(`systems.py`) in turn -- each built, measured and dropped before the next, so that its peak
memory is its own working set over the shared weights:

- a warm-up stream;
- per workload (`short`: a ~30-position prompt; `context`: two earlier turns of 10 s of codes
  each): one stream of codes (first codes, per-frame latency), then `repeats` streams of audio
  (time to first audio, real-time factor), each context one followed by a one-frame `follow-up`
  turn whose history is that context plus the turn just made (time to first audio again);
- throughput at each concurrency N of `streams`, every frame decoded to PCM, `repeats` times:
  for the engine a steady window of N concurrent streams (ramp up and down excluded, `load.py`),
  for the peers the frames after the first of a static batch;
- for the engine, the most streams that all stay real time (every stream's p99 gap between frames
  <= 80 ms; doubling then bisection, bounded by `rt_search_s` and `rt_max_tries`), and at that
  load the time to first audio of new streams arriving one by one.

Each model's results go to `<out>/part-<model>-<systems>.json` as they come (a run cut short
keeps what it measured); `report.py` merges the parts of a folder into results.{json,md,png}.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from misotts.runtime.audio import FRAME_MS, FRAME_S

from . import floors
from .provenance import code_version
from .load import realtime
from .rt_search import max_passing
from .stats import (format_first_audio, gap_p99_ms, median, median_parts, stream_metrics, throughput,
                    window_count, window_rate)
from .systems import EngineSystem, Reference, Transformers, Workload

RESULTS = Path(__file__).parent / "results"
SHORT_TEXT = "Hello! How are you today?"  # 30 prompt positions with the byte tokenizer
CONTEXT = [(1, "Hi, it is good to see you."), (0, "It has been a long week.")]
FOLLOW_UP = (1, "Tell me more about it.")
CONTEXT_FRAMES = 10_000 // FRAME_MS  # 10 s of audio per earlier turn
ALL_SYSTEMS = ("reference", "engine", "transformers", "transformers-static")


@dataclass
class Plan:
    frames: int = 24  # frames per stream
    repeats: int = 3  # audio streams per workload (time to first audio is their median)
    streams: tuple = (1, 4, 16, 64)  # concurrency levels
    batch_frames: int = 12  # frames per stream in a peer's static-batch throughput run
    workloads: tuple = ("short", "context", "follow-up")
    window_frames: int = 16  # frames per stream in the engine's steady window
    rt_search_s: float = 12.0  # time for the real-time streams search (0: no search)
    rt_max_tries: int = 8  # loads the search may try beyond the throughput levels
    ttfa_arrivals: int = 8  # new streams timed to first audio at the real-time load


# What a run measures when not told otherwise: the full plan on a GPU; on the CPU `tiny` with
# fewer frames and streams, and csm-1b's 1.5B fp32 parameters on 3 frames of the short prompt.
# The GPU suite's engine steps (bench/gpu_suite.sh: 18 % and 14 % of its budget, about 80 and 60 s
# with the model's load) hold the steady runs and the search: hence a 16-frame window and 12 s.
PLANS = {
    "cuda": Plan(),
    "cpu": Plan(frames=12, repeats=2, streams=(1, 4, 16), batch_frames=4, window_frames=6, rt_search_s=20,
                rt_max_tries=4, ttfa_arrivals=3),
    ("cpu", "csm-1b"): Plan(frames=3, repeats=1, streams=(), workloads=("short",)),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    threads = torch.get_num_threads()
    return f"CPU {names[0] if names else platform.processor() or 'unknown'} ({os.cpu_count()} cores, " \
           f"{threads} thread{'s' * (threads != 1)})"


def default_out(device: torch.device) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return RESULTS / f"{datetime.date.today().isoformat()}-{slug}"


def workloads(seed: int, n: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    import misotts

    context = tuple(misotts.Segment(spk, text, codes=torch.randint(0, 2048, (CONTEXT_FRAMES, n), generator=g))
                    for spk, text in CONTEXT)
    return {"short": Workload("short", SHORT_TEXT), "context": Workload("context", SHORT_TEXT, 0, context)}


def follow_up(wl: Workload, codes: torch.Tensor) -> Workload:
    """The next turn: the history is `wl`'s context plus the turn just generated (its codes)."""
    import misotts
    from misotts.runtime.prompt import mimi_codes

    turn = misotts.Segment(wl.speaker, wl.text, codes=mimi_codes(codes))
    return Workload("follow-up", FOLLOW_UP[1], FOLLOW_UP[0], (*wl.context, turn))


class Peak:
    """Peak GPU memory (GiB) allocated while the block runs; None on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.gib = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.gib = torch.cuda.max_memory_allocated() / 2**30


def measure(system, wls: dict, plan: Plan, seed: int, device, say, out: dict | None = None,
            save=lambda: None) -> dict:
    """Fills `out` (returned) as it goes, calling save() after the latency runs, each throughput
    level and the search, so that a step cut off by its time limit keeps what it measured."""
    forget = getattr(system, "forget", lambda: None)
    out = {} if out is None else out
    with Peak(device) as peak:
        say("warm-up")
        start = time.perf_counter()
        system.stream(wls["short"], 2, seed, audio=True)
        out["warmup_s"] = time.perf_counter() - start
        for name in [w for w in ("short", "context") if w in plan.workloads]:
            wl = wls[name]
            say(f"{name}: {plan.frames} frames of codes")
            forget()
            times, _ = system.stream(wl, plan.frames, seed, audio=False)
            codes = stream_metrics(times)
            runs, follow, parts = [], [], []
            for r in range(plan.repeats):
                say(f"{name}: audio stream {r + 1}/{plan.repeats}")
                forget()
                times, made = system.stream(wl, plan.frames, seed + 1 + r, audio=True)
                runs.append(stream_metrics(times))
                stats = getattr(system, "last_stats", None)  # the engine's; the peers have none
                if hasattr(stats, "first_audio_ms"):
                    parts.append(stats.first_audio_ms())
                if name == "context" and "follow-up" in plan.workloads:
                    times, _ = system.stream(follow_up(wl, made), 1, seed + 1 + r, audio=True)
                    follow.append(times[0] * 1e3)
            out[name] = {
                "frames": codes["frames"], "first_codes_ms": codes["first_ms"], "frame_ms": codes["frame_ms"],
                "frame_p90_ms": codes["frame_p90_ms"], "ttfa_ms": median([m["first_ms"] for m in runs]),
                "ttfa_runs_ms": [m["first_ms"] for m in runs], "rtf": median([m["rtf"] for m in runs]),
                "audio_frame_ms": median([m["frame_ms"] for m in runs]),
            }
            if parts:
                out[name]["first_audio_ms"] = median_parts(parts)
                say(f"{name}: {format_first_audio(out[name]['first_audio_ms'])} (medians from submit)")
            if follow:
                out["follow-up"] = {"ttfa_ms": median(follow), "ttfa_runs_ms": follow}
    out["peak_mem_gib"] = peak.gib
    out["throughput"] = {}
    save()
    for streams in [n for n in plan.streams if n <= getattr(system, "max_streams", n)]:
        runs = []
        for r in range(plan.repeats):
            say(f"throughput: {streams} stream(s), run {r + 1}/{plan.repeats}")
            with Peak(device) as peak:
                runs.append(throughput_run(system, wls["short"], streams, plan, seed + 1000 * r))
            runs[-1]["peak_mem_gib"] = peak.gib
        out["throughput"][str(streams)] = level = summarize_level(runs)
        say(f"throughput: {streams} stream(s): {level['audio_s_per_s']:.2f} audio s/s (median of {len(runs)}), "
            f"worst p99 gap {level['worst_gap_p99_ms']:.1f} ms")
        save()
    if hasattr(system, "steady") and plan.rt_search_s > 0 and plan.streams:
        out["realtime"] = realtime_streams(system, wls["short"], plan, seed, out["throughput"], say)
        save()
    return out


def stream_frames(plan: Plan, streams: int) -> int:
    """Frames each stream of a steady run is asked for: more than the ramp (at most a frame per
    stream admitted), the window and the staggered arrivals can take, so none ends before it is
    cancelled.  The engine's KV pool is sized for it."""
    return 2 * plan.window_frames + streams + 16 + 8 * plan.ttfa_arrivals


def throughput_run(system, wl: Workload, streams: int, plan: Plan, seed: int) -> dict:
    """One run at `streams` streams: the engine's steady window, else a static batch's frames after
    the first (the prompt and prefill excluded; a static batch has no ramp down)."""
    if hasattr(system, "steady"):
        run = system.steady(wl, streams, plan.window_frames, stream_frames(plan, streams), seed)
        return {"method": "steady", **run}
    times = system.batch(wl, streams, plan.batch_frames, seed)
    run = {"method": "static batch", "wall_s": times[-1], "ramp_s": times[0]}
    if len(times) < 2:  # one frame: no window after it, only the wall time
        return {**run, "audio_s_per_s": throughput(streams, len(times), times[-1]), "frames": streams * len(times),
                "window_s": times[-1], "gap_p99_ms": [float("nan")], "worst_gap_p99_ms": float("nan")}
    every = [times] * streams  # all streams' frames reach the host together
    gap = gap_p99_ms(times, times[0], times[-1])
    return {**run, "audio_s_per_s": window_rate(every, times[0], times[-1]),
            "frames": window_count(every, times[0], times[-1]), "window_s": times[-1] - times[0],
            "gap_p99_ms": [gap], "worst_gap_p99_ms": gap}


def summarize_level(runs: list[dict]) -> dict:
    """A level's runs: the median throughput (audio_s_per_s, what the report and targets read),
    its min and max, and whether its median run kept every stream real time."""
    rates = [r["audio_s_per_s"] for r in runs]
    worst = median([r["worst_gap_p99_ms"] for r in runs])
    peaks = [r["peak_mem_gib"] for r in runs if r.get("peak_mem_gib") is not None]
    return {"audio_s_per_s": median(rates), "audio_s_per_s_min": min(rates), "audio_s_per_s_max": max(rates),
            "method": runs[0]["method"], "window_s": median([r["window_s"] for r in runs]),
            "wall_s": median([r.get("wall_s", r["ramp_s"] + r["window_s"]) for r in runs]),
            "worst_gap_p99_ms": worst, "realtime": worst <= FRAME_MS, "peak_mem_gib": max(peaks, default=None),
            "runs": runs}


def realtime_streams(system, wl: Workload, plan: Plan, seed: int, levels: dict, say) -> dict:
    """The most streams (up to the engine's lanes) that all stay real time in a steady window,
    the throughput levels counting as tries already made; then, at that load, new streams
    arriving one at a time into N - 1 running (into none when N is 0), each timed to its first audio."""
    start = time.perf_counter()
    # a level's median run (by its worst gap) stands for it
    runs = {int(n): sorted(level["runs"], key=lambda r: r["worst_gap_p99_ms"])[len(level["runs"]) // 2]
            for n, level in levels.items()}

    def passes(n: int) -> bool:
        say(f"real-time search: {n} stream(s)")
        runs[n] = system.steady(wl, n, plan.window_frames, stream_frames(plan, n), seed)
        runs[n]["method"] = "steady"
        return realtime(runs[n], FRAME_MS)

    known = {int(n): level["realtime"] for n, level in levels.items()}
    found = max_passing(passes, system.max_streams, plan.rt_max_tries, known,
                        lambda: time.perf_counter() - start > plan.rt_search_s)
    out = {"streams": found.n, "cap": system.max_streams, "exact": found.exact, "first_fail": found.first_fail,
           "stopped": found.stopped, "tried": [[n, ok, runs[n]["worst_gap_p99_ms"]] for n, ok in found.tried],
           "known": {str(n): ok for n, ok in sorted(known.items())}, "search_s": time.perf_counter() - start}
    say(f"real-time search: {found.n} stream(s) ({'exact' if found.exact else 'a lower bound: ' + found.stopped}, "
        f"first fail {found.first_fail}) in {out['search_s']:.1f} s")
    if found.n:
        out["gap_p99_ms"] = runs[found.n]["gap_p99_ms"]
    load_n = max(found.n, 1)  # with no load real time, arrivals into an idle engine
    say(f"time to first audio: {plan.ttfa_arrivals} arrival(s) into {load_n - 1} running stream(s)")
    load = system.arrivals(wl, load_n - 1, plan.ttfa_arrivals, stream_frames(plan, load_n), seed)
    out.update({k: load[k] for k in ("ttfa_ms", "ttfa_p50_ms", "ttfa_p99_ms", "background_gap_p99_ms")},
               arrivals=load["arrivals"], background=load["background"])
    if load["first_audio_ms"]:
        out["first_audio_ms"] = median_parts(load["first_audio_ms"])
    say(f"at {load_n} stream(s): ttfa p50 {load['ttfa_p50_ms']:.1f} ms, p99 {load['ttfa_p99_ms']:.1f} ms"
        + (f"; {format_first_audio(out['first_audio_ms'])}" if "first_audio_ms" in out else ""))
    return out


def prompt_shape(tts, wl: Workload) -> dict:
    rows, mask = tts.prompt(wl.text, wl.speaker, wl.context)
    audio = int(mask[:, 0].sum())
    return {"positions": rows.shape[0], "text_rows": rows.shape[0] - audio, "audio_rows": audio}


def floor_ms(tts, shapes: dict, plan: Plan, bandwidth: float, flops: float) -> dict:
    cfg, b = tts.config, tts.model.audio_head.element_size()
    mimi = floors.mimi_decode_bytes(tts.codec)
    out = {}
    for name, s in shapes.items():
        kv = s["positions"] + plan.frames // 2  # the middle of the stream
        first = max(floors.first_audio_bytes(cfg, s["text_rows"], s["audio_rows"], b, mimi) / bandwidth,
                    floors.prefill_flops(cfg, s["positions"]) / flops)
        out[name] = {"frame_ms": floors.frame_bytes(cfg, kv, b) / bandwidth * 1e3, "ttfa_ms": first * 1e3}
    kv = shapes["short"]["positions"] + plan.batch_frames // 2
    out["throughput"] = {str(n): n * FRAME_S / (floors.frame_bytes(cfg, kv, b, n) / bandwidth) for n in plan.streams}
    return out


def make_system(name: str, tts, plan: Plan, max_positions: int, compile: bool | None = None):
    if name == "reference":
        return Reference(tts)
    if name == "engine":
        return EngineSystem(tts, max(plan.streams, default=1), max_positions, compile)
    if name == "transformers":
        return Transformers(tts)
    if name == "transformers-static":
        return Transformers(tts, static=True, max_len=-(-max_positions // 256) * 256)
    raise ValueError(f"unknown system {name!r}; known: {', '.join(ALL_SYSTEMS)}")


def run_model(model: str, systems: list[str], plan: Plan, device, dtype, seed: int, out: Path,
              compile: bool | None = None) -> dict:
    import misotts
    import transformers

    log(f"{model}: loading seeded random weights ({dtype} on {device})")
    # The reference system is the plain API path on the reference engine (one lane, torch ops, no graphs).
    tts = misotts.load(model, device=device, dtype=dtype, random_init=True, seed=seed, backend="reference")
    tts.codec  # load Mimi now, not inside a measurement
    wls = workloads(seed, tts.config.num_codebooks)
    shapes = {name: prompt_shape(tts, wl) for name, wl in wls.items()}
    n = tts.config.num_codebooks
    shapes["follow-up"] = prompt_shape(tts, follow_up(wls["context"], torch.zeros(plan.frames, n, dtype=torch.long)))
    shapes = {k: v for k, v in shapes.items() if k in plan.workloads}
    max_positions = max(max(s["positions"] for s in shapes.values()) + plan.frames,
                        shapes["short"]["positions"] + stream_frames(plan, max(plan.streams, default=1)))
    log(f"{model}: measuring copy bandwidth and matmul rate")
    bandwidth = floors.copy_bandwidth(device)
    flops = floors.matmul_flops(device, dtype)
    part = {
        "kind": "misotts-bench-part", "model": model, "device": device_name(device), "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "seed": seed,
        "code": code_version(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "parameters": sum(p.numel() for p in tts.model.parameters()), "plan": vars(plan),
        "bandwidth_gbps": bandwidth / 1e9, "matmul_tflops": flops / 1e12, "prompts": shapes,
        "floors": floor_ms(tts, shapes, plan, bandwidth, flops), "systems": {}, "errors": {},
    }
    path = out / f"part-{model}-{'+'.join(systems)}.json"
    for name in systems:
        system = None
        try:
            log(f"{model} / {name}: building")
            start = time.perf_counter()
            system = make_system(name, tts, plan, max_positions, compile)
            build_s = time.perf_counter() - start
            say = lambda msg: log(f"{model} / {name}: {msg}")  # noqa: E731
            part["systems"][name] = {"build_s": build_s}
            measure(system, wls, plan, seed, device, say, part["systems"][name],
                    lambda: path.write_text(json.dumps(part, indent=1)))
        except Exception as err:  # noqa: BLE001 -- one system failing must not lose the others
            traceback.print_exc()
            part["errors"][name] = f"{type(err).__name__}: {err}"
            log(f"{model} / {name}: FAILED ({part['errors'][name]})")
        finally:
            if system is not None and hasattr(system, "close"):
                system.close()
            del system
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        path.write_text(json.dumps(part, indent=1))
    return part


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=None, help="comma-separated presets (default: csm-1b,miso-8b on CUDA, "
                                                  "tiny,csm-1b on the CPU)")
    p.add_argument("--systems", default=None, help=f"comma-separated, from {','.join(ALL_SYSTEMS)} (default: all "
                                                   "available; transformers-static on CUDA only)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--frames", type=int, default=None, help="frames per stream")
    p.add_argument("--repeats", type=int, default=None, help="audio streams per workload, runs per throughput level")
    p.add_argument("--streams", default=None, help="concurrency levels, e.g. 1,4,16,64")
    p.add_argument("--batch-frames", type=int, default=None, help="frames per stream in a peer's static-batch "
                                                                 "throughput run")
    p.add_argument("--window-frames", type=int, default=None, help="frames per stream in the engine's steady "
                                                                  "throughput window (after the ramp)")
    p.add_argument("--rt-search-s", type=float, default=None, help="seconds for the engine's search for the most "
                                                                  "real-time streams (0: no search)")
    p.add_argument("--rt-tries", type=int, default=None, help="loads that search may try beyond the throughput levels")
    p.add_argument("--ttfa-arrivals", type=int, default=None, help="new streams timed to first audio at the "
                                                                  "real-time load")
    p.add_argument("--workloads", default=None, help="from short,context,follow-up (short is always run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default: bench/results/<date>-<device>)")
    p.add_argument("--no-compile", action="store_true", help="on the CPU, the engine without its Inductor-compiled "
                                                            "depth step (starts at once, slower frames)")
    p.add_argument("--no-report", action="store_true", help="write the parts only (merge later with "
                                                           "python -m misotts.bench.report FOLDER)")


def run(args) -> int:
    from .report import write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = (args.models or ("csm-1b,miso-8b" if device.type == "cuda" else "tiny,csm-1b")).split(",")
    if args.systems:
        systems = args.systems.split(",")
    else:
        systems = [s for s in ALL_SYSTEMS if s != "transformers-static" or device.type == "cuda"]
    out = Path(args.out) if args.out else default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    log(f"results go to {out}")
    failed = []
    for model in models:
        plan = PLANS.get((device.type, model), PLANS[device.type])
        overrides = {"frames": args.frames, "repeats": args.repeats, "batch_frames": args.batch_frames,
                     "window_frames": args.window_frames, "rt_search_s": args.rt_search_s,
                     "rt_max_tries": args.rt_tries, "ttfa_arrivals": args.ttfa_arrivals,
                     "streams": args.streams and tuple(int(s) for s in args.streams.split(",")),
                     # short is always run: the warm-up and the throughput runs use it
                     "workloads": args.workloads and ("short", *args.workloads.split(","))}
        plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
        part = run_model(model, systems, plan, device, dtype, args.seed, out, False if args.no_compile else None)
        failed += [f"{model} / {name}" for name in part["errors"]]
    if not args.no_report:
        print(write_report(out))
    if failed:
        log(f"FAILED: {', '.join(failed)} (see the errors above and in the results)")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m misotts.bench", description=__doc__.split("\n\n")[0])
    add_args(p)
    return run(p.parse_args(argv))
