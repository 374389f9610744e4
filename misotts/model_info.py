"""What `misotts info` prints: a model described from its config alone, so that describing
csm-1b does not build its 7.8 GB of weights (nor miso-8b's 32 GB)."""
from __future__ import annotations

import torch

from misotts.runtime.config import PRESETS
from misotts.runtime.devices import resolve_device
from misotts.runtime.hub import DEFAULT_CODEC, PRESET_HUB_IDS
from misotts.weights.checkpoint import bundled_codec, read_quantization
from misotts.weights.quantize import QuantConfig, check_scheme
from misotts.weights.formats import detect_format, read_config
from misotts.weights.load import default_dtype, resolve_source
from misotts.weights.memory import available_bytes, weight_bytes


def describe(source: str, device=None, dtype: torch.dtype | None = None, random_init: bool = False,
             codec: str | None = None, weights: str | None = None) -> dict:
    """The keys of `TTS.info()` that a config decides, plus the device's free memory ("free_bytes");
    weight_bytes as quantised with `weights` (or as a quantised checkpoint is stored)."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    name = str(source)
    check_scheme(weights)
    untrained = name in PRESETS and (random_init or name == "tiny")
    if untrained:
        config, label = PRESETS[name], f"{name} (random weights)"
        codec = codec or "untrained Mimi (random weights)"
    elif name in PRESETS:  # a preset's shape is known here: no hub lookup (info works offline)
        config, label = PRESETS[name], name
        codec = codec or f"{PRESET_HUB_IDS.get(name, name)}'s bundled Mimi, else {DEFAULT_CODEC}"
    else:
        path = resolve_source(PRESET_HUB_IDS.get(name, name))
        fmt = detect_format(path)
        config, label = read_config(path, fmt), name
        codec = codec or (str(path) + " (its bundled Mimi)" if bundled_codec(path) else DEFAULT_CODEC)
        stored = read_quantization(path, fmt, config)
        weights = stored.weights if stored else weights
    qc = QuantConfig.make(weights, config) if weights else None
    return {"source": label, "config": config.to_dict(), "parameters": config.num_parameters(),
            "weight_bytes": weight_bytes(config, dtype, qc), "weights": weights, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "untrained": untrained, "codec": codec,
            "free_bytes": available_bytes(device)}
