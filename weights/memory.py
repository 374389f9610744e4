"""Will a model's weights fit the device?  Asked before anything is allocated, so that a model too
large is refused with both numbers instead of being found out by the kernel's OOM killer."""
from __future__ import annotations

import os

import torch

from misotts.runtime.config import ModelConfig

GIB = 2**30


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    return config.num_parameters() * dtype.itemsize


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


def check_fits(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    """ValueError if the weights alone need more memory than `device` has free."""
    need, have = weight_bytes(config, dtype), available_bytes(device)
    if have is None or need <= have:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    advice = []
    if dtype.itemsize > 2:
        advice.append(f"a 2-byte dtype halves it (--dtype bf16 / dtype=torch.bfloat16: "
                      f"{need // dtype.itemsize * 2 / GIB:.1f} GiB)")
    if device.type == "cpu" and torch.cuda.is_available():
        advice.append("a GPU may have room (--device cuda / device='cuda')")
    advice.append("or pick a smaller model (--model / source=)")
    raise ValueError(f"{config.name} needs {need / GIB:.1f} GiB for its weights in {dtype_name} but {device} has "
                     f"{have / GIB:.1f} GiB free: " + "; ".join(advice))
