"""Which torch device a name means, refused in plain words when this machine does not have it;
which dtype a name means."""
from __future__ import annotations

import torch

# The dtype names the CLI and the Ray Serve settings accept.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def available_devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


def resolve_device(device=None) -> torch.device:
    """`device` (None, "cpu", "cuda", "cuda:1", a torch.device) as a torch.device this machine has.

    None picks CUDA when available.  An unknown name, CUDA on a machine without it, or a GPU
    index past the last is a ValueError that says what is available (torch's own errors name
    internals: "Cannot get CUDA generator without ATen_cuda library", a list of 20 device types)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r} (--device / device=): use cpu, cuda or cuda:N; "
                         f"available here: {available}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} (--device / device=) is not available: {why} "
                             f"(torch {torch.__version__}); available here: {available}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} (--device / device=) does not exist; available here: {available}")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(device)!r} (--device / device=) is not supported: use cpu or cuda; "
                         f"available here: {available}")
    return dev
