"""A checkpoint folder, read one tensor at a time under our canonical names.

`Checkpoint(path)` finds the format and config, opens the weight files (memory-mapped: nothing
is read until asked), maps every tensor name to ours, and `check` compares the lot with the
shapes a model needs, so that a bad checkpoint fails before any weight is copied, with an
error that names the tensor and the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from misotts.runtime.config import ModelConfig

from .formats import (INDEX_FILE, NAME_MAPS, TORCH_FILE, detect_format, interleaved_to_halves, read_config,
                      read_config_json, rope_heads, weight_file)


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt")
            self._keys = list(self._f.keys())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: {e}. The file is truncated or corrupt; "
                             "download or convert it again") from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(name).get_shape())

    def is_float(self, name: str) -> bool:
        return self._f.get_slice(name).get_dtype().startswith(("F", "BF"))  # F16, BF16, F32, F8_E4M3, ...

    def dtype_name(self, name: str) -> str:
        return self._f.get_slice(name).get_dtype()

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {name!r} from {self.path}: {e}") from None


class TorchFile:
    """Sesame's ckpt.pt: a flat state dict, memory-mapped, loaded without unpickling code."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
            raise ValueError(f"cannot read {path}: {e}. The file is truncated or corrupt; "
                             "download it again") from None
        if not isinstance(self._sd, dict) or not all(isinstance(v, torch.Tensor) for v in self._sd.values()):
            raise ValueError(f"{path} is not a flat state dict of tensors")

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)

    def is_float(self, name: str) -> bool:
        return self._sd[name].is_floating_point()

    def dtype_name(self, name: str) -> str:
        return str(self._sd[name].dtype).removeprefix("torch.")

    def read(self, name: str) -> torch.Tensor:
        return self._sd[name]


def open_weight_files(path: Path) -> dict[str, SafetensorsFile | TorchFile]:
    """Tensor name -> the opened file that holds it (shards are opened once each)."""
    file = weight_file(path)
    if file == TORCH_FILE:
        f = TorchFile(path / file)
        return dict.fromkeys(f.keys(), f)
    if file != INDEX_FILE:
        f = SafetensorsFile(path / file)
        return dict.fromkeys(f.keys(), f)
    index_path = path / INDEX_FILE
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path} is not a safetensors index (no valid weight_map): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: weight_map must map tensor names to shard file names")
    for shard in sorted(set(weight_map.values())):
        # Judged on the name, not on the resolved path: the hub cache's files are symlinks into a
        # blobs/ folder outside the snapshot, and they are fine; "../x" or "/x" are not.
        if os.path.isabs(shard) or os.path.normpath(shard).split(os.sep)[0] == "..":
            raise ValueError(f"{index_path} names shard {shard!r}, outside the checkpoint folder: refused "
                             "(shards must be files inside the folder)")
        if not (path / shard).is_file():
            raise FileNotFoundError(f"shard {shard} named by {index_path} is missing")
    shards = {shard: SafetensorsFile(path / shard) for shard in sorted(set(weight_map.values()))}
    held = {shard: set(f.keys()) for shard, f in shards.items()}
    for name, shard in weight_map.items():
        if name not in held[shard]:
            raise ValueError(f"{index_path} puts tensor {name!r} in {shard}, which does not hold it")
    return {name: shards[shard] for name, shard in weight_map.items()}


def bundled_codec(path: str | Path) -> dict:
    """The Mimi tensors a transformers CSM checkpoint folder bundles (``codec_model.*``), by
    transformers' MimiModel names, each as a function that reads it; {} when it has none."""
    path = Path(path)
    if weight_file(path) in (None, TORCH_FILE):
        return {}
    prefix = "codec_model."
    return {name[len(prefix):]: (lambda f=f, name=name: f.read(name))
            for name, f in open_weight_files(path).items() if name.startswith(prefix)}


class Checkpoint:
    """A checkpoint folder: format, config, and its tensors by canonical name."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.format = detect_format(self.dir)
        self.names = NAME_MAPS[self.format]
        self.config: ModelConfig = read_config(self.dir, self.format)
        self.quantization = read_quantization(self.dir, self.format, self.config)
        files = open_weight_files(self.dir)
        self.sources: dict[str, tuple[str, SafetensorsFile | TorchFile]] = {}  # ours -> (file's name, file)
        self.unknown: list[str] = []  # the file's names that mean nothing to us
        for name, f in files.items():
            if name in self.names.fallbacks or self.names.is_ignored(name):
                continue
            ours = self.names.to_canonical(name)
            if ours is None:
                self.unknown.append(f"{name!r} in {f.path.name}")
            else:
                self.sources[ours] = (name, f)
        for name, ours in self.names.fallbacks.items():
            if name in files and ours not in self.sources:
                self.sources[ours] = (name, files[name])

    def _where(self, ours: str) -> str:
        name, f = self.sources[ours]
        return f"{name!r} in {f.path.name}"

    def check(self, expected: dict[str, tuple[int, ...]], stored: dict[str, torch.dtype] | None = None) -> None:
        """Raise if the tensors are not exactly `expected` (our name -> shape).  stored: the
        quantised tensors' exact dtypes (a quantised checkpoint); every other tensor is a float."""
        stored = stored or {}
        where = f"{self.dir} ({self.format} format, config {self.config.name!r})"
        missing = [self.names.from_canonical(n) for n in expected if n not in self.sources]
        if missing:
            raise ValueError(f"{where} lacks {len(missing)} tensor(s) the config needs: {_few(missing)}")
        extra = self.unknown + [self._where(n) for n in self.sources if n not in expected]
        if extra:
            raise ValueError(f"{where} has {len(extra)} tensor(s) the model does not: {_few(extra)}")
        wrong = [f"{self._where(n)} has shape {self.shape(n)}, expected {tuple(want)}"
                 for n, want in expected.items() if self.shape(n) != tuple(want)]
        if wrong:
            raise ValueError(f"{where}: {len(wrong)} tensor(s) do not fit the config: {_few(wrong, sep='; ')}")
        # Every weight is a float: integers would be cast to nonsense without a word.
        not_float = [f"{self._where(n)} is {self._file(n).dtype_name(self.sources[n][0])}" for n in expected
                     if n not in stored and not self._file(n).is_float(self.sources[n][0])]
        if not_float:
            raise ValueError(f"{where}: {len(not_float)} tensor(s) are not floating point: {_few(not_float, sep='; ')}")
        wrong = [f"{self._where(n)} is {self._file(n).dtype_name(self.sources[n][0])}, expected {want}"
                 for n, want in stored.items() if self._file(n).dtype_name(self.sources[n][0]) not in _names(want)]
        if wrong:
            raise ValueError(f"{where}: {len(wrong)} quantised tensor(s) have the wrong dtype for "
                             f"{self.quantization.weights if self.quantization else 'the scheme'}: {_few(wrong, sep='; ')}")

    def _file(self, ours: str):
        return self.sources[ours][1]

    def shape(self, ours: str) -> tuple[int, ...]:
        name, f = self.sources[ours]
        return f.shape(name)

    def read(self, ours: str) -> torch.Tensor:
        """One tensor in our layout (still on the CPU, in the file's dtype)."""
        name, f = self.sources[ours]
        t = f.read(name)
        heads = rope_heads(ours, self.config) if self.format == "sesame" else None
        return t if heads is None else interleaved_to_halves(t, heads)


def read_quantization(path: Path, fmt: str, config: ModelConfig):
    """The QuantConfig named by a quantised checkpoint's config.json (ours only), else None."""
    from .quantize import QuantConfig

    d = read_config_json(path) if fmt == "misotts" else None
    if not d or d.get("quantization") is None:
        return None
    return QuantConfig.from_dict(d["quantization"], str(path / "config.json"))


# A dtype as safetensors names it, and as torch does (ckpt.pt).
_SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}


def _names(dtype: torch.dtype) -> tuple[str, str]:
    return _SAFETENSORS_DTYPES.get(dtype, ""), str(dtype).removeprefix("torch.")


def _few(items: list[str], n: int = 8, sep: str = ", ") -> str:
    return sep.join(items[:n]) + (f"{sep}... ({len(items) - n} more)" if len(items) > n else "")
