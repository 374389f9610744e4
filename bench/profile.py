"""Where a frame's time goes: every kernel of one frame by total time, with the bytes it moves and its GB/s.

    python -m misotts.bench.profile --model miso-8b --batch 1 [--batch 64 ...] [--context 1024]
                                    [--frames 10] [--gemv-rows 64] [--trace] [--out DIR]
    python -m misotts.bench.profile --device cpu --model tiny --batch 2     # plumbing, no GPU

On CUDA: a `ModelRunner` with random bf16 weights and the Triton op set, its frame captured as a
CUDA graph (as the engine runs it) and replayed `--frames` times under torch.profiler; kernels are
grouped by name, per frame: calls, total us, % of the frame, bytes, GB/s and % of a 1 GiB copy
measured in the same run.  The frame's median replay time (CUDA events) and its byte floor
(bench/floors.py over the copy bandwidth) head the table.

Bytes come from one eager frame run beforehand: every Triton launch (through the `_utils.launch`
seam) and every aten compute op (a TorchDispatchMode) adds the bytes of the tensors it is given and
returns -- weights whole, activations, the KV pool (sized to the lanes' contexts) and the depth
caches -- but not the embedding and projection tables, of which a frame gathers a few rows.  Triton
kernels match the profile by name; cuBLAS's kernels (names with gemm/gemv) are one row with the
bytes of the aten matmuls; other torch kernels have no bytes.
On the CPU (--device cpu): an eager TorchOps frame in fp32 under the CPU profiler, by aten op
(self time), so a broken step of the tool is found without a GPU.  Each profiled (model, batch)
writes profile-<model>-b<batch>.{md,jsonl,json} into --out as soon as it is done.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from misotts.bench.kernels import RESULTS, RowWriter
from misotts.bench.launches import NOT_KERNELS
from misotts.bench.provenance import code_version
from misotts.runtime.config import PRESETS

GEMM_WORDS = ("gemm", "gemv", "cutlass", "xmma", "cublas")  # cuBLAS kernels' names contain one
GEMM_OPS = ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm")  # the aten ops behind them
COLUMNS = ["kernel", "calls", "us", "pct_of_frame", "mean_us", "bytes", "gbps", "pct_of_copy"]


class Traffic(TorchDispatchMode):
    """Bytes and calls of one eager frame, per aten op ("aten::mm") and per Triton kernel name."""

    def __init__(self, skip: set[int]):
        super().__init__()
        self.skip, self.bytes, self.calls = skip, Counter(), Counter()

    def _nbytes(self, *trees) -> int:
        total = 0
        for t in tree_leaves(trees):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.skip:
                total += t.numel() * t.element_size()
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket not in NOT_KERNELS:
            name = f"aten::{func.overloadpacket.__name__}"
            self.bytes[name] += self._nbytes(args, kwargs, out)
            self.calls[name] += 1
        return out

    def launched(self, kernel, args) -> None:
        self.bytes[kernel.__name__] += self._nbytes(args)
        self.calls[kernel.__name__] += 1


@contextmanager
def traffic_of(runner):
    """Counts what runs inside (Triton launches still run, through the launch seam)."""
    from misotts.kernels import _utils

    tables = (runner.proj_table, runner.text_table, runner.audio_table)
    traffic = Traffic({t.untyped_storage().data_ptr() for t in tables})

    class Launcher(list):
        def append(self, item):
            kernel, grid, args, meta = item
            traffic.launched(kernel, args)
            kernel[grid](*args, **meta)

    saved, _utils._recorder = _utils._recorder, Launcher()
    try:
        with traffic:
            yield traffic
    finally:
        _utils._recorder = saved


def make_runner(preset: str, batch: int, context: int, device, dtype, ops: str, spare_frames: int = 64,
                gemv_rows: int = 0, weights: str | None = None):
    """A ModelRunner with random weights (std 0.02) and `batch` lanes at position `context`, each
    with KV blocks for `spare_frames` more positions (gemv_rows: TritonOps' Triton GEMV limit;
    weights: "int8" / "fp8" / "int4" quantises the linears, weight-only, with the quantised op set)."""
    from misotts.engine.model_runner import ModelRunner
    from misotts.engine.ops import TritonOps, make_ops
    from misotts.runtime.model import CSMModel

    torch.manual_seed(0)
    with torch.device(device):
        model = CSMModel(PRESETS[preset]).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    per_lane = min(-(-(context + spare_frames) // 16), -(-PRESETS[preset].max_seq_len // 16))
    if weights is not None:
        from misotts.weights.quantize import quantize_model

        quantize_model(model, weights)
        op_set = make_ops(ops, torch.device(device), quantized=True)
    else:
        op_set = TritonOps(gemv_rows) if ops == "triton" else make_ops(ops, torch.device(device))
    runner = ModelRunner(model, op_set, max_batch=batch, block_size=16,
                         num_blocks=batch * per_lane + 1)
    for lane in range(batch):
        runner.state.set_lane(lane, 0, True, context, list(range(lane * per_lane, (lane + 1) * per_lane)), lane,
                              0.9, 50)
    return runner


def _device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _cuda_kernels(prof) -> dict[str, list]:
    """{kernel name: [calls, total us]} of the profiled device kernels."""
    kernels = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and _device_us(e) > 0:
            kernels[e.key] = [e.count, _device_us(e)]
    return kernels


def _cpu_ops(prof, names) -> dict[str, list]:
    """{aten op: [calls, self us]} of the profiled ops that the traffic counter knows."""
    return {e.key: [e.count, float(e.self_cpu_time_total)] for e in prof.key_averages() if e.key in names}


def profile_cuda(runner, batch: int, frames: int, trace: Path | None):
    from .launches import captured_frame, replay_ms

    graphs = captured_frame(runner, batch)
    times = [ms * 1e3 for ms in replay_ms(graphs, batch, frames)]
    activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(frames):
            graphs.run(batch)
        torch.cuda.synchronize()
    kernels, how = _cuda_kernels(prof), "CUDA graph replay"
    if not kernels:  # this CUPTI does not trace kernels inside graphs: profile eager frames instead
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(frames):
                runner.decode_frame(batch)
            torch.cuda.synchronize()
        kernels, how = _cuda_kernels(prof), "eager frames (graph kernels not traced here)"
    if trace:
        prof.export_chrome_trace(str(trace))
    return kernels, statistics.median(times), how


def profile_cpu(runner, batch: int, frames: int, names, trace: Path | None):
    import time

    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(frames):
            start = time.perf_counter()
            runner.decode_frame(batch)
            times.append((time.perf_counter() - start) * 1e6)
    if trace:
        prof.export_chrome_trace(str(trace))
    return _cpu_ops(prof, names), statistics.median(times), "eager frames, CPU profiler (self time per aten op)"


def table_rows(kernels: dict, traffic: Traffic, frames: int, copy_gbps: float, cuda: bool) -> list[dict]:
    """Per-frame rows by total time, descending; bytes where the name is known (see the module doc)."""
    gemm_bytes = sum(b for name, b in traffic.bytes.items() if name in GEMM_OPS)
    rows, frame_us = [], sum(us for _, us in kernels.values()) / frames
    for name, (calls, us) in kernels.items():
        if name in traffic.bytes:
            nbytes = traffic.bytes[name]
        elif cuda and any(w in name.lower() for w in GEMM_WORDS):
            name, nbytes = "cuBLAS GEMM (aten linear/mm/addmm)", gemm_bytes
        else:
            nbytes = None
        rows.append(dict(kernel=name, calls=calls / frames, us=us / frames, bytes=nbytes))
    merged = {}
    for r in rows:  # the cuBLAS kernels: one row
        m = merged.setdefault(r["kernel"], dict(r, calls=0.0, us=0.0))
        m["calls"] += r["calls"]
        m["us"] += r["us"]
    rows = sorted(merged.values(), key=lambda r: -r["us"])
    for r in rows:
        r["pct_of_frame"] = 100 * r["us"] / frame_us if frame_us else None
        r["mean_us"] = r["us"] / r["calls"] if r["calls"] else None
        r["gbps"] = r["bytes"] / (r["us"] * 1e3) if r["bytes"] and r["us"] else None
        r["pct_of_copy"] = 100 * r["gbps"] / copy_gbps if r["gbps"] and copy_gbps else None
    return rows


def profile(preset: str, batch: int, context: int, frames: int, device: str, out: Path, trace: bool,
            copy_gbps: float, gemv_rows: int = 0, weights: str | None = None) -> list[dict]:
    from .floors import frame_bytes

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    runner = make_runner(preset, batch, context, device, dtype, "triton" if cuda else "torch",
                         spare_frames=4 * frames + 8, gemv_rows=gemv_rows if cuda else 0, weights=weights)
    with traffic_of(runner) as traffic:  # one eager frame: the bytes of each op
        runner.decode_frame(batch)
    if cuda:
        torch.cuda.synchronize()
    name = f"profile-{preset}-b{batch}" + (f"-gemv{gemv_rows}" if gemv_rows and cuda else "") + \
        (f"-{weights}" if weights else "")
    trace_path = out / f"{name}-trace.json" if trace else None
    out.mkdir(parents=True, exist_ok=True)
    if cuda:
        kernels, frame_us, how = profile_cuda(runner, batch, frames, trace_path)
    else:
        kernels, frame_us, how = profile_cpu(runner, batch, frames, set(traffic.bytes), trace_path)
    floor = frame_bytes(PRESETS[preset], context, torch.finfo(dtype).bits // 8, streams=batch)
    # floor_bytes stays the unquantised frame's: a quantised frame's time is judged against it
    header = dict(model=preset, batch=batch, context=context, gemv_rows=gemv_rows if cuda else None,
                  weights=weights, dtype=str(dtype).removeprefix("torch."),
                  device=torch.cuda.get_device_name() if cuda else "cpu", profiled=how, frames=frames,
                  frame_us=frame_us, floor_bytes=floor, copy_gbps=copy_gbps,
                  floor_us=floor / (copy_gbps * 1e3) if copy_gbps else None,
                  started=datetime.datetime.now().isoformat(timespec="seconds"), code=code_version())
    quantised = f" ({weights} weights)" if weights else ""
    print(f"\n{preset}, batch {batch}, {header['dtype']}{quantised} on {header['device']}: frame {frame_us:.0f} us "
          f"(median, {how}); floor {floor / 1e9:.3f} GB = {header['floor_us'] or 0:.0f} us at {copy_gbps:.0f} GB/s")
    writer = RowWriter(out, name, header, COLUMNS)
    rows = table_rows(kernels, traffic, frames, copy_gbps, cuda)
    for row in rows:
        writer.add(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(PRESETS), action="append", help="repeatable (default miso-8b)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--context", type=int, default=1024, help="backbone positions each lane attends")
    parser.add_argument("--frames", type=int, default=10, help="frames profiled (and timed)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace per profile")
    parser.add_argument("--gemv-rows", type=int, default=0,
                        help="TritonOps(gemv_rows): wo/down as the Triton GEMV up to this many rows (0: cuBLAS)")
    parser.add_argument("--weights", choices=("int8", "fp8", "int4"), action="append",
                        help="also profile the frame with these weight-only quantised linears, after the "
                             "unquantised one, in the same run (repeatable)")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/profile-<time>)")
    opts = parser.parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("misotts.bench.profile needs a CUDA GPU (or --device cpu to check the tool)", file=sys.stderr)
        return 2
    out = opts.out or RESULTS / f"profile-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if opts.device == "cuda":
        from .kernels import copy_gbps
        copy = copy_gbps(torch.device("cuda"))
    else:
        from .floors import copy_bandwidth
        copy = copy_bandwidth("cpu") / 1e9
    for preset in opts.model or ["miso-8b"]:
        for batch in opts.batch:
            for weights in (None, *(opts.weights or ())):  # unquantised first: the yardstick of the same run
                profile(preset, batch, opts.context, opts.frames, opts.device, out, opts.trace, copy, opts.gemv_rows,
                        weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
