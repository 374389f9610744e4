"""Argument checks shared by the launchers, and the one place kernels are launched.

`launch` is a seam: the ahead-of-time report (`misotts.kernels.report`) calls the real
launchers on `meta` tensors and records what they would launch instead of running it.
"""
import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)

_recorder = None  # a list while the report is recording, else None


def launch(kernel, grid, *args, **meta):
    if _recorder is not None:
        _recorder.append((kernel, grid, args, meta))
        return
    kernel[grid](*args, **meta)


def check(name, t, *, shape=None, dtypes=None, last_contiguous=False, contiguous=False):
    """Raise ValueError unless `t` is a tensor of `shape` (None = any size) and one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if last_contiguous and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")
    return t


def check_same_device(**tensors):
    """All tensors on one device; CPU tensors only under TRITON_INTERPRET=1 (meta is for the report)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"all tensors must be on one device: {name} is on {device}, others on {first}")
    if first.type == "cpu" and not triton.knobs.runtime.interpret:
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (set before importing triton); "
                         "for a CPU path call the torch functions in misotts.kernels.reference")
    return first


def next_pow2(n):
    return triton.next_power_of_2(max(int(n), 1))
