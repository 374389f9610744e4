"""Ahead-of-time compile report: every kernel at the preset shapes, for Hopper and/or Ampere. No GPU needed.

    python -m misotts.kernels.report [--arch sm_90a|sm_80|all] [--kernel NAME] [--preset NAME] [--jobs N]

The real launchers are called on `meta` tensors of the presets' shapes (runtime/config.py PRESETS);
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


def _cases(preset):
    """[(kernel, shape label, thunk that calls the launcher on meta tensors)] for one preset."""
    from . import depth_attention, embedding, norm_linear, paged_attention, rmsnorm, rope, sampling, swiglu

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    ints = dict(dtype=torch.int32)
    longs = dict(dtype=torch.int64)
    cfg = PRESETS[preset]
    n_cb, vocab, dim, dec = cfg.num_codebooks, cfg.audio_vocab_size, cfg.backbone.dim, cfg.decoder.dim
    cases = [("rvq_embed", f"{preset} D{dim}", lambda: embedding.rvq_embed(
        t(1, 16, n_cb + 1, **longs), t(1, 16, n_cb + 1, dtype=torch.bool), t(cfg.text_vocab_size, dim),
        t(n_cb * vocab, dim)))]

    def cache(hkv, hd):
        return t(4096, PAGE, hkv, hd)

    for part, tc in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        d, hq, hkv, ffn, hd, eps = tc.dim, tc.n_heads, tc.n_kv_heads, tc.ffn_dim, tc.head_dim, tc.norm_eps
        ctx = tc.max_seq_len if part == "backbone" else n_cb + 1  # the depth decoder sees one frame
        blocks = -(-ctx // PAGE)
        label = f"{preset} {part} Hq{hq}/Hkv{hkv}/d{hd}"

        cases += [
            ("rope_kv_write", label, lambda hq=hq, hkv=hkv, hd=hd: rope.rope_kv_write(
                t(64, hq, hd), t(64, hkv, hd), t(64, hkv, hd), t(64, **longs), t(hd // 2, dtype=torch.float32),
                cache(hkv, hd), cache(hkv, hd), t(64, **longs))),
            ("paged_decode", f"{label} ctx{ctx} page{PAGE}", lambda hq=hq, hkv=hkv, hd=hd, blocks=blocks: (
                paged_attention.paged_decode(t(8, hq, hd), cache(hkv, hd), cache(hkv, hd), t(8, blocks, **ints),
                                             t(8, **ints)))),
            ("paged_prefill", f"{label} page{PAGE}", lambda hq=hq, hkv=hkv, hd=hd, blocks=blocks: (
                paged_attention.paged_prefill(t(512, hq, hd), t(5, **ints), 256, cache(hkv, hd), cache(hkv, hd),
                                              t(4, blocks, **ints), t(4, **ints)))),
            ("paged_decode", f"{label} ctx{ctx} page{PAGE} fp32 (ieee dots)", lambda hq=hq, hkv=hkv, hd=hd,
             blocks=blocks, f=torch.float32: paged_attention.paged_decode(
                 t(8, hq, hd, dtype=f), t(4096, PAGE, hkv, hd, dtype=f), t(4096, PAGE, hkv, hd, dtype=f),
                 t(8, blocks, **ints), t(8, **ints))),
            ("paged_prefill", f"{label} page{PAGE} fp32 (ieee dots)", lambda hq=hq, hkv=hkv, hd=hd, blocks=blocks,
             f=torch.float32: paged_attention.paged_prefill(
                 t(512, hq, hd, dtype=f), t(5, **ints), 256, t(4096, PAGE, hkv, hd, dtype=f),
                 t(4096, PAGE, hkv, hd, dtype=f), t(4, blocks, **ints), t(4, **ints))),
            ("rmsnorm", f"{preset} {part} D{d}", lambda d=d, eps=eps: rmsnorm.rmsnorm(t(64, d), t(d), eps,
                                                                                    residual=t(64, d))),
            ("swiglu", f"{preset} {part} F{ffn}", lambda ffn=ffn: swiglu.swiglu(t(64, 2 * ffn))),
        ]
    for part, tc in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        d, hq, hkv, ffn, hd, eps = tc.dim, tc.n_heads, tc.n_kv_heads, tc.ffn_dim, tc.head_dim, tc.norm_eps
        for batch in (1, 8):
            cases += [
                ("norm_linear", f"{preset} {part} qkv B{batch} D{d}->{(hq + 2 * hkv) * hd}",
                 lambda d=d, n=(hq + 2 * hkv) * hd, eps=eps, batch=batch: norm_linear.norm_linear(
                     t(batch, d), t(d), eps, t(n, d))),
                ("norm_linear", f"{preset} {part} gate_up+swiglu B{batch} D{d}->F{ffn}",
                 lambda d=d, ffn=ffn, eps=eps, batch=batch: norm_linear.norm_linear(
                     t(batch, d), t(d), eps, t(2 * ffn, d), swiglu=True)),
            ]
        head = ("codebook0_head", t(vocab, dim)) if part == "backbone" else ("audio_head.T", t(dec, vocab).T)
        cases.append(("norm_linear", f"{preset} {part} {head[0]} B8 D{d}->V{vocab}",
                      lambda d=d, eps=eps, w=head[1]: norm_linear.norm_linear(t(8, d), t(d), eps, w)))
    dc = cfg.decoder
    for batch in (1, 8):
        cases.append(("depth_attention", f"{preset} decoder Hq{dc.n_heads}/Hkv{dc.n_kv_heads}/d{dc.head_dim} "
                                         f"P{n_cb} +wo D{dc.dim} B{batch}",
                      lambda batch=batch: depth_attention.depth_attention(
                          t(batch, (dc.n_heads + 2 * dc.n_kv_heads) * dc.head_dim), dc.n_heads, dc.n_kv_heads,
                          t(dc.n_layers, batch, dc.n_kv_heads, n_cb, dc.head_dim)[0],
                          t(dc.n_layers, batch, dc.n_kv_heads, n_cb, dc.head_dim)[0], t(1, **longs),
                          t(n_cb, dc.head_dim // 2, dtype=torch.float32), t(n_cb, dc.head_dim // 2, dtype=torch.float32),
                          t(dc.dim, dc.n_heads * dc.head_dim), t(batch, dc.dim))))
    cases.append(("sample_next_input", f"{preset} V{vocab} B8 per-lane params",
                  lambda: sampling.sample_next_input(
                      t(8, vocab), t(8, dtype=torch.float32), t(8, **longs), t(8, **longs), t(8, **longs),
                      t(1, **longs), t(n_cb * vocab, dec), t(8, n_cb, **longs)[:, 0], t(8, dec))))
    for codebook, h_dim in ((0, dim), (1, dec)):
        cases.append(("depth_step", f"{preset} codebook{codebook} D{h_dim}->V{vocab} B8",
                      lambda codebook=codebook, h_dim=h_dim: sampling.depth_step(
                          t(8, h_dim), t(n_cb - 1, h_dim, vocab)[max(codebook - 1, 0)], codebook,
                          t(n_cb * vocab, dec), t(8, n_cb, **longs), t(8, dec), t(8, **longs),
                          t(8, **longs), 0.9, 50, logits=t(8, vocab, dtype=torch.float32))))
    cases.append(("depth_step", f"{preset} codebook1 D{dec}->V{vocab} B8 per-lane params",
                  lambda: sampling.depth_step(
                      t(8, dec), t(n_cb - 1, dec, vocab)[0], 1, t(n_cb * vocab, dec),
                      t(8, n_cb, **longs), t(8, dec), t(8, **longs), t(8, **longs),
                      t(8, dtype=torch.float32), t(8, **longs), logits=t(8, vocab, dtype=torch.float32),
                      counter_offset=1)))
    cases.append(("sample_topk", f"{preset} V{vocab} B8", lambda: sampling.sample_topk(
        t(8, vocab, dtype=torch.float32), 0.9, 50, t(8, **longs), t(8, **longs))))
    from . import quant_linear  # weight-only quantised GEMVs (issue 26)

    return cases + quant_linear.report_cases(preset, cfg, t)


def _record(thunk):
    from . import _utils
    _utils._recorder = []
    try:
        thunk()
        return _utils._recorder
    finally:
        _utils._recorder = None


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

    preset, index, arch = job
    name, label, thunk = _cases(preset)[index]
    try:
        launches = _record(thunk)
    except Exception as e:
        return [dict(kernel=name, launch="(launcher)", shape=label, arch=arch, registers=-1, spills=-1, shared=-1,
                     ok=False, error=f"{type(e).__name__}: {e}")]
    rows = []
    for kernel, _grid, args, meta in launches:
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
    jobs = [(p, i, a) for a in archs for p in presets for i, (k, _, _) in enumerate(_cases(p))
            if opts.kernel in (None, k)]
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
