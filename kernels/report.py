"""Ahead-of-time compile report: every kernel at the preset shapes, for Hopper and/or Ampere. No GPU needed.

    python -m misotts.kernels.report [--arch sm_90a|sm_80|all] [--kernel NAME] [--preset NAME] [--jobs N]

The cases are the kernel specs' (kernels/specs.py) at the presets' shapes (runtime/config.py PRESETS),
at 1, 8, 16, 32 and 64 decode lanes, in bf16 (and fp32 for the kernels with an IEEE-dot path); a launch
specialized like one already listed (same kernel, argument types, alignment, meta-parameters) compiles
to the same code and is not compiled again, so a row names the first case that needs its code.
The real launchers are called on `meta` tensors;
`_utils.launch` records the kernel, arguments and meta-parameters instead of running them, and each
recorded launch is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))
using the same argument specialization (dtypes, 16-byte alignment, ints divisible by 16) that the
JIT would use at run time.
ptxas -v on the generated PTX gives registers and spills; shared memory is Triton's allocation.
Exit status 1 on any failed compile or any spill.
"""
import argparse
import concurrent.futures as futures
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from misotts.runtime.config import PRESETS

COMPILED_PRESETS = ("miso-8b", "csm-1b")  # the full-size presets (tiny is for tests)
ARCHS = {"sm_90a": 90, "sm_80": 80}
PAGE = 16  # KV block size compiled in the report (the kernels take any power of two >= 16)


REPORT_BATCHES = (1, 8, 16, 32, 64)  # decode lanes compiled: the buckets whose tiles differ, up to the largest fused one
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _cases(preset, dtype_name):
    """[(kernel, shape label, thunk that calls the launcher on meta tensors)]: the kernel specs'
    cases (kernels/specs.py) at the preset's shapes, for the specs compiled in this dtype."""
    from . import specs

    dtype, out = DTYPES[dtype_name], []
    for spec, batch, case in specs.cases(PRESETS[preset], REPORT_BATCHES, context=PRESETS[preset].max_seq_len,
                                         page=PAGE):
        if dtype in spec.report_dtypes:
            label = f"{preset} {case.shape}" + ("" if dtype_name == "bf16" else f" {dtype_name}")
            out.append((spec.name, label, lambda case=case: case.run(case.make(specs.Tensors("meta", dtype)))))
    if dtype_name == "bf16":  # the weight-only quantised GEMVs (issue 26) take bf16 activations
        from . import quant_linear

        def meta(*shape, dtype=torch.bfloat16):
            return torch.empty(*shape, dtype=dtype, device="meta")

        out += quant_linear.report_cases(preset, PRESETS[preset], meta)
    return out


def _record(thunk):
    from . import _utils
    _utils._recorder = []
    try:
        thunk()
        return _utils._recorder
    finally:
        _utils._recorder = None


def _distinct_jobs(presets, archs, kernel_name):
    """One job per case with the launches no earlier case compiles (a launch specialized alike --
    same kernel, argument types, alignment and meta-parameters -- compiles to the same code)."""
    seen, jobs = set(), []
    for preset in presets:
        for dtype_name in DTYPES:
            for index, (name, _, thunk) in enumerate(_cases(preset, dtype_name)):
                if kernel_name not in (None, name):
                    continue
                try:
                    launches = _record(thunk)
                except Exception:  # the worker reports the launcher's error
                    launches = [None]
                if launches == [None]:
                    jobs += [(preset, dtype_name, index, [], a) for a in archs]
                    continue
                fresh = []
                for i, item in enumerate(launches):
                    key = _key(item)
                    if key not in seen:
                        seen.add(key)
                        fresh.append(i)
                if fresh:
                    jobs += [(preset, dtype_name, index, fresh, a) for a in archs]
    return jobs


def _key(launch):
    kernel, _grid, args, meta = launch
    signature, constexprs, attrs, options = _specialize(kernel, args, meta)
    freeze = lambda d: tuple(sorted((str(k), str(v)) for k, v in d.items()))  # noqa: E731
    return kernel.__name__, freeze(signature), freeze(constexprs), freeze(attrs), freeze(options)


def _specialize(kernel, args, meta):
    """Signature, constexprs and attrs as the JIT would build them for this call."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    names = [p.name for p in kernel.params if not p.is_constexpr]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(names, args)):
        ty, key = native_specialize_impl(BaseBackend, arg, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = key
        elif isinstance(key, str) and "D" in key:
            attrs[(kernel.arg_names.index(name),)] = BaseBackend.parse_attr(key)
    for name, value in meta.items():
        if name in kernel.arg_names:
            signature[name], constexprs[name] = "constexpr", value
    options = {k: v for k, v in meta.items() if k not in kernel.arg_names}
    return signature, constexprs, attrs, options


def _ptxas_usage(ptx, arch, cc):
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def _compile_case(job):
    """Worker: compile every launch of one case for one arch; returns table rows."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    preset, dtype_name, index, launch_indices, arch = job
    name, label, thunk = _cases(preset, dtype_name)[index]
    try:
        launches = _record(thunk)
    except Exception as e:
        return [dict(kernel=name, launch="(launcher)", shape=label, arch=arch, registers=-1, spills=-1, shared=-1,
                     ok=False, error=f"{type(e).__name__}: {e}")]
    rows = []
    for kernel, _grid, args, meta in (launches[i] for i in launch_indices):
        cc = ARCHS[arch]
        try:
            signature, constexprs, attrs, options = _specialize(kernel, args, meta)
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", cc, 32), options=options)
            regs, spills = _ptxas_usage(compiled.asm["ptx"], arch, cc)
            rows.append(dict(kernel=name, launch=kernel.__name__, shape=label, arch=arch, registers=regs,
                             spills=spills, shared=compiled.metadata.shared, ok=spills == 0, error=""))
        except Exception as e:  # report every failure, keep going
            rows.append(dict(kernel=name, launch=kernel.__name__, shape=label, arch=arch, registers=-1, spills=-1,
                             shared=-1, ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[*ARCHS, "all"], default="all")
    parser.add_argument("--kernel", help="only cases of this kernel (e.g. rmsnorm)")
    parser.add_argument("--preset", choices=COMPILED_PRESETS, help="only this preset")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the report compiles real kernels
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    archs = list(ARCHS) if opts.arch == "all" else [opts.arch]
    presets = [opts.preset] if opts.preset else COMPILED_PRESETS
    jobs = _distinct_jobs(presets, archs, opts.kernel)
    if not jobs:
        parser.error(f"no kernel named {opts.kernel!r}")
    start = time.time()
    if opts.jobs <= 1 or len(jobs) == 1:
        rows = [row for job in jobs for row in _compile_case(job)]
    else:
        ctx = multiprocessing.get_context("spawn")  # clean workers, no forked triton state
        with futures.ProcessPoolExecutor(max_workers=opts.jobs, mp_context=ctx) as pool:
            rows = [row for result in pool.map(_compile_case, jobs) for row in result]
    header = ["kernel", "launch", "shape", "arch", "registers", "spills (B)", "shared (B)", "OK"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        ok = "yes" if r["ok"] else ("SPILL" if not r["error"] else "FAIL")
        print(f"| {r['kernel']} | {r['launch']} | {r['shape']} | {r['arch']} | {r['registers']} | {r['spills']} | "
              f"{r['shared']} | {ok} |")
    for r in rows:
        if r["error"]:
            print(f"FAILED {r['launch']} {r['shape']} {r['arch']}: {r['error']}", file=sys.stderr)
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows)} compiles, {failed} failed or spilled, {time.time() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
