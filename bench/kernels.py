"""Kernel benchmark on a CUDA GPU: each Triton kernel vs its torch reference (and flash-attn if installed).

    python -m misotts.bench.kernels [--preset miso-8b|csm-1b] [--out DIR]

Times are medians of CUDA-event timings (triton.testing.do_bench, which also flushes L2 between
runs). Bandwidth is each kernel's byte floor (every input read once, every output written once)
over its time, compared with a 1 GiB device-to-device copy measured in the same run. Prints a
Markdown table and writes JSON to bench/results/. Refuses to run on the CPU: the Triton
interpreter is not a timing.
"""
import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from misotts.kernels.report import COMPILED_PRESETS
from misotts.runtime.config import PRESETS
from misotts.bench.provenance import code_version

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    kernel: str
    shape: str
    triton: Callable
    torch: Callable
    bytes: int  # byte floor
    flash: Optional[Callable] = None
    note: str = field(default="")


def _cases(preset, device, dtype=torch.bfloat16, small=False):
    """Benchmark cases at a preset's shapes (small=True: tiny shapes, used by the CPU wiring test)."""
    from misotts.kernels import reference as ref
    from misotts.kernels.embedding import rvq_embed
    from misotts.kernels.flash_backend import flash_decode, flash_prefill
    from misotts.kernels.paged_attention import decode_workspace, paged_decode, paged_prefill
    from misotts.kernels.rmsnorm import rmsnorm
    from misotts.kernels.rope import llama3_inv_freq, rope_kv_write
    from misotts.kernels.depth_attention import depth_attention
    from misotts.kernels.norm_linear import norm_linear
    from misotts.kernels.sampling import depth_step, sample_next_input, sample_topk
    from misotts.kernels.swiglu import swiglu

    g = torch.Generator(device=device).manual_seed(0)
    size = 2 if dtype in (torch.bfloat16, torch.float16) else 4

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    def ints(high, *shape, dt=torch.int64):
        return torch.randint(0, high, shape, generator=g, device=device, dtype=dt)

    cfg = PRESETS[preset]
    n_cb, vocab = cfg.num_codebooks, cfg.audio_vocab_size
    tokens, decode_batch, context = (8, 2, 40) if small else (512, 8, 2048)
    cases = []

    dim = cfg.backbone.dim if not small else 64
    for rows in (decode_batch, tokens):
        frames = ints(vocab, 1, rows, n_cb + 1)
        mask = torch.ones_like(frames, dtype=torch.bool)
        mask[..., -1] = False  # an audio frame: 32 codebook rows, no text
        text, audio = randn(cfg.text_vocab_size if not small else 100, dim), randn(n_cb * vocab, dim)
        out = torch.empty(1, rows, dim, device=device, dtype=dtype)
        cases.append(Case("rvq_embed", f"{rows} frames D{dim}",
                          lambda f=frames, m=mask, t=text, a=audio, o=out: rvq_embed(f, m, t, a, out=o),
                          lambda f=frames, m=mask, t=text, a=audio: ref.rvq_embed_ref(f, m, t, a),
                          rows * (n_cb + 1) * dim * size))

    for part, tc in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        d, hq, hkv, ffn, hd = tc.dim, tc.n_heads, tc.n_kv_heads, tc.ffn_dim, tc.head_dim
        if small:
            d, hq, hkv, ffn = 64, 4, 2, 96
        ctx = context if part == "backbone" else n_cb + 1
        label = f"{part} Hq{hq}/Hkv{hkv}/d{hd}"
        page, flash_page = 16, 256

        def paged(lengths, page):
            per_seq = -(-max(lengths) // page)
            num_blocks = per_seq * len(lengths) + 1
            k, v = randn(num_blocks, page, hkv, hd), randn(num_blocks, page, hkv, hd)
            table = torch.randperm(num_blocks - 1, generator=g, device=device)[: per_seq * len(lengths)]
            table = table.view(len(lengths), per_seq).to(torch.int32)
            return k, v, table, torch.tensor(lengths, dtype=torch.int32, device=device)

        # rope + kv write for a decode batch and a prefill chunk
        for t in (decode_batch, tokens):
            q, k, v = randn(t, hq, hd), randn(t, hkv, hd), randn(t, hkv, hd)
            k_cache, v_cache, _, _ = paged([t], page)
            slots = torch.arange(t, device=device)
            pos, inv = torch.arange(t, device=device), llama3_inv_freq(hd, device=device)
            cases.append(Case("rope_kv_write", f"{label} T{t}",
                              lambda a=(q, k, v, pos, inv, k_cache, v_cache, slots): rope_kv_write(*a),
                              lambda a=(q, k, v, pos, inv, k_cache, v_cache, slots): ref.rope_kv_write_ref(*a),
                              t * (2 * hq + 4 * hkv) * hd * size))

        # decode: decode_batch sequences of `ctx` tokens
        lengths = [ctx] * decode_batch
        k_cache, v_cache, table, lens = paged(lengths, page)
        q, out = randn(decode_batch, hq, hd), torch.empty(decode_batch, hq, hd, device=device, dtype=dtype)
        ws = decode_workspace(decode_batch, hq, hd, table.shape[1], page, device=device)
        flash = None
        if not small:
            fk, fv, ftable, flens = paged(lengths, flash_page)
            flash = lambda a=(q, fk, fv, ftable, flens): flash_decode(*a)  # noqa: E731
        cases.append(Case("paged_decode", f"{label} {decode_batch}x ctx{ctx} page{page}",
                          lambda a=(q, k_cache, v_cache, table, lens), o=out, w=ws:
                              paged_decode(*a, out=o, workspace=w),
                          lambda a=(q, k_cache, v_cache, table, lens): ref.paged_decode_ref(*a, hd**-0.5),
                          2 * sum(lengths) * hkv * hd * size + 2 * q.numel() * size, flash))

        # prefill: one chunk of `tokens` new tokens after a prefix of the same length
        lengths = [2 * tokens] if part == "backbone" else [ctx] * decode_batch
        chunk = tokens if part == "backbone" else ctx
        k_cache, v_cache, table, lens = paged(lengths, page)
        cu = torch.arange(0, len(lengths) + 1, device=device, dtype=torch.int32) * chunk
        q = randn(chunk * len(lengths), hq, hd)
        flash = None
        if not small:
            fk, fv, ftable, flens = paged(lengths, flash_page)
            flash = lambda a=(q, cu, chunk, fk, fv, ftable, flens): flash_prefill(*a)  # noqa: E731
        cases.append(Case("paged_prefill", f"{label} {len(lengths)}x chunk{chunk} ctx{lengths[0]} page{page}",
                          lambda a=(q, cu, chunk, k_cache, v_cache, table, lens): paged_prefill(*a),
                          lambda a=(q, cu, k_cache, v_cache, table, lens): ref.paged_prefill_ref(*a, hd**-0.5),
                          2 * sum(lengths) * hkv * hd * size + 2 * q.numel() * size, flash,
                          note="compute-bound: compare with flash-attn, not the copy"))

        for rows in (decode_batch, tokens):
            x, res, w = randn(rows, d), randn(rows, d), randn(d)
            cases.append(Case("rmsnorm", f"{part} {rows}x D{d} +residual",
                              lambda x=x, w=w, r=res: rmsnorm(x, w, 1e-5, residual=r),
                              lambda x=x, w=w, r=res: ref.rmsnorm_ref(x, w, 1e-5, r), 4 * rows * d * size + d * size))
            gate_up = randn(rows, 2 * ffn)
            cases.append(Case("swiglu", f"{part} {rows}x F{ffn}", lambda a=gate_up: swiglu(a),
                              lambda a=gate_up: ref.swiglu_ref(a), 3 * rows * ffn * size))

    # The fused depth loop's kernels (the torch column: the unfused reference ops they replace).
    for part, tc in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        d, hq, hkv, ffn, hd = tc.dim, tc.n_heads, tc.n_kv_heads, tc.ffn_dim, tc.head_dim
        if small:
            d, hq, hkv, ffn, hd = 64, 4, 2, 96, 16
        x, nw = randn(decode_batch, d), randn(d)
        for name, w, glu in (("qkv", randn((hq + 2 * hkv) * hd, d), False), ("gate_up+swiglu", randn(2 * ffn, d), True)):
            reference = ref.rmsnorm_swiglu_ref if glu else ref.rmsnorm_linear_ref
            cases.append(Case("norm_linear", f"{part} {name} B{decode_batch} D{d}->{w.shape[0]}",
                              lambda x=x, nw=nw, w=w, glu=glu: norm_linear(x, nw, 1e-5, w, swiglu=glu),
                              lambda x=x, nw=nw, w=w, r=reference: r(x, nw, 1e-5, w),
                              w.numel() * size + decode_batch * (d + w.shape[0] // (2 if glu else 1)) * size))
    dc = cfg.decoder
    d, hq, hkv, hd = (dc.dim, dc.n_heads, dc.n_kv_heads, dc.head_dim) if not small else (64, 4, 2, 16)
    qkv, wo, res = randn(decode_batch, (hq + 2 * hkv) * hd), randn(d, hq * hd), randn(decode_batch, d)
    kc, vc = randn(decode_batch, hkv, n_cb, hd), randn(decode_batch, hkv, n_cb, hd)
    angle = torch.arange(n_cb, device=device, dtype=torch.float32)[:, None] * torch.rand(hd // 2, device=device)
    pos = torch.tensor([n_cb - 1], device=device)
    args = (qkv, hq, hkv, kc, vc, pos, angle.cos(), angle.sin(), wo, res)
    cases.append(Case("depth_attention", f"decoder Hq{hq}/Hkv{hkv}/d{hd} P{n_cb} +wo B{decode_batch}",
                      lambda a=args: depth_attention(*a), lambda a=args: ref.depth_attention_out_ref(*a),
                      wo.numel() * size + 2 * kc.numel() * size + decode_batch * (qkv.shape[1] + 2 * d) * size,
                      note="attention recomputed per column block"))

    dec = cfg.decoder.dim if not small else 64
    batch = decode_batch
    seed, counter = ints(2**40, batch), ints(2**20, batch)
    for codebook in (0, 1):
        h_dim = (cfg.backbone.dim if not small else 64) if codebook == 0 else dec
        h, head = randn(batch, h_dim), randn(h_dim, vocab)
        embed = randn(n_cb * vocab, dec)
        codes = torch.zeros(batch, n_cb, dtype=torch.int64, device=device)
        nxt, logits = randn(batch, dec), torch.empty(batch, vocab, device=device)
        cases.append(Case("depth_step", f"codebook{codebook} B{batch} D{h_dim}->V{vocab} top50",
                          lambda a=(h, head, codebook, embed, codes, nxt, seed, counter, 0.9, 50), lg=logits:
                              depth_step(*a, logits=lg),
                          lambda a=(h, head, codebook, embed, seed, counter, 0.9, 50): ref.depth_step_ref(*a),
                          h_dim * vocab * size + batch * (h_dim + 2 * dec) * size))
    table, nxt, codes = randn(n_cb * vocab, dec), randn(batch, dec), torch.zeros(batch, n_cb, dtype=torch.int64,
                                                                                 device=device)
    lg, temp, topk = randn(batch, vocab), torch.full((batch,), 0.9, device=device), torch.full((batch,), 50, device=device)
    cb = torch.tensor([5], device=device)
    cases.append(Case("sample_next_input", f"B{batch} V{vocab} top50 per-lane",
                      lambda: sample_next_input(lg, temp, topk, seed, counter, cb, table, codes[:, 5], nxt),
                      lambda: table[ref.sample_topk_ref(lg, temp, topk, seed, counter + 5) + 5 * vocab],
                      lg.numel() * size + batch * dec * 2 * size))
    logits = randn(batch, vocab, dt=torch.float32)
    cases.append(Case("sample_topk", f"B{batch} V{vocab} top50",
                      lambda: sample_topk(logits, 0.9, 50, seed, counter),
                      lambda: ref.sample_topk_ref(logits, 0.9, 50, seed, counter), logits.numel() * 4))
    return cases


def _median_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _copy_gbps(device):
    src = torch.randn(2**29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _median_ms(lambda: dst.copy_(src)) / 1e6


def _try_ms(fn):
    if fn is None:
        return None
    try:
        return _median_ms(fn)
    except Exception as e:  # flash-attn missing or unsupported here: report, do not fail the run
        return f"n/a ({type(e).__name__})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=COMPILED_PRESETS, action="append")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("misotts.bench.kernels needs a CUDA GPU (and TRITON_INTERPRET unset): the Triton interpreter "
              "on the CPU is not a timing. Run the correctness tests instead: pytest tests/kernels", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    copy = _copy_gbps(device)
    rows = []
    for preset in opts.preset or COMPILED_PRESETS:
        for case in _cases(preset, device):
            ms, ref_ms, flash_ms = _median_ms(case.triton), _try_ms(case.torch), _try_ms(case.flash)
            gbps = case.bytes / ms / 1e6
            rows.append(dict(preset=preset, kernel=case.kernel, shape=case.shape, triton_us=ms * 1e3,
                             torch_us=ref_ms * 1e3 if isinstance(ref_ms, float) else ref_ms,
                             flash_us=flash_ms * 1e3 if isinstance(flash_ms, float) else flash_ms,
                             bytes=case.bytes, gbps=gbps, pct_of_copy=100 * gbps / copy,
                             floor_us=case.bytes / copy / 1e3, note=case.note))
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {copy:.0f} GB/s (1 GiB bf16, read + write)\n")
    print("| preset | kernel | shape | triton us | torch us | flash us | GB/s | % copy | floor us | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v))

    for r in rows:
        print(f"| {r['preset']} | {r['kernel']} | {r['shape']} | {fmt(r['triton_us'])} | {fmt(r['torch_us'])} | "
              f"{fmt(r['flash_us'])} | {r['gbps']:.0f} | {r['pct_of_copy']:.0f}% | {fmt(r['floor_us'])} | "
              f"{r['note']} |")
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = opts.out / f"kernels-{stamp}.json"
    import triton
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                    triton=triton.__version__, code=code_version(), copy_gbps=copy, rows=rows),
                               indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
