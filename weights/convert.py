"""convert: any checkpoint we read -> our canonical format (sharded safetensors + config.json).

Tensors stream through one shard at a time; shards are written under temporary names and
renamed once their count (the "-of-N" in the names) is known.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .formats import INDEX_FILE, SINGLE_FILE
from .load import expected_shapes, quantized_dtypes, resolve_source, stored_quantization
from .quantize import QuantConfig, check_scheme, quantize_state

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "2GB", "500MB", "1.5GiB" (KB/MB/GB are powers of 10)."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"([\d.]+)\s*([KMG]I?B|B)?", str(size).strip().upper())
        if not m:
            raise ValueError(f"cannot read size {size!r}: use bytes or e.g. '2GB', '500MB', '1GiB'")
        n = int(float(m[1]) * _UNITS[m[2] or "B"])
    if n <= 0:
        raise ValueError(f"shard_size must be positive, got {size!r}")
    return n


def convert(src: str | Path, dst: str | Path, shard_size: int | str = "2GB", progress: bool = True,
            overwrite: bool = False, dtype: torch.dtype | None = None, weights: str | None = None) -> Path:
    """Write the checkpoint `src` (directory or hub id, any format we read) to `dst` in ours.

    One model.safetensors if it fits in shard_size, else model-0000i-of-0000N.safetensors and
    model.safetensors.index.json; config.json; tokenizer.json copied when src has one.  dtype
    casts every float tensor (None keeps the file's).  weights: "int8", "fp8" or "int4" stores
    the linears quantised (codes + "<name>_scale", the scheme in config.json's "quantization"),
    so that the checkpoint loads without quantising again.  Returns dst.
    """
    check_scheme(weights)
    src_dir, dst = resolve_source(src), Path(dst)
    limit = parse_size(shard_size)
    if dst.exists() and dst.resolve() == src_dir.resolve():
        raise ValueError(f"convert would overwrite its source {src_dir}: choose another dst")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} is not empty: pass --overwrite (overwrite=True) to write into it")
    ckpt = Checkpoint(src_dir)
    qc = stored_quantization(ckpt, weights) or (QuantConfig.make(weights, ckpt.config) if weights else None)
    expected = expected_shapes(ckpt.config, qc if ckpt.quantization else None)
    stored = quantized_dtypes(ckpt.config, qc) if ckpt.quantization else {}
    ckpt.check(expected, stored)
    dst.mkdir(parents=True, exist_ok=True)
    # A previous conversion's weights would mix with ours (the index is read before model.safetensors).
    for stale in [dst / SINGLE_FILE, dst / INDEX_FILE, *dst.glob("model-*.safetensors*")]:
        stale.unlink(missing_ok=True)

    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}

    def flush():
        tmp = dst / f"model-{len(written):05d}.safetensors.partial"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard.clear()

    total = shard_bytes = 0
    for name in tqdm(expected, desc=f"converting {src_dir.name}", unit="tensor",
                     disable=None if progress else True):  # None: shown on a terminal only
        t = ckpt.read(name)
        if name in stored:  # codes and scales of a quantised source, as they are
            tensors = {name: t}
        else:
            t = t if dtype is None else t.to(dtype)
            tensors = quantize_state(name, t, qc) if qc is not None else {name: t}
        for out_name, t in tensors.items():
            t = t.contiguous()
            if shard and shard_bytes + t.nbytes > limit:
                flush()
                shard_bytes = 0
            shard[out_name] = t
            shard_bytes += t.nbytes
            total += t.nbytes
    flush()

    n = len(written)
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.rename(dst / final)
        weight_map.update(dict.fromkeys(names, final))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config = ckpt.config.to_dict() | ({"quantization": qc.to_dict()} if qc else {})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if (src_dir / "tokenizer.json").is_file():
        shutil.copyfile(src_dir / "tokenizer.json", dst / "tokenizer.json")
    return dst
