"""Registered voices: a reference clip encoded once to Mimi codes, stored on disk beside its
transcript.  A request with the voice gets it as the first context turn, so the engine's prefix
cache holds its KV after the first use."""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from misotts.runtime.prompt import Segment

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Voice:
    name: str
    speaker: int
    transcript: str
    frames: int
    created: float
    codes: torch.Tensor = None

    def segment(self) -> Segment:
        return Segment(self.speaker, self.transcript, codes=self.codes)

    def info(self) -> dict:
        d = asdict(self)
        d.pop("codes")
        return {"id": self.name, "object": "voice", **d, "duration_s": self.frames * 0.08}


class VoiceStore:
    """<root>/<name>.json (metadata) and <name>.safetensors (codes), each written atomically
    (a temporary file renamed into place: a crash leaves the old voice or the new, never half)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cache: dict[str, Voice] = {}

    def list(self) -> list[Voice]:
        return [v for p in sorted(self.root.glob("*.json")) if (v := self.get(p.stem)) is not None]

    def get(self, name: str) -> Voice | None:
        if not NAME.match(name):
            return None
        with self._lock:
            if name in self._cache:
                return self._cache[name]
            meta, tensors = self.root / f"{name}.json", self.root / f"{name}.safetensors"
            if not meta.exists() or not tensors.exists():
                return None
            voice = Voice(**json.loads(meta.read_text()), codes=load_file(tensors)["codes"])
            self._cache[name] = voice
            return voice

    def add(self, name: str, speaker: int, transcript: str, codes: torch.Tensor) -> Voice:
        voice = Voice(name, speaker, transcript, int(codes.shape[0]), time.time(), codes.long().contiguous())
        with self._lock:
            _atomic_write(self.root / f"{name}.safetensors", lambda p: save_file({"codes": voice.codes}, p))
            meta = {"name": name, "speaker": speaker, "transcript": transcript, "frames": voice.frames,
                    "created": voice.created}
            # codes first: a voice is listed (by its .json) only once both files are in place
            _atomic_write(self.root / f"{name}.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
            self._cache[name] = voice
        return voice

    def delete(self, name: str) -> bool:
        with self._lock:
            self._cache.pop(name, None)
            found = False
            for suffix in (".json", ".safetensors"):  # metadata first: a half-deleted voice is not listed
                path = self.root / f"{name}{suffix}"
                if NAME.match(name) and path.exists():
                    path.unlink()
                    found = True
            return found


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
