"""One spec per kernel: its launcher, its torch reference, its shape cases and its tolerance per dtype.

The compile report (`kernels/report.py`, on `meta` tensors), the kernel bench (`bench/kernels.py`,
timed on CUDA) and the kernel tests (`tests/kernels/test_specs.py`: the interpreter in fp32 at odd
shapes, CUDA at the presets' shapes in fp32/bf16/fp16) all build their cases here; there is no other
list.  A case's shapes come from a `Dims`: a model config (a preset's, or an odd one for tests), the
lanes of a decode step, the backbone context each lane attends and the rows of a prefill chunk.

A `Case` makes its inputs with a `Tensors` factory (seeded random data on a device, or bare shapes on
`meta`), `run`s the launcher and the `reference` on them (each on its own copy: kernels write in
place), both returning the same named outputs, and states its byte floor (every input read once,
every output written once) for the bench's GB/s.  Tolerances compare the kernel in a dtype with the
reference's fp32 math on the same (already rounded) inputs: (atol, rtol) per dtype, see TOLERANCES.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference as ref

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16

# (atol, rtol) of a kernel in a dtype against the reference's fp32 math on the same inputs:
#   elementwise: one rounding of the output (bf16: 2^-8 relative);
#   attention:   + probabilities rounded to the dtype before P @ V, exp2-domain online softmax in fp32;
#   gemv:        the normed row (or head output) rounded to the dtype before the product, K-long fp32
#                sums of O(1) terms (weights scaled K^-0.5), the output rounded once;
#   sampling:    tokens exact (one counter RNG in torch and Triton; see `check` for near-ties).
ELEMENTWISE = {FP32: (1e-5, 1e-5), BF16: (1e-2, 1e-2), FP16: (2e-3, 2e-3)}
ATTENTION = {FP32: (1e-4, 1e-4), BF16: (2e-2, 2e-2), FP16: (4e-3, 4e-3)}
GEMV = {FP32: (1e-4, 1e-4), BF16: (3e-2, 3e-2), FP16: (1e-2, 1e-2)}
TOLERANCES = {"elementwise": ELEMENTWISE, "attention": ATTENTION, "gemv": GEMV}


@dataclass(frozen=True)
class Dims:
    """What a kernel's cases are built from: a model's shapes, the lanes of a decode step (batch),
    the positions each lane's backbone attends (context) and the rows of a prefill chunk."""
    config: object  # runtime.config.ModelConfig
    batch: int
    context: int = 1024
    chunk: int = 512
    page: int = 16


class Tensors:
    """A case's inputs: seeded random data on a real device, or shapes alone on `meta`."""

    def __init__(self, device, dtype, seed: int = 0):
        self.device, self.dtype = torch.device(device), dtype
        self.meta = self.device.type == "meta"
        self.g = None if self.meta else torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, *shape, scale=1.0, dtype=None):
        dtype = dtype or self.dtype
        if self.meta:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return (torch.randn(shape, generator=self.g, device=self.device) * scale).to(dtype)

    def ints(self, high, *shape, dtype=torch.int64):
        if self.meta:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return torch.randint(0, high, shape, generator=self.g, device=self.device, dtype=dtype)

    def perm(self, n):
        if self.meta:
            return torch.empty(n, dtype=torch.int64, device=self.device)
        return torch.randperm(n, generator=self.g, device=self.device)

    def tensor(self, values, dtype):
        return torch.tensor(values, dtype=dtype, device=self.device)

    def full(self, shape, value, dtype=None):
        return torch.full(shape, value, dtype=dtype or self.dtype, device=self.device)


@dataclass(frozen=True)
class Case:
    kernel: str
    shape: str
    make: Callable[[Tensors], dict]  # named inputs
    run: Callable[[dict], dict]  # the launcher -> named outputs
    reference: Callable[[dict], dict]  # the torch reference -> the same names
    bytes: Callable[[dict], int]  # byte floor of one call
    note: str = ""
    baseline: Callable[[dict], object] | None = None  # what the bench's torch column times (default: reference)


@dataclass(frozen=True)
class KernelSpec:
    name: str
    launcher: Callable
    reference: Callable
    tolerance: str  # a key of TOLERANCES
    cases: Callable[[Dims], list]
    batched: bool = True  # False: prefill shapes, the same at every batch (built once per model)
    in_frame: bool = True  # launched by the engine's decode frame (TritonOps)
    report_dtypes: tuple = (BF16,)  # compiled by the report (fp32 too where the kernel has an IEEE path)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def float_copy(inputs: dict) -> dict:
    """The inputs as the reference gets them: floating tensors in fp32 (its math), others cloned."""
    return {k: (v.float().clone() if v.is_floating_point() else v.clone()) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


def check(spec: KernelSpec, got: dict, want: dict, dtype) -> None:
    """Kernel outputs against the reference's within spec's tolerance for dtype.  "tokens" are exact
    but for a lane whose two best scores are within an ulp apart (Triton's and torch's exp and log
    may differ by one: ~1e-6 per draw, see tests/kernels/test_sampling.py), and outputs that follow
    from the tokens (the gathered next input) are compared on the lanes whose tokens agree."""
    atol, rtol = TOLERANCES[spec.tolerance][dtype]
    same = None
    if "tokens" in got:
        same = got["tokens"].long() == want["tokens"].long()
        assert int((~same).sum()) <= 1, (spec.name, got["tokens"], want["tokens"])
    for name, value in got.items():
        if name == "tokens":
            continue
        expected = want[name]
        if name == "next_input":
            value, expected = value[same], expected[same]
        torch.testing.assert_close(value.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{spec.name} "
                                   f"{name}: {m}")


# ---- the cases ------------------------------------------------------------------------------------
def _parts(d: Dims):
    return (("backbone", d.config.backbone), ("decoder", d.config.decoder))


def _embed_cases(d: Dims):
    from .embedding import rvq_embed

    cfg, rows = d.config, d.batch
    n, vocab, dim = cfg.num_codebooks, cfg.audio_vocab_size, cfg.backbone.dim

    def make(t):
        mask = t.full((1, rows, n + 1), True, dtype=torch.bool)
        mask[..., -1] = False  # an audio frame: n codebook rows, no text
        return dict(frames=t.ints(vocab, 1, rows, n + 1), mask=mask, text=t.randn(cfg.text_vocab_size, dim),
                    audio=t.randn(n * vocab, dim))

    return [Case("rvq_embed", f"{rows} frames D{dim}", make,
                 lambda i: dict(out=rvq_embed(i["frames"], i["mask"], i["text"], i["audio"])),
                 lambda i: dict(out=ref.rvq_embed_ref(i["frames"], i["mask"], i["text"], i["audio"])),
                 lambda i: rows * (n + 2) * dim * i["audio"].element_size())]


def _rope_cases(d: Dims):
    from .rope import rope_kv_write

    tc, tokens = d.config.backbone, d.batch
    hq, hkv, hd = tc.n_heads, tc.n_kv_heads, tc.head_dim
    blocks = -(-tokens // d.page) + 1

    def make(t):
        return dict(q=t.randn(tokens, hq, hd), k=t.randn(tokens, hkv, hd), v=t.randn(tokens, hkv, hd),
                    positions=t.ints(tc.max_seq_len, tokens), inv_freq=ref.rope_inv_freq(hd, tc.rope_base,
                                                                                         device=t.device),
                    k_cache=t.randn(blocks, d.page, hkv, hd), v_cache=t.randn(blocks, d.page, hkv, hd),
                    slots=t.perm(blocks * d.page)[:tokens])

    def args(i):
        return (i["q"], i["k"], i["v"], i["positions"], i["inv_freq"], i["k_cache"], i["v_cache"], i["slots"])

    return [Case("rope_kv_write", f"backbone Hq{hq}/Hkv{hkv}/d{hd} T{tokens}", make,
                 lambda i: dict(q=rope_kv_write(*args(i)), k_cache=i["k_cache"], v_cache=i["v_cache"]),
                 lambda i: dict(q=ref.rope_kv_write_ref(*args(i)), k_cache=i["k_cache"], v_cache=i["v_cache"]),
                 lambda i: tokens * (2 * hq + 4 * hkv) * hd * i["q"].element_size())]


def _paged_tables(t, lengths, page, hkv, hd):
    """Caches with each lane's blocks scattered over the pool, its block table and lengths."""
    per_lane = -(-max(lengths) // page)
    blocks = per_lane * len(lengths) + 1
    table = t.perm(blocks)[:per_lane * len(lengths)].view(len(lengths), per_lane).to(torch.int32)
    return dict(k_cache=t.randn(blocks, page, hkv, hd), v_cache=t.randn(blocks, page, hkv, hd), table=table,
                lens=t.tensor(lengths, torch.int32))


def _decode_cases(d: Dims):
    from .paged_attention import decode_workspace, paged_decode

    tc = d.config.backbone
    hq, hkv, hd = tc.n_heads, tc.n_kv_heads, tc.head_dim
    lengths = [max(1, d.context - 7 * lane) for lane in range(d.batch)]  # ragged: lanes end mid-block
    scale = hd ** -0.5

    def make(t):
        inputs = dict(q=t.randn(d.batch, hq, hd), **_paged_tables(t, lengths, d.page, hkv, hd))
        inputs["workspace"] = decode_workspace(d.batch, hq, hd, inputs["table"].shape[1], d.page, device=t.device)
        return inputs

    return [Case("paged_decode", f"backbone Hq{hq}/Hkv{hkv}/d{hd} {d.batch}x ctx<={d.context} page{d.page}", make,
                 lambda i: dict(out=paged_decode(i["q"], i["k_cache"], i["v_cache"], i["table"], i["lens"], scale,
                                                 workspace=i["workspace"])),
                 lambda i: dict(out=ref.paged_decode_ref(i["q"], i["k_cache"], i["v_cache"], i["table"], i["lens"],
                                                         scale)),
                 lambda i: (2 * sum(lengths) * hkv * hd + 2 * i["q"].numel()) * i["q"].element_size())]


def _prefill_cases(d: Dims):
    from .paged_attention import paged_prefill

    tc, chunk = d.config.backbone, d.chunk
    hq, hkv, hd = tc.n_heads, tc.n_kv_heads, tc.head_dim
    scale = hd ** -0.5

    def make(t):  # one chunk after a cached prefix of the same length
        return dict(q=t.randn(chunk, hq, hd), cu=t.tensor([0, chunk], torch.int32),
                    **_paged_tables(t, [2 * chunk], d.page, hkv, hd))

    return [Case("paged_prefill", f"backbone Hq{hq}/Hkv{hkv}/d{hd} chunk{chunk} ctx{2 * chunk} page{d.page}", make,
                 lambda i: dict(out=paged_prefill(i["q"], i["cu"], chunk, i["k_cache"], i["v_cache"], i["table"],
                                                  i["lens"], scale)),
                 lambda i: dict(out=ref.paged_prefill_ref(i["q"], i["cu"], i["k_cache"], i["v_cache"], i["table"],
                                                          i["lens"], scale)),
                 lambda i: (4 * chunk * hkv * hd + 2 * i["q"].numel()) * i["q"].element_size(),
                 note="compute-bound: a byte floor is not its floor")]


def _rmsnorm_cases(d: Dims):
    from .rmsnorm import rmsnorm

    cases = []
    for part, tc in _parts(d):
        rows, dim, eps = d.chunk, tc.dim, tc.norm_eps

        def make(t, rows=rows, dim=dim):
            return dict(x=t.randn(rows, dim), residual=t.randn(rows, dim), weight=1 + 0.1 * t.randn(dim))

        def run(i, eps=eps):
            out, h = rmsnorm(i["x"], i["weight"], eps, residual=i["residual"])
            return dict(out=out, h=h)

        def reference(i, eps=eps):
            out, h = ref.rmsnorm_ref(i["x"], i["weight"], eps, i["residual"])
            return dict(out=out, h=h)

        cases.append(Case("rmsnorm", f"{part} {rows}x D{dim} +residual", make, run, reference,
                          lambda i: nbytes(i["x"], i["residual"], i["weight"]) + 2 * nbytes(i["x"])))
    return cases


def _swiglu_cases(d: Dims):
    from .swiglu import swiglu

    cases = []
    for part, tc in _parts(d):
        rows, ffn = d.chunk, tc.ffn_dim
        cases.append(Case("swiglu", f"{part} {rows}x F{ffn}", lambda t, rows=rows, ffn=ffn: dict(
            gate_up=t.randn(rows, 2 * ffn)), lambda i: dict(out=swiglu(i["gate_up"])),
            lambda i: dict(out=ref.swiglu_ref(i["gate_up"])), lambda i: nbytes(i["gate_up"]) * 3 // 2))
    return cases


def _norm_linear_cases(d: Dims):
    """The frame's fused norm + GEMV launches: each layer's qkv and gate_up (+ SwiGLU), and the heads."""
    from .norm_linear import norm_linear

    cfg, rows = d.config, d.batch
    bb, dec, vocab = cfg.backbone, cfg.decoder, cfg.audio_vocab_size
    weights = []  # (label, dim, eps, weight shape, transposed, swiglu)
    for part, tc in _parts(d):
        weights += [(f"{part} qkv", tc.dim, tc.norm_eps, ((tc.n_heads + 2 * tc.n_kv_heads) * tc.head_dim, tc.dim),
                     False, False),
                    (f"{part} gate_up+swiglu", tc.dim, tc.norm_eps, (2 * tc.ffn_dim, tc.dim), False, True)]
    weights += [("backbone codebook0_head", bb.dim, bb.norm_eps, (vocab, bb.dim), False, False),
                ("backbone projection", bb.dim, bb.norm_eps, (dec.dim, bb.dim), False, False),
                ("decoder audio_head.T", dec.dim, dec.norm_eps, (dec.dim, vocab), True, False)]
    cases = []
    for label, dim, eps, shape, transposed, glu in weights:
        def make(t, dim=dim, shape=shape, transposed=transposed):
            w = t.randn(*shape, scale=dim ** -0.5)
            return dict(x=t.randn(rows, dim), norm=1 + 0.1 * t.randn(dim), w=w.T if transposed else w)

        reference = ref.rmsnorm_swiglu_ref if glu else ref.rmsnorm_linear_ref
        cols = (shape[1] if transposed else shape[0]) // (2 if glu else 1)
        cases.append(Case("norm_linear", f"{label} B{rows} D{dim}->{cols}", make,
                          lambda i, eps=eps, glu=glu: dict(out=norm_linear(i["x"], i["norm"], eps, i["w"], swiglu=glu)),
                          lambda i, eps=eps, r=reference: dict(out=r(i["x"], i["norm"], eps, i["w"])),
                          lambda i, cols=cols: nbytes(i["w"], i["x"], i["norm"]) + rows * cols * i["x"].element_size()))
    return cases


def _linear_add_cases(d: Dims):
    """The layers' output projections with the residual add: backbone wo and down, decoder down
    (the decoder's wo is fused into depth_attention)."""
    from .norm_linear import linear_add

    cfg, rows = d.config, d.batch
    bb, dec = cfg.backbone, cfg.decoder
    cases = []
    for label, dim, cols in (("backbone wo", bb.n_heads * bb.head_dim, bb.dim), ("backbone down", bb.ffn_dim, bb.dim),
                             ("decoder down", dec.ffn_dim, dec.dim)):
        def make(t, dim=dim, cols=cols):
            return dict(a=t.randn(rows, dim), w=t.randn(cols, dim, scale=dim ** -0.5), residual=t.randn(rows, cols))

        cases.append(Case("linear_add", f"{label} B{rows} {dim}->D{cols}", make,
                          lambda i: dict(residual=linear_add(i["a"], i["w"], i["residual"])),
                          lambda i: dict(residual=ref.linear_residual_ref(i["a"], i["w"], i["residual"])),
                          lambda i: nbytes(i["w"], i["a"], i["residual"], i["residual"]),
                          note="torch column: cuBLAS addmm_, what TritonOps runs by default",
                          baseline=lambda i: i["residual"].addmm_(i["a"], i["w"].t())))
    return cases


def _depth_attention_cases(d: Dims):
    from .depth_attention import depth_attention

    tc, rows, positions = d.config.decoder, d.batch, d.config.num_codebooks
    hq, hkv, hd, dim = tc.n_heads, tc.n_kv_heads, tc.head_dim, tc.dim
    pos = positions - 1  # the last position: every cached one is read

    def make(t):
        angle = torch.arange(positions, dtype=torch.float32, device=t.device)[:, None] * ref.rope_inv_freq(
            hd, tc.rope_base, device=t.device)[None, :]
        return dict(qkv=t.randn(rows, (hq + 2 * hkv) * hd), k_cache=t.randn(rows, hkv, positions, hd),
                    v_cache=t.randn(rows, hkv, positions, hd), pos=t.tensor([pos], torch.int64), cos=angle.cos(),
                    sin=angle.sin(), wo=t.randn(dim, hq * hd, scale=(hq * hd) ** -0.5),
                    residual=t.randn(rows, dim))

    def args(i):
        return (i["qkv"], hq, hkv, i["k_cache"], i["v_cache"], i["pos"], i["cos"], i["sin"], i["wo"], i["residual"])

    return [Case("depth_attention", f"decoder Hq{hq}/Hkv{hkv}/d{hd} P{positions} +wo D{dim} B{rows}", make,
                 lambda i: dict(residual=depth_attention(*args(i)), k_cache=i["k_cache"], v_cache=i["v_cache"]),
                 lambda i: dict(residual=ref.depth_attention_out_ref(*args(i)), k_cache=i["k_cache"],
                                v_cache=i["v_cache"]),
                 lambda i: nbytes(i["wo"], i["qkv"], i["k_cache"], i["v_cache"], i["residual"], i["residual"]))]


def _lane_settings(t, rows, vocab):
    """Per-lane sampling settings: greedy, top-1, top-50 and whole-vocabulary lanes in turn."""
    temperature = [0.0, 0.9, 0.9, 1.3][:rows] + [0.7] * max(0, rows - 4)
    topk = [50, 1, 50, vocab][:rows] + [50] * max(0, rows - 4)
    return dict(temperature=t.tensor(temperature, torch.float32), topk=t.tensor(topk, torch.int64),
                seed=t.ints(2**40, rows), counter=t.ints(2**20, rows))


def _sample_next_input_cases(d: Dims):
    from .sampling import sample_next_input

    cfg, rows = d.config, d.batch
    n, vocab, dec = cfg.num_codebooks, cfg.audio_vocab_size, cfg.decoder.dim
    c = n // 2

    def make(t):
        return dict(logits=t.randn(rows, vocab, scale=3.0), **_lane_settings(t, rows, vocab),
                    table=t.randn(n * vocab, dec), codes=t.full((rows, n), -1, dtype=torch.int64),
                    next_input=t.randn(rows, dec), codebook=t.tensor([c], torch.int64))

    def run(i):
        nxt = sample_next_input(i["logits"], i["temperature"], i["topk"], i["seed"], i["counter"], i["codebook"],
                                i["table"], i["codes"][:, c], i["next_input"])
        return dict(tokens=i["codes"][:, c], next_input=nxt)

    def reference(i):
        tokens = ref.sample_topk_ref(i["logits"], i["temperature"], i["topk"], i["seed"], i["counter"] + c)
        return dict(tokens=tokens, next_input=i["table"][tokens + c * vocab])

    return [Case("sample_next_input", f"B{rows} V{vocab} per-lane top-k -> D{dec}", make, run, reference,
                 lambda i: nbytes(i["logits"]) + 2 * nbytes(i["next_input"]))]


def _depth_step_cases(d: Dims):
    from .sampling import depth_step

    cfg, rows = d.config, d.batch
    n, vocab, dec = cfg.num_codebooks, cfg.audio_vocab_size, cfg.decoder.dim

    def make(t):
        return dict(h=t.randn(rows, dec), head=t.randn(dec, vocab, scale=dec ** -0.5), table=t.randn(n * vocab, dec),
                    codes=t.full((rows, n), -1, dtype=torch.int64), next_input=t.randn(rows, dec),
                    logits=t.randn(rows, vocab, dtype=torch.float32), seed=t.ints(2**40, rows),
                    counter=t.ints(2**20, rows))

    def run(i):
        depth_step(i["h"], i["head"], 1, i["table"], i["codes"], i["next_input"], i["seed"], i["counter"], 0.9, 50,
                   logits=i["logits"])
        return dict(tokens=i["codes"][:, 1], next_input=i["next_input"], logits=i["logits"])

    def reference(i):
        tokens, nxt, logits = ref.depth_step_ref(i["h"], i["head"], 1, i["table"], i["seed"], i["counter"], 0.9, 50)
        return dict(tokens=tokens, next_input=nxt, logits=logits)

    return [Case("depth_step", f"codebook1 B{rows} D{dec}->V{vocab} top50", make, run, reference,
                 lambda i: nbytes(i["head"], i["h"]) + 2 * nbytes(i["next_input"]))]


def _sample_topk_cases(d: Dims):
    from .sampling import sample_topk

    rows, vocab = d.batch, d.config.audio_vocab_size

    def make(t):
        return dict(logits=t.randn(rows, vocab, scale=3.0, dtype=torch.float32), seed=t.ints(2**40, rows),
                    counter=t.ints(2**20, rows))

    return [Case("sample_topk", f"B{rows} V{vocab} top50", make,
                 lambda i: dict(tokens=sample_topk(i["logits"], 0.9, 50, i["seed"], i["counter"])),
                 lambda i: dict(tokens=ref.sample_topk_ref(i["logits"], 0.9, 50, i["seed"], i["counter"])),
                 lambda i: nbytes(i["logits"]))]


def _lazy(module, name):
    """A launcher named without importing triton when this module is imported."""
    def launcher(*args, **kwargs):
        import importlib
        return getattr(importlib.import_module(f"misotts.kernels.{module}"), name)(*args, **kwargs)
    launcher.__qualname__ = launcher.__name__ = f"{module}.{name}"
    return launcher


SPECS = {s.name: s for s in (
    KernelSpec("rvq_embed", _lazy("embedding", "rvq_embed"), ref.rvq_embed_ref, "elementwise", _embed_cases),
    KernelSpec("rope_kv_write", _lazy("rope", "rope_kv_write"), ref.rope_kv_write_ref, "elementwise", _rope_cases),
    KernelSpec("paged_decode", _lazy("paged_attention", "paged_decode"), ref.paged_decode_ref, "attention",
               _decode_cases, report_dtypes=(BF16, FP32)),
    KernelSpec("paged_prefill", _lazy("paged_attention", "paged_prefill"), ref.paged_prefill_ref, "attention",
               _prefill_cases, batched=False, in_frame=False, report_dtypes=(BF16, FP32)),
    KernelSpec("rmsnorm", _lazy("rmsnorm", "rmsnorm"), ref.rmsnorm_ref, "elementwise", _rmsnorm_cases,
               batched=False, in_frame=False),
    KernelSpec("swiglu", _lazy("swiglu", "swiglu"), ref.swiglu_ref, "elementwise", _swiglu_cases, batched=False,
               in_frame=False),
    KernelSpec("norm_linear", _lazy("norm_linear", "norm_linear"), ref.rmsnorm_linear_ref, "gemv",
               _norm_linear_cases, report_dtypes=(BF16, FP32)),
    KernelSpec("linear_add", _lazy("norm_linear", "linear_add"), ref.linear_residual_ref, "gemv", _linear_add_cases,
               report_dtypes=(BF16, FP32)),
    KernelSpec("depth_attention", _lazy("depth_attention", "depth_attention"), ref.depth_attention_out_ref, "gemv",
               _depth_attention_cases),
    KernelSpec("sample_next_input", _lazy("sampling", "sample_next_input"), ref.sample_topk_ref, "elementwise",
               _sample_next_input_cases),
    KernelSpec("depth_step", _lazy("sampling", "depth_step"), ref.depth_step_ref, "gemv", _depth_step_cases,
               in_frame=False, report_dtypes=(BF16, FP32)),
    KernelSpec("sample_topk", _lazy("sampling", "sample_topk"), ref.sample_topk_ref, "elementwise",
               _sample_topk_cases, in_frame=False),
)}


def cases(config, batches, kernels=None, context: int = 1024, chunk: int = 512, page: int = 16):
    """[(spec, batch, case)] for a model config at each batch: the batched specs at every batch, the
    others (prefill shapes) once, with the first batch; `kernels`: names to keep (None: all)."""
    out = []
    for index, batch in enumerate(batches):
        dims = Dims(config, batch, context, chunk, page)
        for spec in SPECS.values():
            if (kernels is None or spec.name in kernels) and (spec.batched or index == 0):
                out += [(spec, batch, case) for case in spec.cases(dims)]
    return out
