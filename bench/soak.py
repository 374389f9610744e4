"""A soak of the engine with faults mixed in: many requests from many threads, some malformed,
some cancelled halfway, and a step that fails every so often.  Every request that completes
must equal the reference loop's codes; every request cut short must have made a prefix of them.

    python -m misotts.bench.soak --requests 1200          # full size (docs/engine.md has the figures)

`tests/engine/test_soak.py` runs a smaller one in the normal test run.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from misotts.engine import Engine, EngineConfig
from misotts.runtime.audio import FRAME_MS
from misotts.runtime.config import PRESETS
from misotts.runtime.generate import generate_codes
from misotts.runtime.params import GenerationParams
from misotts.runtime.prompt import Segment, build_prompt
from misotts.runtime.tokenizer import ByteTokenizer
from misotts.weights import random_model

INJECTED = "injected step fault"
# Requests the door must refuse (seed, sampling, frame count), each with its ValueError.
BAD_REQUESTS = [dict(seed=2**63), dict(temperature=float("nan")), dict(temperature=1e-41), dict(topk=0),
                dict(max_audio_ms=float("nan")), dict(seed=-1)]


@dataclass
class SoakResult:
    requests: int = 0
    completed: int = 0
    mismatches: int = 0  # completed, or cut short, with codes other than the reference's
    refused: int = 0  # malformed: refused by submit
    cancelled: int = 0
    failed_by_fault: int = 0  # in flight when an injected step fault hit
    unexpected_errors: list = field(default_factory=list)
    hangs: int = 0  # workers still waiting at the deadline
    leaked_blocks: int = 0
    leaked_requests: int = 0  # Request objects still alive after the engine closed
    frames_run: int = 0
    seconds: float = 0.0
    rss_start_mb: float = 0.0  # resident memory after the warm-up tenth of the requests
    rss_end_mb: float = 0.0
    rss_end_trimmed_mb: float = 0.0  # after glibc's malloc_trim: what the allocator held on to is given back

    def ok(self) -> bool:
        return not (self.mismatches or self.unexpected_errors or self.hangs or self.leaked_blocks
                    or self.leaked_requests)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def request_kinds(model, count: int = 12) -> list[dict]:
    """Distinct requests (prompts with shared and fresh histories, seeds, lengths, greedy and
    sampled) and the reference loop's codes for each."""
    cfg = model.config
    tokenizer = ByteTokenizer(cfg.bos_id, cfg.eos_id)
    gen = torch.Generator().manual_seed(0)
    shared = [Segment(t % 2, f"shared turn {t}", codes=torch.randint(0, 2048, (5, 32), generator=gen))
              for t in range(2)]
    kinds = []
    for i in range(count):
        history = shared if i % 3 else [Segment(1, f"fresh turn {i}", codes=torch.randint(0, 2048, (3, 32),
                                                                                          generator=gen))]
        frames, mask = build_prompt(f"Request kind {i}.", i % 2, history, tokenizer, cfg.num_codebooks)
        kind = dict(frames=frames, mask=mask, max_frames=2 + i % 4, seed=i, topk=50,
                    temperature=0.0 if i % 4 == 3 else 0.9, stop_on_eos=False)
        kind["expected"] = generate_codes(model, **{k: v for k, v in kind.items()})
        kinds.append(kind)
    return kinds


def _inject_faults(engine: Engine, every: int) -> None:
    """Every `every`-th frame raises, as a failing device step would."""
    run, frames = engine.graphs.run, itertools.count(1)

    def flaky(n, *args, **kwargs):
        if next(frames) % every == 0:
            raise RuntimeError(INJECTED)
        return run(n, *args, **kwargs)

    engine.graphs.run = flaky


def _submit(engine: Engine, frames, mask, max_frames: int, **settings):
    """A request of `max_frames` frames (unless a bad request's max_audio_ms says otherwise)."""
    settings.setdefault("max_audio_ms", max_frames * FRAME_MS)
    return engine.submit(frames, mask, GenerationParams(**settings))


def _serve_one(engine: Engine, kinds: list[dict], i: int, result: SoakResult, lock: threading.Lock) -> None:
    kind = kinds[i % len(kinds)]
    request = {k: v for k, v in kind.items() if k != "expected"}
    if i % 11 == 5:  # malformed
        try:
            _submit(engine, **(request | BAD_REQUESTS[i % len(BAD_REQUESTS)]))
        except ValueError:
            with lock:
                result.refused += 1
            return
        with lock:
            result.unexpected_errors.append(f"request {i}: a malformed request was accepted")
        return
    made, outcome = [], "completed"
    stream = _submit(engine, **request)
    try:
        for frame in stream:
            made.append(frame.codes)
            if i % 7 == 3 and len(made) == 1:  # cancelled after its first frame
                stream.cancel()
                outcome = "cancelled"
                break
    except RuntimeError as err:
        outcome = "failed_by_fault" if INJECTED in str(err) else f"error: {err!r}"
    expected = kind["expected"]
    exact = outcome != "completed" or len(made) == len(expected)
    prefix = all(torch.equal(got, want) for got, want in zip(made, expected)) and len(made) <= len(expected)
    with lock:
        if outcome.startswith("error"):
            result.unexpected_errors.append(f"request {i}: {outcome}")
        else:
            setattr(result, outcome, getattr(result, outcome) + 1)
        result.mismatches += not (exact and prefix)


def run_soak(model, requests: int = 1200, threads: int = 8, fault_every: int = 97, max_batch: int = 8,
             deadline_s: float = 600.0, kinds: list[dict] | None = None) -> SoakResult:
    """`requests` requests from `threads` threads; returns the figures (see SoakResult)."""
    kinds = kinds or request_kinds(model)
    engine = Engine(model, EngineConfig(max_batch=max_batch, wait_timeout_s=deadline_s,
                                        max_waiting=threads + 1))
    _inject_faults(engine, fault_every)
    made = _track_requests(engine)
    result, lock, next_index = SoakResult(requests=requests), threading.Lock(), itertools.count()
    warmup = max(1, requests // 10)
    warm = threading.Event()

    def worker():
        while (i := next(next_index)) < requests:
            if i == warmup:
                gc.collect()
                result.rss_start_mb = rss_mb()
                warm.set()
            _serve_one(engine, kinds, i, result, lock)

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(max(0.0, deadline_s - (time.perf_counter() - started)))
    result.hangs = sum(w.is_alive() for w in workers)
    result.seconds = time.perf_counter() - started
    engine.wait_idle(timeout=10)
    gc.collect()
    result.rss_end_mb = rss_mb()
    result.leaked_blocks = engine.pool.num_blocks - engine.pool.available()
    result.frames_run = engine.frames_run
    engine.close()
    del engine
    gc.collect()
    result.leaked_requests = len(made)  # this soak's own: other code in the process may hold its own
    result.rss_end_trimmed_mb = _trimmed_rss_mb()
    return result


def _track_requests(engine: Engine) -> weakref.WeakSet:
    """Every Request the engine accepts from here on, held weakly: what is left after close and a
    collection was leaked."""
    made, submit = weakref.WeakSet(), engine.submit

    def tracked(*args, **kwargs):
        stream = submit(*args, **kwargs)
        made.add(stream.request)
        return stream

    engine.submit = tracked
    return made


def _trimmed_rss_mb() -> float:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    return rss_mb()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--fault-every", type=int, default=97, help="every N-th frame fails")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = random_model(PRESETS["tiny"], seed=0, device="cpu", dtype=torch.float32).eval()
    result = run_soak(model, args.requests, args.threads, args.fault_every)
    for name, value in vars(result).items():
        print(f"{name}: {value}")
    return 0 if result.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
