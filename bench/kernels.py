"""Kernel benchmark on a CUDA GPU: the kernel specs' cases (kernels/specs.py), and Mimi per lane bucket.

Every spec case at the presets' shapes, then the lanes' Mimi decode per Mimi bucket.

    python -m misotts.bench.kernels [--preset csm-1b --preset miso-8b] [--batch 1 8 32 64]
                                    [--kernel NAME ...] [--context 1024] [--no-torch] [--no-mimi] [--out DIR]
    python -m misotts.bench.kernels --dry-run [--preset tiny] [--batch 2]   # plumbing, no timing

For each preset, batch and case: the Triton launcher's time (median of CUDA-event timings,
triton.testing.do_bench, which flushes L2 between runs), the torch reference's in the same dtype
(or the case's baseline: for linear_add, the cuBLAS addmm_ the engine runs by default),
the case's byte floor (every input read once, every output written once), the achieved GB/s and its
% of a 1 GiB device-to-device copy measured in the same run.  Cases that do not change with the
batch (prefill shapes) run once per preset.  Rows are appended as they are measured to
kernels.jsonl and kernels.md in --out (a run cut short keeps its rows); kernels.json (device,
versions, commit, copy bandwidth, rows) is rewritten after every row.
--dry-run runs every case once through Triton's CPU interpreter in fp32 (no timing): a broken case
is found without a GPU.  Refuses to time on the CPU: the interpreter is not a timing.
Mimi (bench/mimi.py; not a Triton kernel, so not a spec): after the kernels, every bucket of
`engine.audio.mimi_buckets(max batch)` -- its captured graph replayed, ms per call and per lane --
to mimi.jsonl / .md / .json in --out; --dry-run decodes eagerly on the CPU at buckets up to its batch
(2: buckets 1 and 2).  `--kernel mimi_decode` runs only the Mimi rows; --no-mimi skips them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from misotts.bench.provenance import code_version
from misotts.runtime.config import PRESETS

RESULTS = Path(__file__).resolve().parent / "results"
FULL_PRESETS = ("csm-1b", "miso-8b")
BATCHES = (1, 8, 32, 64)
MIMI = "mimi_decode"  # the Mimi rows' name for --kernel (not a spec)


def _median_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_gbps(device) -> float:
    """GB/s (read + written) of a 1 GiB bf16 device-to-device copy, median."""
    src = torch.randn(2**29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _median_ms(lambda: dst.copy_(src)) / 1e6


class RowWriter:
    """Rows to <out>/<name>.jsonl and .md as they come, and <name>.json (header + rows) rewritten
    after each: whatever a cut run leaves is readable."""

    def __init__(self, out: Path, name: str, header: dict, columns: list[str]):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.md, self.json = (out / f"{name}.{ext}" for ext in ("jsonl", "md", "json"))
        self.header, self.columns, self.rows = header, columns, []
        self.jsonl.write_text("")
        self.md.write_text("".join(f"{k}: {v}\n" for k, v in header.items() if not isinstance(v, dict)) + "\n"
                           + "| " + " | ".join(columns) + " |\n" + "|" + "---|" * len(columns) + "\n")
        self._dump()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with self.md.open("a") as f:
            f.write("| " + " | ".join(_fmt(row.get(c)) for c in self.columns) + " |\n")
        self._dump()
        print("| " + " | ".join(_fmt(row.get(c)) for c in self.columns) + " |", flush=True)

    def _dump(self) -> None:
        self.json.write_text(json.dumps(dict(self.header, rows=self.rows), indent=1))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
    return str(v)


COLUMNS = ["preset", "batch", "kernel", "shape", "triton_us", "torch_us", "bytes", "gbps", "pct_of_copy", "floor_us",
           "note"]


def run(presets, batches, kernels, context, out: Path, dry_run: bool, with_torch: bool = True,
        mimi: bool = True) -> list[dict]:
    """The kernel rows (returned); then, with `mimi`, the Mimi rows (bench/mimi.py) up to max(batches).
    `kernels`: spec names to time (None: all)."""
    from misotts.kernels import specs

    if dry_run:
        device, dtype, copy = torch.device("cpu"), torch.float32, None
        header = dict(device="cpu (Triton interpreter, dry run: no timing)")
    else:
        import triton

        device, dtype = torch.device("cuda"), torch.bfloat16
        copy = copy_gbps(device)
        header = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        print(f"device: {header['device']}, copy bandwidth {copy:.0f} GB/s (1 GiB bf16, read + written)")
    header.update(dtype=str(dtype).removeprefix("torch."), copy_gbps=copy, context=context,
                  started=datetime.datetime.now().isoformat(timespec="seconds"), code=code_version())
    writer = RowWriter(out, "kernels", header, COLUMNS) if kernels is None or kernels else None
    for preset in presets if writer else ():
        for spec, batch, case in specs.cases(PRESETS[preset], batches, kernels, context=context,
                                             chunk=16 if dry_run else 512):
            inputs = case.make(specs.Tensors(device, dtype, seed=0))
            nbytes = case.bytes(inputs)
            row = dict(preset=preset, batch=batch, kernel=case.kernel, shape=case.shape, bytes=nbytes,
                       note=case.note, triton_us=None, torch_us=None, gbps=None, pct_of_copy=None, floor_us=None)
            if dry_run:
                case.run(inputs)
                case.reference(case.make(specs.Tensors(device, dtype, seed=0)))
                if case.baseline:
                    case.baseline(case.make(specs.Tensors(device, dtype, seed=0)))
            else:
                ms = _median_ms(lambda: case.run(inputs))
                row.update(triton_us=ms * 1e3, gbps=nbytes / ms / 1e6, floor_us=nbytes / copy / 1e3)
                row["pct_of_copy"] = 100 * row["gbps"] / copy
                if with_torch:
                    reference_inputs = case.make(specs.Tensors(device, dtype, seed=0))
                    try:
                        torch_fn = case.baseline or case.reference
                        row["torch_us"] = _median_ms(lambda: torch_fn(reference_inputs)) * 1e3
                    except Exception as e:  # a reference that cannot run here: say so, keep going
                        row["torch_us"] = f"n/a ({type(e).__name__})"
                del inputs
                torch.cuda.empty_cache()
            writer.add(row)
    if writer:
        print(f"\nwrote {writer.md} ({len(writer.rows)} rows)")
    if mimi:
        from misotts.bench import mimi as mimi_bench

        mimi_bench.run(RowWriter, out, device, max(batches), copy, header)
    return writer.rows if writer else []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), action="append",
                        help=f"repeatable (default: {', '.join(FULL_PRESETS)}; tiny with --dry-run)")
    parser.add_argument("--batch", type=int, nargs="+", help=f"decode lanes (default: {BATCHES}; 2 with --dry-run)")
    parser.add_argument("--kernel", nargs="+", help=f"only these kernels (names of kernels/specs.py SPECS, or "
                                                    f"{MIMI} for the Mimi rows)")
    parser.add_argument("--context", type=int, help="backbone positions each lane attends (default 1024; 40 with "
                                                    "--dry-run)")
    parser.add_argument("--no-torch", action="store_true", help="do not time the torch references")
    parser.add_argument("--no-mimi", action="store_true", help="skip the Mimi decode rows (bench/mimi.py)")
    parser.add_argument("--dry-run", action="store_true", help="run every case once on the CPU interpreter, fp32")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/kernels-<time>)")
    opts = parser.parse_args(argv)
    from misotts.kernels.specs import SPECS

    unknown = set(opts.kernel or ()) - set(SPECS) - {MIMI}
    if unknown:
        parser.error(f"unknown kernel(s) {sorted(unknown)}: expected some of {sorted(SPECS) + [MIMI]}")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if opts.dry_run:
        if not interpreted:
            print("--dry-run needs TRITON_INTERPRET=1 (set before triton is imported)", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available() or interpreted:
        print("misotts.bench.kernels needs a CUDA GPU (and TRITON_INTERPRET unset): the Triton interpreter "
              "on the CPU is not a timing. Run the correctness tests instead (pytest tests/kernels), or "
              "--dry-run to check the cases run", file=sys.stderr)
        return 2
    presets = opts.preset or (["tiny"] if opts.dry_run else list(FULL_PRESETS))
    batches = opts.batch or ([2] if opts.dry_run else list(BATCHES))
    out = opts.out or RESULTS / f"kernels-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    context = opts.context or (40 if opts.dry_run else 1024)
    kernels = set(opts.kernel) - {MIMI} if opts.kernel else None
    mimi = not opts.no_mimi and (not opts.kernel or MIMI in opts.kernel)
    run(presets, batches, kernels, context, out, opts.dry_run, not opts.no_torch, mimi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
