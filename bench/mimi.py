"""The lanes' streaming Mimi decode (`engine.audio.LaneDecoder`) per Mimi bucket: the kernel bench's
Mimi rows (`python -m misotts.bench.kernels`, table `mimi.{md,jsonl,json}` beside `kernels.*`).

On CUDA each bucket of `mimi_buckets(max_batch)` is captured as the engine captures it, and a
decode of that many lanes (its input copy and the graph replay) is timed with CUDA events, median
of `repeats`.  On the CPU (the kernel bench's --dry-run) the decode runs eagerly, timed with
perf_counter, at the few buckets up to the dry run's batch: plumbing, and the CPU's own cost.
The codec is the untrained Mimi (`load_codec(None)`): the trained one's shapes and dtype, so the
same work; its weights only change the audio.  Rows: ms per call and per lane, and the call's
byte floor (Mimi's decoder weights read once, at the run's copy bandwidth).
"""
from __future__ import annotations

import time

import torch

from misotts.bench.floors import mimi_decode_bytes
from misotts.bench.stats import median

COLUMNS = ["bucket", "mode", "ms", "ms_per_lane", "bytes", "floor_ms", "note"]


def _time_ms(decode, device, repeats: int) -> float:
    """Median ms of decode(): CUDA events around each call on CUDA, perf_counter on the CPU."""
    decode()  # one more frame of state after the capture's warm-up: nothing first-call left
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            decode()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            decode()
            times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def run(writer_cls, out, device, max_batch: int, copy_gbps: float | None, header: dict,
        repeats: int | None = None) -> list[dict]:
    """Time every Mimi bucket up to max_batch on `device`; rows to <out>/mimi.* via writer_cls
    (the kernel bench's RowWriter).  CUDA: graph replays; CPU: eager decodes."""
    from misotts.engine.audio import LaneDecoder, mimi_buckets
    from misotts.runtime.codec import load_codec

    graphs = device.type == "cuda"
    repeats = repeats or (30 if graphs else 2)
    codec = load_codec(None, device=device)
    decoder = LaneDecoder(codec, max_batch)
    if graphs:
        decoder.capture()  # mimi_buckets(max_batch), one memory pool, as the engine does
    nbytes = mimi_decode_bytes(codec)
    codes = torch.randint(0, codec.cardinality, (max_batch, codec.num_codebooks),
                          generator=torch.Generator().manual_seed(0)).to(device)
    mode = "graph replay" if graphs else f"eager ({device.type}, {torch.get_num_threads()} threads)"
    # the kernel table's header, less what is only the kernels' (their dtype, context, dry-run wording)
    header = {k: v for k, v in header.items() if k not in ("device", "dtype", "context")}
    header = dict(device=torch.cuda.get_device_name(device) if graphs else f"{device.type} (eager Mimi, perf_counter)",
                  dtype=str(next(codec.mimi.parameters()).dtype).removeprefix("torch."), **header,
                  max_batch=max_batch, buckets=str(mimi_buckets(max_batch)), repeats=repeats,
                  codec="untrained Mimi (the trained one's shapes)")
    writer = writer_cls(out, "mimi", header, COLUMNS)
    try:
        for b in mimi_buckets(max_batch):
            assert decoder.bucket(b) == b, (b, decoder.bucket(b))
            ms = _time_ms(lambda: decoder.decode(codes[:b]), device, repeats)
            floor = nbytes / copy_gbps / 1e6 if copy_gbps else None
            writer.add(dict(bucket=b, mode=mode, ms=ms, ms_per_lane=ms / b, bytes=nbytes, floor_ms=floor,
                            note="" if graphs else "CPU: not a GPU figure"))
    finally:
        decoder.close()
    print(f"\nwrote {writer.md} ({len(writer.rows)} rows)")
    return writer.rows
