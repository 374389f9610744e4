"""Weight-only quantisation: which linears are stored in int8, fp8 or int4, how, and the module
that holds them.

Quantised: the linear layers of the backbone and of the depth decoder (attention wq, wk, wv, wo;
MLP w_gate, w_up, w_down): they are ~97% of the bytes a frame reads.  Kept in the model dtype:
the embeddings (a frame gathers a few rows of them, so their size costs memory, not time), the
norms, and the heads (codebook-0 head, projection, audio heads: their logits feed the sampler
directly, and they are 1-4% of a frame's bytes).

Schemes (the stored forms are defined in `misotts.kernels.reference`, beside their reference math):
- "int8": symmetric per-output-channel scales, codes -127..127;
- "fp8": float8_e4m3fn with a per-output-channel scale mapping each row's largest |w| to 448;
- "int4": symmetric codes -7..7 with a scale per group of `group_size` input columns, for the
  backbone; the depth decoder is int8 (it runs 31 times a frame and decides codebooks 1..31, so it
  stays at 8 bits until int4 is measured safe there).

Quantising reads one tensor at a time in fp32 (on the device it goes to), so an 8B model is
never whole in fp32.  A quantised checkpoint (`convert(..., weights=...)`) stores each linear's
codes under its own name and its scales under ``<name>_scale``, and names the scheme in
config.json (`QuantConfig.to_dict`, key "quantization"), so it loads without re-quantising.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from misotts.kernels import reference as ref

SCHEMES = ("int8", "fp8", "int4")
INT4_GROUP = 128  # input columns per int4 scale (smaller where a model's widths are not multiples)
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}
# ATen's CPU int8 GEMM reads K in blocks of 16 (other widths crash it): narrower ones take the reference.
INT8_CPU_K = 16
QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
# Canonical names of the quantised linears' weights; the scales sit beside them as "<name>_scale".
LINEAR = re.compile(r"(backbone|decoder)\.layers\.\d+\.(attn\.w[qkvo]|mlp\.w_(gate|up|down))\.weight")
SCALE_SUFFIX = "_scale"


def check_scheme(weights) -> None:
    if weights is not None and weights not in SCHEMES:
        raise ValueError(f"unknown weights {weights!r} (--weights / weights=): expected one of {', '.join(SCHEMES)}")


@dataclass(frozen=True)
class QuantConfig:
    """Which scheme each transformer's linears use: `weights` is what was asked for."""

    weights: str
    backbone: str
    decoder: str
    group_size: int = INT4_GROUP

    @classmethod
    def make(cls, weights: str, config) -> "QuantConfig":
        """The plan for `weights` on a model of `config` (int4: backbone int4, decoder int8)."""
        check_scheme(weights)
        if weights != "int4":
            return cls(weights, weights, weights, 0)
        return cls(weights, "int4", "int8", int4_group_size(config))

    def scheme_for(self, name: str) -> str | None:
        """The scheme of canonical tensor `name`, or None when it stays in the model dtype."""
        m = LINEAR.fullmatch(name)
        return None if m is None else getattr(self, m[1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where: str) -> "QuantConfig":
        try:
            q = cls(**d)
        except TypeError as e:
            raise ValueError(f"{where}: 'quantization' must be an object with weights, backbone, decoder and "
                             f"group_size: {e}") from None
        for scheme in (q.weights, q.backbone, q.decoder):
            if scheme not in SCHEMES:
                raise ValueError(f"{where}: unknown quantisation scheme {scheme!r} (known: {', '.join(SCHEMES)})")
        if "int4" in (q.backbone, q.decoder) and (not isinstance(q.group_size, int) or q.group_size < 2
                                                  or q.group_size % 2):
            raise ValueError(f"{where}: int4 needs an even group_size >= 2, got {q.group_size!r}")
        return q


def int4_group_size(config) -> int:
    """The largest of 128, 64, 32 dividing every input width of the backbone's linears."""
    t = config.backbone
    widths = (t.dim, t.n_heads * t.head_dim, t.ffn_dim)
    for g in (INT4_GROUP, 64, 32):
        if all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"int4 needs the backbone's widths {widths} to be multiples of 32")


# ---- quantising one tensor ----------------------------------------------------------------------
@torch.no_grad()
def quantize_tensor(w: torch.Tensor, scheme: str, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [M, K] (any float dtype) -> (data, fp32 scale) in `scheme`'s stored form
    (kernels/reference.py), on w's device, with fp32 math (one tensor at a time)."""
    w = w.float()
    m, k = w.shape
    if scheme == "int4":
        if k % group_size:
            raise ValueError(f"int4: a weight of {k} input columns is not a multiple of group_size {group_size}")
        w = w.view(m, k // group_size, group_size)
    scale = w.abs().amax(-1) / QMAX[scheme]
    # An all-zero row (or group) keeps scale 0 and codes 0: it dequantises to exactly zero.
    x = torch.where(scale[..., None] > 0, w / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None], 0.0)
    if scheme == "fp8":
        return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale
    q = x.round().clamp(-QMAX[scheme], QMAX[scheme])
    if scheme == "int8":
        return q.to(torch.int8), scale
    if scheme == "int4":
        codes = (q.view(m, k) + 8).to(torch.uint8)
        return codes[:, 0::2] | (codes[:, 1::2] << 4), scale
    raise ValueError(f"unknown quantisation scheme {scheme!r}")


def stored_shapes(scheme: str, m: int, k: int, group_size: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(data shape, scale shape) of a [M, K] weight in `scheme`."""
    if scheme == "int4":
        return (m, k // 2), (m, k // group_size)
    return (m, k), (m,)


def quantized_bytes(scheme: str, m: int, k: int, group_size: int = 0) -> int:
    """Bytes of a [M, K] weight stored in `scheme` (codes and fp32 scales)."""
    data, scale = stored_shapes(scheme, m, k, group_size)
    return data[0] * data[1] * STORAGE[scheme].itemsize + 4 * scale[0] * (scale[1] if len(scale) > 1 else 1)


# ---- the module -----------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A bias-free linear whose weight is stored quantised: buffers ``weight`` (the codes) and
    ``weight_scale`` (fp32).  It is also the engine's weight object: the op sets call it on the
    rows they have normed (`engine/ops.py`), so the plain model and the engine share its math."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 0, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.group_size = in_features, out_features, scheme, group_size
        data, scale = stored_shapes(scheme, out_features, in_features, group_size)
        self.register_buffer("weight", torch.empty(data, dtype=STORAGE[scheme], device=device))
        self.register_buffer("weight_scale", torch.empty(scale, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}"

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return ref.dequantize_ref(self.weight, self.weight_scale, self.scheme, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8" and x.device.type == "cpu" and self.in_features % INT8_CPU_K == 0:
            return int8_linear_cpu(x, self.weight, self.weight_scale)
        # Elsewhere (until the dequantising kernels land): the reference, a dequantised copy per call.
        return ref.quant_linear_ref(x, self.weight, self.weight_scale, self.scheme)


# An opaque op to torch.compile: Inductor's own lowering of _weight_int8pack_mm fails on a fused
# (unrealised) input, and the engine's CPU depth step may be compiled (EngineConfig.compile).
@torch.library.custom_op("misotts::int8_linear_cpu", mutates_args=())
def int8_linear_cpu(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (data * scale).T with ATen's int8 weight-only GEMM.  Its fast (vectorised)
    path takes bf16 activations, so x is rounded to bf16 and the fp32-accumulated result rounded
    to bf16, then cast back to x's dtype: an fp32 model's int8 linears see bf16 activations (the
    accuracy this costs is measured with the rest: docs/kernels.md)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int8pack_mm(rows, data, scale.to(torch.bfloat16))
    return out.to(x.dtype).view(*x.shape[:-1], data.shape[0])


@int8_linear_cpu.register_fake
def _(x, data, scale):
    return x.new_empty(*x.shape[:-1], data.shape[0])


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """F.linear for a weight tensor; the quantised module's own math for a QuantLinear."""
    return weight(x) if isinstance(weight, QuantLinear) else torch.nn.functional.linear(x, weight)


@torch.no_grad()
def fuse(linears: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear for several of the same input and scheme, rows stacked; the modules'
    buffers become views of it, so the fused copy is the only copy (as engine's `_fuse`)."""
    first = linears[0]
    if any(l.scheme != first.scheme or l.group_size != first.group_size for l in linears):
        raise ValueError("cannot fuse linears of different quantisation schemes")
    fused = QuantLinear(first.in_features, sum(l.out_features for l in linears), first.scheme, first.group_size,
                        device="meta")
    fused.weight = torch.cat([l.weight for l in linears])
    fused.weight_scale = torch.cat([l.weight_scale for l in linears])
    start = 0
    for l in linears:
        rows = l.out_features
        l.weight, l.weight_scale = fused.weight[start:start + rows], fused.weight_scale[start:start + rows]
        start += rows
    return fused


# ---- a model's quantised linears ------------------------------------------------------------------
def quantize_modules(model: nn.Module, qc: QuantConfig) -> nn.Module:
    """Swap the linears `qc` quantises for empty QuantLinears (on the meta device: `model` is
    being built to be loaded with ``load_state_dict(assign=True)``); marks the model with `qc`."""
    for name, module, scheme, group in _quantised_linears(model, qc):
        _swap(model, name, QuantLinear(module.in_features, module.out_features, scheme, group, device="meta"))
    model.quantization = qc
    return model


def _quantised_linears(model: nn.Module, qc: QuantConfig):
    """(name, linear, scheme, group size) of each linear of `model` that `qc` quantises."""
    for name, module in list(model.named_modules()):
        scheme = qc.scheme_for(f"{name}.weight")
        if scheme is not None:
            yield name, module, scheme, qc.group_size if scheme == "int4" else 0


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


@torch.no_grad()
def quantize_model(model: nn.Module, weights: str) -> nn.Module:
    """Quantise a loaded float model's linears in place, one at a time (each float weight is
    dropped as its codes are made): for models built in memory; `load_model(weights=...)` and
    `random_model(weights=...)` quantise as they load instead."""
    qc = QuantConfig.make(weights, model.config)
    for name, module, scheme, group in _quantised_linears(model, qc):
        q = QuantLinear(module.in_features, module.out_features, scheme, group, device="meta")
        q.weight, q.weight_scale = quantize_tensor(module.weight, scheme, group)
        _swap(model, name, q)
    model.quantization = qc
    return model


def quantization(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig a model was loaded with, or None for a model in one float dtype."""
    return getattr(model, "quantization", None)


def model_weights(model: nn.Module) -> str | None:
    """The scheme a model's weights were quantised with ("int8", "fp8", "int4"), or None."""
    qc = quantization(model)
    return qc.weights if qc else None


def quantize_state(name: str, w: torch.Tensor, qc: QuantConfig) -> dict[str, torch.Tensor]:
    """{name: w} for a tensor `qc` keeps, {name: codes, name_scale: scales} for one it quantises."""
    scheme = qc.scheme_for(name)
    if scheme is None:
        return {name: w}
    data, scale = quantize_tensor(w, scheme, qc.group_size if scheme == "int4" else 0)
    return {name: data, name + SCALE_SUFFIX: scale}


def check_device(weights: str | None, device: torch.device) -> None:
    """Refuse a scheme the device has no path for, before anything loads."""
    if weights is None:
        return
    check_scheme(weights)
    if device.type == "cpu" and weights != "int8":
        raise ValueError(f"--weights {weights} / weights={weights!r} has no CPU kernel here (dequantising every "
                         f"weight per use would be slower than float32): on the CPU use int8, whose GEMM halves "
                         f"the bytes of bf16 and quarters those of float32")
    if device.type == "cuda" and weights == "fp8":
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 9):
            raise ValueError(f"--weights fp8 / weights='fp8' needs a GPU with float8 e4m3 (compute capability 8.9+: "
                             f"Ada, Hopper); {device} is {cc[0]}.{cc[1]}: use int8 (the same bytes) or int4")
