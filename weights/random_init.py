"""Seeded random weights for any config: full-size models for benchmarks, with no download."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from misotts.runtime.config import ModelConfig
from misotts.runtime.model import CSMModel

from .load import default_dtype
from .memory import check_fits, weight_bytes


def random_model(config: ModelConfig, seed: int = 0, device="cpu", dtype: torch.dtype | None = None,
                 progress: bool = False) -> CSMModel:
    """normal(0, 0.02) weights, ones for norms; drawn in `dtype` on `device` tensor by tensor
    (never a full fp32 copy).  The same seed, device and dtype give the same weights.  A model
    that does not fit the device's free memory is refused first.  progress: a bar on a terminal."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    check_fits(config, dtype, device)
    with torch.device("meta"):
        model = CSMModel(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    shapes = model.state_dict()
    with tqdm(total=weight_bytes(config, dtype), unit="B", unit_scale=True, desc=f"random weights for {config.name}",
              disable=None if progress else True) as bar:  # None: shown on a terminal only
        for name, t in shapes.items():  # a fixed order, so the draws are reproducible
            w = torch.empty(t.shape, dtype=dtype, device=device)
            state[name] = w.fill_(1.0) if name.endswith("norm.weight") else w.normal_(0.0, 0.02, generator=gen)
            bar.update(w.nbytes)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
