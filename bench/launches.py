"""Device ops in one engine frame, counted without a GPU, and the frame time they imply.

    python -m misotts.bench.launches --model miso-8b --batch 1 [--ops triton|torch] [--measure]

Builds a `ModelRunner` with the CUDA op set (TritonOps) on the meta device (tensors without
data, bf16), records one `decode_frame(batch)` and counts the device ops it would run:

- Triton launches: `kernels._utils.launch` records them instead of launching (its seam);
- aten compute ops: every aten call that reaches a TorchDispatchMode, except views and
  metadata (`OpOverload.is_view`, and the allocation ops below): each is one or more kernels on
  CUDA (one is counted; cuBLAS split-K or SDPA's math path may launch more, so this is a floor).

Broken down by part: backbone (embedding and layers), codebook 0 (the backbone's heads and the
frame's bookkeeping), depth steps (the decoder's layers and heads) and sampling (lane settings,
noise, draws and the next input's gather).  The modelled frame time is

    weight bytes / bandwidth  +  ops * per-launch latency

with the bytes from bench/floors.py (`frame_bytes`: every weight a frame reads, the depth
decoder's 31 times) and both assumptions printed (flags).  `--measure` (CUDA only) also times
the real frame, replayed from a CUDA graph with random bf16 weights, so the model can be checked.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
NOT_KERNELS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
               aten._unsafe_view, aten.lift_fresh, aten.set_}
PARTS = ("backbone", "codebook 0", "depth steps", "sampling")
H100_GBPS, LAUNCH_US = 3350.0, 3.0  # H100 SXM HBM3 peak; a small kernel replayed from a CUDA graph


class OpCounter(TorchDispatchMode):
    """Counts aten compute ops and Triton launches under the current `part` (a label)."""

    def __init__(self):
        super().__init__()
        self.part, self.aten, self.triton = "other", Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in NOT_KERNELS:
            self.aten[self.part] += 1
        return func(*args, **(kwargs or {}))

    def launched(self, kernel, grid, args, meta):
        self.triton[self.part] += 1

    @contextmanager
    def labelled(self, part):
        outer, self.part = self.part, part
        try:
            yield
        finally:
            self.part = outer

    def total(self, part=None):
        return sum(self.aten.values()) + sum(self.triton.values()) if part is None else (
            self.aten[part] + self.triton[part])


@contextmanager
def counting():
    """An OpCounter that sees every aten op and every Triton launch (recorded, not run)."""
    from misotts.kernels import _utils

    counter = OpCounter()

    class Recorder(list):  # `launch` appends (kernel, grid, args, meta) instead of launching
        def append(self, item):
            counter.launched(*item)

    saved, _utils._recorder = _utils._recorder, Recorder()
    try:
        with counter:
            yield counter
    finally:
        _utils._recorder = saved


def meta_runner(preset: str, batch: int, ops: str = "triton", dtype=torch.bfloat16):
    """A ModelRunner of `preset`'s shapes on the meta device with `batch` lanes."""
    from misotts.engine.model_runner import ModelRunner
    from misotts.engine.ops import make_ops
    from misotts.runtime.config import PRESETS
    from misotts.runtime.model import CSMModel

    with torch.device("meta"):
        model = CSMModel(PRESETS[preset]).to(dtype)
    return ModelRunner(model, make_ops(ops, torch.device("meta")), max_batch=batch, block_size=16, num_blocks=64)


@contextmanager
def label_parts(runner, counter):
    """Wraps the runner's parts so that the counter labels what runs inside (instance attributes,
    and the reference sampler's functions while the frame runs; parts a runner lacks are skipped)."""
    from misotts.kernels import reference as ref

    saved = []

    def wrap(obj, name, part):
        fn = getattr(obj, name, None)
        if fn is None:
            return
        saved.append((obj, name, vars(obj).get(name)))  # None: a class attribute, shadowed below

        def labelled(*args, **kwargs):
            with counter.labelled(part):
                return fn(*args, **kwargs)
        setattr(obj, name, labelled)

    for obj, name, part in ((runner, "_backbone", "backbone"), (runner.ops, "embed", "backbone"),
                            (runner, "_depth_step", "depth steps"), (runner, "_depth_sample", "depth steps"),
                            (runner.ops, "frame_sampling", "sampling"), (runner.ops, "sample", "sampling"),
                            (ref, "lane_sampling", "sampling"), (ref, "race_noise", "sampling"),
                            (ref, "topk_race", "sampling")):
        wrap(obj, name, part)
    try:
        yield
    finally:
        for obj, name, own in reversed(saved):
            if own is None:
                delattr(obj, name)
            else:
                setattr(obj, name, own)


def count_frame(preset: str, batch: int, ops: str = "triton") -> OpCounter:
    """Device ops of one decode_frame(batch) (after a warm-up frame, as the engine captures)."""
    runner = meta_runner(preset, batch, ops)
    with counting():  # warm-up: kept tensors (aranges, workspaces) are made here
        runner.decode_frame(batch)
    with counting() as counter, label_parts(runner, counter), counter.labelled("codebook 0"):
        runner.decode_frame(batch)
    return counter


def modelled_ms(preset: str, batch: int, ops: int, gbps: float, launch_us: float, kv_len: int = 1024):
    from .floors import frame_bytes
    from misotts.runtime.config import PRESETS

    nbytes = frame_bytes(PRESETS[preset], kv_len, 2, streams=batch)
    return nbytes, nbytes / (gbps * 1e9) * 1e3, ops * launch_us / 1e3


def measure_ms(preset: str, batch: int, repeats: int = 20) -> float:
    """A real frame on CUDA (random bf16 weights, TritonOps, one CUDA graph): median ms per replay."""
    from misotts.engine.model_runner import ModelRunner
    from misotts.engine.ops import TritonOps
    from misotts.runtime.config import PRESETS
    from misotts.runtime.model import CSMModel

    with torch.device("cuda"):
        model = CSMModel(PRESETS[preset]).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    runner = ModelRunner(model, TritonOps(), max_batch=batch, block_size=16, num_blocks=batch * 80 + 1)
    for lane in range(batch):
        runner.state.set_lane(lane, 0, True, 1000, list(range(lane * 80, lane * 80 + 80)), lane, 0.9, 50)
    times = replay_ms(captured_frame(runner, batch), batch, repeats)
    return sorted(times)[len(times) // 2]


def captured_frame(runner, batch: int):
    """The runner's frame for `batch` lanes as one CUDA graph (FrameGraphs with that bucket alone)."""
    from misotts.engine.graphs import FrameGraphs

    graphs = FrameGraphs(runner.decode_frame, batch)
    graphs.buckets = [batch]
    graphs.capture(depth_only=False)  # the full frame alone: what is timed
    return graphs


def replay_ms(graphs, batch: int, repeats: int) -> list[float]:
    """Device ms of each of `repeats` replays, timed with CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs.run(batch)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main(argv=None):
    from misotts.kernels.report import COMPILED_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=COMPILED_PRESETS + ("tiny",), default="miso-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ops", choices=("triton", "torch"), default="triton",
                        help="op set recorded (triton: what the engine runs on CUDA)")
    parser.add_argument("--gbps", type=float, default=H100_GBPS, help="assumed HBM bandwidth, GB/s")
    parser.add_argument("--launch-us", type=float, default=LAUNCH_US, help="assumed cost of one device op, us")
    parser.add_argument("--measure", action="store_true", help="also time the real frame (CUDA only)")
    opts = parser.parse_args(argv)
    counter = count_frame(opts.model, opts.batch, opts.ops)
    print(f"{opts.model}, batch {opts.batch}, {opts.ops} op set: device ops in one frame (views excluded)\n")
    print("| part | aten compute ops | Triton launches | device ops |")
    print("|---|---|---|---|")
    for part in PARTS + tuple(p for p in counter.aten.keys() | counter.triton.keys() if p not in PARTS):
        print(f"| {part} | {counter.aten[part]} | {counter.triton[part]} | {counter.total(part)} |")
    total = counter.total()
    print(f"| **frame** | {sum(counter.aten.values())} | {sum(counter.triton.values())} | **{total}** |")
    nbytes, bw_ms, launch_ms = modelled_ms(opts.model, opts.batch, total, opts.gbps, opts.launch_us)
    print(f"\nmodelled frame: {nbytes / 1e9:.2f} GB / {opts.gbps:.0f} GB/s = {bw_ms:.2f} ms, + {total} ops x "
          f"{opts.launch_us:g} us = {launch_ms:.2f} ms: {bw_ms + launch_ms:.2f} ms "
          f"(assumed: bandwidth {opts.gbps:.0f} GB/s, {opts.launch_us:g} us per op, KV 1024 positions)")
    if opts.measure:
        if not torch.cuda.is_available():
            print("--measure needs a CUDA GPU", file=sys.stderr)
            return 2
        print(f"measured frame (CUDA graph replay, median): {measure_ms(opts.model, opts.batch):.2f} ms "
              f"on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
