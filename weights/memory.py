"""Will a model's weights fit the device?  Asked before anything is allocated, so that a model too
large is refused with both numbers instead of being found out by the kernel's OOM killer."""
from __future__ import annotations

import os

import torch

from misotts.runtime.config import ModelConfig

GIB = 2**30


def weight_bytes(config: ModelConfig, dtype: torch.dtype, qc=None) -> int:
    """The weights' bytes in `dtype`; with a QuantConfig `qc`, its linears' codes and fp32 scales."""
    if qc is None:
        return config.num_parameters() * dtype.itemsize
    from .quantize import quantized_bytes

    # From the config alone (nothing built, not even on the meta device).
    quantized, params = 0, 0
    for t, scheme in ((config.backbone, qc.backbone), (config.decoder, qc.decoder)):
        for m, k in layer_linear_shapes(t):
            quantized += t.n_layers * quantized_bytes(scheme, m, k, qc.group_size)
            params += t.n_layers * m * k
    return (config.num_parameters() - params) * dtype.itemsize + quantized


def layer_linear_shapes(t) -> list[tuple[int, int]]:
    """[out, in] of one layer's linears: wq, wk, wv, wo, w_gate, w_up, w_down."""
    q, kv = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    return [(q, t.dim), (kv, t.dim), (kv, t.dim), (t.dim, q), (t.ffn_dim, t.dim), (t.ffn_dim, t.dim),
            (t.dim, t.ffn_dim)]


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (CUDA: the driver's free memory; CPU: the
    kernel's MemAvailable), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config: ModelConfig, dtype: torch.dtype, device: torch.device, qc=None) -> None:
    """ValueError if the weights alone need more memory than `device` has free (with `qc`: as
    quantised); the advice names what would fit, quantised weights included."""
    need, have = weight_bytes(config, dtype, qc), available_bytes(device)
    if have is None or need <= have:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    advice = []
    if dtype.itemsize > 2:
        advice.append(f"a 2-byte dtype halves it (--dtype bf16 / dtype=torch.bfloat16: "
                      f"{weight_bytes(config, torch.bfloat16, qc) / GIB:.1f} GiB)")
    if qc is None or qc.weights != "int4":
        advice += quantized_advice(config, dtype, device, have, after=qc.weights if qc else None)
    if device.type == "cpu" and torch.cuda.is_available():
        advice.append("a GPU may have room (--device cuda / device='cuda')")
    advice.append("or pick a smaller model (--model / source=)")
    weights = f" with {qc.weights} weights" if qc else ""
    raise ValueError(f"{config.name} needs {need / GIB:.1f} GiB for its weights in {dtype_name}{weights} but {device} "
                     f"has {have / GIB:.1f} GiB free: " + "; ".join(advice))


def quantized_advice(config: ModelConfig, dtype: torch.dtype, device: torch.device, have: int,
                     after: str | None) -> list[str]:
    """The smallest quantised form the device runs that would fit, as advice (or nothing)."""
    from .quantize import QuantConfig

    # The CPU runs int8 only; a GPU int8 (or fp8: the same bytes) or int4 (smaller).
    schemes = ["int8"] if device.type == "cpu" else ["int8", "int4"]
    schemes = schemes[schemes.index(after) + 1:] if after in schemes else schemes
    for scheme in schemes:
        size = weight_bytes(config, dtype, QuantConfig.make(scheme, config))
        if size <= have:
            return [f"quantised weights fit (--weights {scheme} / weights={scheme!r}: {size / GIB:.1f} GiB)"]
    return []
