"""load_model: a checkpoint folder or hub id -> a ready CSMModel.

The model is built on the meta device and each tensor goes from the memory-mapped file straight
to its target dtype and device, so an 8B model never exists in fp32 (or twice) on the way.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from misotts.runtime.config import PRESETS, ModelConfig
from misotts.runtime.hub import HUB_ID
from misotts.runtime.model import CSMModel

from .checkpoint import Checkpoint, read_quantization
from .formats import detect_format, weight_file
from .memory import check_fits, weight_bytes
from .quantize import QuantConfig, QuantLinear, check_scheme, quantize_modules, quantize_state


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_source(source: str | Path) -> Path:
    """A local checkpoint directory, or a hub repo id downloaded (or found in the hub cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file: pass the checkpoint directory that holds it (--model DIR / source=DIR)")
    if not HUB_ID.fullmatch(str(source)):
        raise FileNotFoundError(not_found_message(str(source)))
    return download(str(source))


def not_found_message(name: str) -> str:
    """What a model name that is neither a preset, a folder nor a hub id may have meant."""
    presets = ", ".join(PRESETS)
    close = difflib.get_close_matches(name.lower(), PRESETS, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"checkpoint directory not found: {name} (--model / source=).{hint} A model is a preset ({presets}), "
            f"a checkpoint directory, or a Hugging Face hub id (owner/name)")


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    from misotts.runtime.hub import check_reachable

    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):  # not cached: the hub is needed
        check_reachable(f"{repo_id!r} is not a local directory nor in the hub cache",
                        f"Pass a local checkpoint directory instead (--model DIR / source=DIR), downloaded where "
                        f"the hub is reachable, e.g. `hf download {repo_id} --local-dir DIR`")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if weight_file(path) is None:  # Sesame's first release: ckpt.pt only
            path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.pt"]))
    except (OSError, HFValidationError) as e:  # offline, unreachable, not found, gated: all OSErrors
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Pass a local checkpoint directory instead (--model DIR / source=DIR), "
            f"downloaded where the hub is reachable, e.g. `hf download {repo_id} --local-dir DIR` (a gated "
            f"repo needs its licence accepted on its hub page and `hf auth login` first)"
        ) from e
    return path


def expected_shapes(config: ModelConfig, qc: QuantConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of every tensor a model with this config holds (nothing allocated);
    with `qc`, its quantised linears' codes and scales instead of their float weights."""
    return {name: tuple(t.shape) for name, t in meta_model(config, qc).state_dict().items()}


def quantized_dtypes(config: ModelConfig, qc: QuantConfig) -> dict[str, torch.dtype]:
    """Our name -> dtype of every tensor that `qc` stores quantised (codes and their scales)."""
    model = meta_model(config, qc)
    return {f"{name}.{buffer}": t.dtype for name, m in model.named_modules() if isinstance(m, QuantLinear)
            for buffer, t in m.named_buffers()}


def meta_model(config: ModelConfig, qc: QuantConfig | None = None) -> CSMModel:
    """The model's modules with no storage (meta device), its linears swapped as `qc` says."""
    with torch.device("meta"):
        model = CSMModel(config)
    return quantize_modules(model, qc) if qc else model


def load_model(source: str | Path, device="cpu", dtype: torch.dtype | None = None,
               progress: bool = True, weights: str | None = None) -> tuple[CSMModel, ModelConfig, Path | None]:
    """Load a checkpoint in any format we read (ours, transformers CSM, Sesame's original).

    source: a checkpoint directory or a hub repo id ("sesame/csm-1b").  dtype: default float32
    on the CPU, bfloat16 on CUDA.  weights: "int8", "fp8" or "int4" quantises the linears as
    they load (weights/quantize.py; one tensor at a time); a quantised checkpoint loads as it is
    stored.  Returns (model in eval mode, its config, the folder the weights came from, where
    tokenizer.json is looked up).
    """
    check_scheme(weights)
    checkpoint_dir = resolve_source(source)
    ckpt = Checkpoint(checkpoint_dir)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    qc = stored_quantization(ckpt, weights) or (QuantConfig.make(weights, ckpt.config) if weights else None)
    expected = expected_shapes(ckpt.config, qc if ckpt.quantization else None)
    stored = quantized_dtypes(ckpt.config, qc) if ckpt.quantization else {}
    ckpt.check(expected, stored)
    check_fits(ckpt.config, dtype, device, qc)
    model = meta_model(ckpt.config, qc)
    state = {}
    with tqdm(total=weight_bytes(ckpt.config, dtype, qc), unit="B", unit_scale=True,
              desc=f"loading {checkpoint_dir.name}", disable=None if progress else True) as bar:  # None: a terminal only
        for name in expected:
            t = ckpt.read(name)
            if name in stored:  # a quantised checkpoint's codes and fp32 scales, as they are
                tensors = {name: t.to(device)}
            elif qc is not None and qc.scheme_for(name):  # fp32 math on one tensor, on the device
                tensors = quantize_state(name, t.to(device), qc)
            else:
                tensors = {name: t.to(device=device, dtype=dtype)}
            state.update(tensors)
            bar.update(sum(v.nbytes for v in tensors.values()))
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False), ckpt.config, checkpoint_dir


def stored_scheme(source) -> str | None:
    """The scheme a local quantised checkpoint folder is stored in (None: not one, or not local)."""
    path = Path(str(source)).expanduser()
    if not path.is_dir():
        return None
    fmt = detect_format(path)
    qc = read_quantization(path, fmt, None)
    return qc.weights if qc else None


def stored_quantization(ckpt: Checkpoint, weights: str | None) -> QuantConfig | None:
    """A quantised checkpoint's QuantConfig; refused when another scheme is asked for."""
    stored = ckpt.quantization
    if stored is not None and weights is not None and weights != stored.weights:
        raise ValueError(f"{ckpt.dir} is stored quantised as {stored.weights}: it loads as {stored.weights} only "
                         f"(--weights {stored.weights}, or none); for {weights}, convert the original checkpoint")
    return stored
