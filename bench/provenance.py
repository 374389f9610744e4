"""Which code a measurement describes: the git commit and whether the tree had uncommitted changes.

Every results file records `code_version()`.  Where the tree has no `.git` (a copy of the working
tree sent to a GPU machine), the commit comes from MISOTTS_GIT_COMMIT / MISOTTS_GIT_DIRTY, which
the sender sets from its own checkout (bench/gpu_suite.sh reads them from a file it is handed).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version() -> dict:
    """{"commit": 40-hex sha or None, "dirty": bool or None, "source": "git" | "env" | "unknown"}."""
    sha = _git("rev-parse", "HEAD")
    if sha:
        status = _git("status", "--porcelain", "--untracked-files=no")
        return {"commit": sha.strip(), "dirty": bool(status and status.strip()) if status is not None else None,
                "source": "git"}
    env_sha = os.environ.get("MISOTTS_GIT_COMMIT")
    if env_sha:
        dirty = os.environ.get("MISOTTS_GIT_DIRTY")
        return {"commit": env_sha.strip(), "dirty": None if dirty is None else dirty.strip() not in ("", "0", "false"),
                "source": "env"}
    return {"commit": None, "dirty": None, "source": "unknown"}
