"""Registered voices: a reference clip encoded once to Mimi codes, stored on disk beside its
transcript.  A request with the voice gets it as the first context turn, so the engine's prefix
cache holds its KV after the first use."""
from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from misotts.runtime.prompt import Segment

log = logging.getLogger("misotts.server")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always fullmatch: "$" lets a trailing newline by


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


class VoiceExists(Exception):
    """add() of a name that is taken (by this process or another sharing the folder)."""


class VoiceStore:
    """One file per voice, <root>/<name>.safetensors: the codes, with the speaker and transcript in
    its metadata.  Several processes (the replicas of a Ray Serve deployment) may share the folder:

    - a voice is written to a temporary file and linked into place only if the name is free, so a
      reader sees a whole voice or none, and two replicas registering one name cannot both win;
    - every get() checks the file it cached against the one on disk (one stat), so a voice deleted
      or registered again by another replica is never served stale.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple, Voice]] = {}  # name -> (the file's identity, its voice)
        self._unreadable: dict[str, tuple] = {}  # name -> the identity of a file already logged as unreadable

    def list(self) -> list[Voice]:
        return [v for p in sorted(self.root.glob("*.safetensors")) if (v := self.get(p.stem)) is not None]

    def get(self, name: str) -> Voice | None:
        if not NAME.fullmatch(name):
            return None
        path = self._path(name)
        with self._lock:
            try:
                st = path.stat()
                identity = (st.st_ino, st.st_mtime_ns, st.st_size)
                cached = self._cache.get(name)
                if cached is not None and cached[0] == identity:
                    return cached[1]
                voice = _read(path)
            except FileNotFoundError:  # never registered, or deleted (here or by another process)
                self._cache.pop(name, None)
                return None
            except Exception as err:  # noqa: BLE001 -- unreadable or not a voice: absent, for everyone alike
                self._cache.pop(name, None)
                if self._unreadable.get(name) == identity:  # said once per file, not on every request
                    return None
                self._unreadable[name] = identity
                log.warning("voice %r: skipping %s, which cannot be read as a voice (%s: %s)", name, path,
                            type(err).__name__, err)
                return None
            self._cache[name] = (identity, voice)
            return voice

    def add(self, name: str, speaker: int, transcript: str, codes: torch.Tensor) -> Voice:
        """Raises VoiceExists when the name is taken."""
        if not NAME.fullmatch(name):
            raise ValueError(f"bad voice name {name!r}")
        voice = Voice(name, speaker, transcript, int(codes.shape[0]), time.time(), codes.long().contiguous())
        meta = {"name": name, "speaker": str(speaker), "transcript": transcript, "created": repr(voice.created)}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"codes": voice.codes}, tmp, metadata=meta)
            os.link(tmp, self._path(name))  # atomic, and fails if the name exists: no overwrite, no half file
        except FileExistsError:
            raise VoiceExists(name) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return voice

    def delete(self, name: str) -> bool:
        with self._lock:
            self._cache.pop(name, None)
            if not NAME.fullmatch(name):
                return False
            try:
                self._path(name).unlink()
                return True
            except FileNotFoundError:
                return False

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"


def _read(path: Path) -> Voice:
    with safe_open(path, "pt") as f:
        meta, codes = f.metadata() or {}, f.get_tensor("codes")
    if codes.ndim != 2 or codes.dtype != torch.long or codes.numel() == 0:
        raise ValueError(f"its codes are {codes.dtype} {tuple(codes.shape)}, not [frames, codebooks] integers")
    return Voice(meta["name"], int(meta["speaker"]), meta["transcript"], int(codes.shape[0]),
                 float(meta["created"]), codes)
