"""Host cost per frame, without a GPU: the engine's real loop over a runner that does no device work.

    python -m misotts.bench.host --model csm-1b --batch 1,8,64

The loop is the engine's own -- admission, the scheduler's plans, lane setups (the same host
tensors a GPU gets, copied nowhere), the frame's bookkeeping, postprocess, the hand-off to each
stream and a reader per stream taking its frames (asyncio tasks on one thread, as in the server) -- but `NullRunner` stands in for the
model: prefill and the frame launch nothing and every frame's codes are one fixed non-silent frame.
What a frame costs here is what the host adds to every frame on a GPU, where one CUDA graph replay
(~10 µs to launch) does the device work.  Pipelined, the host hides behind the frame as long as
it is shorter: a csm-1b frame at the bandwidth floor is ~1 ms at batch 64 on an H200, so that is
the target.

The model is built on the meta device (its config only: no weights are made).  Printed per batch:
µs per frame (the loop's wall time over frames made, once every stream has its first frame), the
part spent in postprocess (per-lane Python: frame ends, prefix keys, the outbox) and in the
hand-off, and how far the readers fell behind.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from misotts.engine import Engine, EngineConfig
from misotts.engine.model_runner import BatchState
from misotts.runtime.config import PRESETS
from misotts.runtime.model import CSMModel
from misotts.runtime.params import GenerationParams
from misotts.runtime.audio import FRAME_MS


class NullRunner:
    """`ModelRunner`'s interface without device work: the engine's loop runs, nothing is computed."""

    def __init__(self, config, max_batch: int, block_size: int):
        self.config, self.max_batch, self.block_size = config, max_batch, block_size
        self.n = config.num_codebooks
        self.max_blocks = -(-config.max_seq_len // block_size)
        self.ops = SimpleNamespace(name="null", fused_rows=0)

    def allocate_kv(self, num_blocks: int) -> None:
        self.kv = SimpleNamespace(scratch_block=num_blocks)
        self.state = BatchState(self.max_batch, self.n, self.max_blocks, num_blocks, "cpu")
        self.state.codes.fill_(1)  # never an all-zero (end of speech) frame

    def prefill_many(self, chunks) -> torch.Tensor:
        return torch.zeros(len(chunks), 1)

    def decode_frame(self, n: int, backbone: bool = True) -> None:
        pass

    def release(self) -> None:
        self.kv = self.state = None


class _Timed:
    """Wraps a bound method, noting when each call ran (perf_counter start, end)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.calls.append((start, time.perf_counter()))

    def within(self, t0: float, t1: float) -> float:
        """Seconds spent in it inside [t0, t1] (a call that straddles an end counts its part inside)."""
        return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in list(self.calls))


def _prompt(config, rows: int, seed: int):
    """rows of text ids (each request's own, so no prefix is shared)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.zeros(rows, config.num_codebooks + 1, dtype=torch.long)
    mask = torch.zeros_like(frames, dtype=torch.bool)
    frames[:, -1] = torch.randint(0, config.text_vocab_size, (rows,), generator=g)
    mask[:, -1] = True
    return frames, mask


def measure(model_name: str, batch: int, frames: int, prompt_rows: int = 64, timeout_s: float = 120.0) -> dict:
    """Host µs per frame of the engine's loop at `batch` streams over `frames` frames (after the ramp)."""
    config = PRESETS[model_name]
    with torch.device("meta"):
        model = CSMModel(config)
    runner = NullRunner(config, batch, 16)
    # pipelined as on a GPU: the loop's order (frame t+1 enqueued before frame t is read) is the one timed
    engine = Engine(model, EngineConfig(max_batch=batch, pipelined=True, max_waiting=batch), runner=runner)
    postprocess = engine.scheduler.postprocess = _Timed(engine.scheduler.postprocess)
    hand_out = engine._hand_out = _Timed(engine._hand_out)
    # As long as the context allows: the window is timed while every stream runs, then they are cancelled.
    longest = config.max_seq_len - prompt_rows
    if longest < 2 * frames:
        raise ValueError(f"{model_name}: {prompt_rows} prompt rows leave {longest} frames of context, fewer than "
                         f"twice --frames {frames}")
    params = GenerationParams(max_audio_ms=longest * FRAME_MS, stop_on_eos=False)
    streams = [engine.submit(*_prompt(config, prompt_rows, i), params) for i in range(batch)]
    taken, errors, stop = [0] * batch, [], threading.Event()

    async def read(i: int) -> None:
        try:
            async for _ in streams[i]:
                taken[i] += 1
                if stop.is_set():
                    break
        except Exception as err:  # noqa: BLE001 -- reported by the waits below
            errors.append(err)

    async def read_all() -> None:
        await asyncio.gather(*(read(i) for i in range(batch)))

    # The readers are asyncio tasks on one thread, as a server's are (a thread per stream would
    # time the GIL's hand-offs between 64 threads, not the loop).
    readers = [threading.Thread(target=asyncio.run, args=(read_all(),), daemon=True)]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout_s
    while min(taken) == 0:  # the ramp: every stream joined and has its first frame
        if errors:
            raise RuntimeError(f"batch {batch}: a stream failed") from errors[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch}: not every stream started within {timeout_s} s")
        time.sleep(0.001)
    run0, t0 = engine.frames_run, time.perf_counter()
    while engine.frames_run - run0 < frames:
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch}: {engine.frames_run - run0} of {frames} frames in {timeout_s} s")
        time.sleep(0.0005)
    made, wall = engine.frames_run - run0, time.perf_counter() - t0
    if any(s.stats.finish for s in streams):
        raise RuntimeError(f"batch {batch}: a stream ended inside the window (lower --frames)")
    post, hand = postprocess.within(t0, t0 + wall), hand_out.within(t0, t0 + wall)
    backlog = made * batch - (sum(taken) - batch)  # frames handed out in the window not yet taken
    stop.set()
    for s in streams:
        s.cancel()
    engine.wait_idle(30)
    engine.close()
    for r in readers:
        r.join(5)
    return {"model": model_name, "batch": batch, "frames": made, "host_us_per_frame": wall / made * 1e6,
            "postprocess_us_per_frame": post / made * 1e6, "hand_out_us_per_frame": hand / made * 1e6,
            "reader_backlog_frames": max(0, backlog)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m misotts.bench.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="csm-1b", choices=sorted(PRESETS))
    p.add_argument("--batch", default="1,8,64", help="comma-separated stream counts (default 1,8,64)")
    p.add_argument("--frames", type=int, default=300, help="frames timed per batch after the ramp (default 300)")
    p.add_argument("--prompt-rows", type=int, default=64, help="prompt positions per request (default 64)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        p.error(f"--batch: comma-separated integers, got {args.batch!r}")
    if any(b < 1 for b in batches) or args.frames < 1 or args.prompt_rows < 1:
        p.error("--batch, --frames and --prompt-rows must be >= 1")
    torch.set_num_threads(1)
    rows = []
    print(f"{'model':>8} {'batch':>5} {'host µs/frame':>14} {'postprocess':>12} {'hand-out':>9} {'backlog':>8}")
    for b in batches:
        row = measure(args.model, b, args.frames, args.prompt_rows)
        rows.append(row)
        print(f"{row['model']:>8} {b:>5} {row['host_us_per_frame']:>14.0f} {row['postprocess_us_per_frame']:>12.0f} "
              f"{row['hand_out_us_per_frame']:>9.0f} {row['reader_backlog_frames']:>8}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
