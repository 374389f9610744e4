"""load_model: a checkpoint folder or hub id -> a ready CSMModel.

The model is built on the meta device and each tensor goes from the memory-mapped file straight
to its target dtype and device, so an 8B model never exists in fp32 (or twice) on the way.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from misotts.runtime.config import PRESETS, ModelConfig
from misotts.runtime.hub import HUB_ID
from misotts.runtime.model import CSMModel

from .checkpoint import Checkpoint
from .formats import weight_file
from .memory import check_fits


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


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of every tensor a model with this config holds (nothing allocated)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in CSMModel(config).state_dict().items()}


def load_model(source: str | Path, device="cpu", dtype: torch.dtype | None = None,
               progress: bool = True) -> tuple[CSMModel, ModelConfig, Path | None]:
    """Load a checkpoint in any format we read (ours, transformers CSM, Sesame's original).

    source: a checkpoint directory or a hub repo id ("sesame/csm-1b").  dtype: default float32
    on the CPU, bfloat16 on CUDA.  Returns (model in eval mode, its config, the folder the
    weights came from, where tokenizer.json is looked up).
    """
    checkpoint_dir = resolve_source(source)
    ckpt = Checkpoint(checkpoint_dir)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    expected = expected_shapes(ckpt.config)
    ckpt.check(expected)
    check_fits(ckpt.config, dtype, device)
    with torch.device("meta"):
        model = CSMModel(ckpt.config)
    state = {}
    total = sum(math.prod(s) for s in expected.values()) * dtype.itemsize
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {checkpoint_dir.name}",
              disable=None if progress else True) as bar:  # None: shown on a terminal only
        for name, shape in expected.items():
            state[name] = ckpt.read(name).to(device=device, dtype=dtype)
            bar.update(math.prod(shape) * dtype.itemsize)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False), ckpt.config, checkpoint_dir
