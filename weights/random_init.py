"""Seeded random weights for any config: full-size models for benchmarks, with no download."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from misotts.runtime.config import ModelConfig
from misotts.runtime.model import CSMModel  # noqa: F401 (the type returned)

from .load import default_dtype, expected_shapes, meta_model
from .memory import check_fits, weight_bytes
from .quantize import QuantConfig, check_scheme, quantize_state


def random_model(config: ModelConfig, seed: int = 0, device="cpu", dtype: torch.dtype | None = None,
                 progress: bool = False, weights: str | None = None) -> CSMModel:
    """normal(0, 0.02) weights, ones for norms; drawn in `dtype` on `device` tensor by tensor
    (never a full fp32 copy).  The same seed, device and dtype give the same weights; weights=
    "int8" / "fp8" / "int4" quantises each linear as it is drawn (the same draws: the quantised
    model is the float one, quantised).  A model that does not fit the device's free memory is
    refused first.  progress: a bar on a terminal."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    check_scheme(weights)
    qc = QuantConfig.make(weights, config) if weights else None
    check_fits(config, dtype, device, qc)
    shapes = expected_shapes(config)
    model = meta_model(config, qc)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    with tqdm(total=weight_bytes(config, dtype, qc), unit="B", unit_scale=True, desc=f"random weights for {config.name}",
              disable=None if progress else True) as bar:  # None: shown on a terminal only
        for name, shape in shapes.items():  # a fixed order, so the draws are reproducible
            w = torch.empty(shape, dtype=dtype, device=device)
            w = w.fill_(1.0) if name.endswith("norm.weight") else w.normal_(0.0, 0.02, generator=gen)
            tensors = quantize_state(name, w, qc) if qc else {name: w}
            state.update(tensors)
            bar.update(sum(t.nbytes for t in tensors.values()))
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
