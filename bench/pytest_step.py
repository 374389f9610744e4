"""The whole test suite on any machine, GPU or not: `python -m misotts.bench.pytest_step [PYTEST ARGS]`.

Triton reads TRITON_INTERPRET once, at import, for every kernel of a process: a process either
interprets kernels (CPU tensors, the kernel tests) or compiles them (CUDA tensors).  So:

- without CUDA: one run, interpreted -- what CI does;
- with CUDA: the CPU tests with the interpreter and CUDA hidden (exactly CI's run), then the
  CUDA tests (`-m cuda`) natively, each in its own process.

`--run cpu` or `--run cuda` starts one of the two (the GPU suite gives each its own time limit);
without CUDA, `--run cuda` still collects the CUDA tests (interpreted), which then skip: the GPU
suite's CPU rehearsal checks that they collect.  `--dry-run` prints the runs instead of starting
them.  Exit status: 0 when every run passed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time


def planned_runs(cuda: bool, environ: dict[str, str], only: str | None = None) -> list[tuple[str, dict, list[str]]]:
    """(name, environment, pytest arguments) of each process to run; `only`: "cpu" or "cuda"."""
    interpreted = {**environ, "TRITON_INTERPRET": "1"}
    if not cuda:
        return [("cuda", interpreted, ["-m", "cuda"])] if only == "cuda" else [("all", interpreted, [])]
    native = {k: v for k, v in environ.items() if k != "TRITON_INTERPRET"}
    runs = [("cpu", {**interpreted, "CUDA_VISIBLE_DEVICES": ""}, ["-m", "not cuda"]),  # Triton interpreted
            ("cuda", native, ["-m", "cuda"])]  # Triton compiled
    return [run for run in runs if only in (None, run[0])]


def parallel_args(cuda_run: bool) -> list[str]:
    """pytest-xdist when installed (the GPU machine has many cores); the CUDA run shares one GPU: serial."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return [] if cuda_run else ["-n", str(min(12, os.cpu_count() or 1))]


def main(argv: list[str] | None = None, cuda: bool | None = None, cwd: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    only = None
    if "--run" in argv:
        i = argv.index("--run")
        only, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    failed = []
    for name, env, args in planned_runs(cuda, dict(os.environ), only):
        command = [sys.executable, "-m", "pytest", *args, *parallel_args(name == "cuda"), *argv]
        print(f"== pytest {name}: {' '.join(command[1:])}", flush=True)
        if dry:
            continue
        start = time.perf_counter()
        code = subprocess.call(command, env=env, cwd=cwd)
        print(f"== pytest {name}: exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
        if code not in (0, 5):  # 5: nothing collected (e.g. no CUDA test selected)
            failed.append(name)
    print("== pytest: " + (f"FAILED: {', '.join(failed)}" if failed else "all runs passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
