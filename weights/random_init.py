"""Seeded random weights for any config: full-size models for benchmarks, with no download."""
from __future__ import annotations

import torch

from misotts.runtime.config import ModelConfig
from misotts.runtime.model import CSMModel

from .load import default_dtype


def random_model(config: ModelConfig, seed: int = 0, device="cpu", dtype: torch.dtype | None = None) -> CSMModel:
    """normal(0, 0.02) weights, ones for norms; drawn in `dtype` on `device` tensor by tensor
    (never a full fp32 copy).  The same seed, device and dtype give the same weights."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = CSMModel(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():  # a fixed order, so the draws are reproducible
        w = torch.empty(t.shape, dtype=dtype, device=device)
        state[name] = w.fill_(1.0) if name.endswith("norm.weight") else w.normal_(0.0, 0.02, generator=gen)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
