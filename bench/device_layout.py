"""Make `misotts` importable from a source tree without installing it: `python bench/device_layout.py [ROOT]`.

setup.py maps the top-level folders under `misotts.` (package_dir: `misotts.kernels` is `kernels/`),
so a plain checkout on PYTHONPATH has `misotts` without its subpackages.  This links each mapped
folder into `misotts/` (`misotts/kernels -> ../kernels`), read from setup.py itself so the two
cannot drift: what a device machine needs, where `pip install -e .` cannot run (no network for
its build dependencies).  The links are for a throwaway copy of the tree, not for a checkout.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def package_dirs(root: Path) -> dict[str, str]:
    """setup.py's package_dir, read by running setup.py with setuptools.setup replaced."""
    import setuptools

    seen: dict = {}
    real_setup, setuptools.setup = setuptools.setup, lambda **kw: seen.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(root)  # setup.py opens README.md by a relative path
        exec(compile((root / "setup.py").read_text(), str(root / "setup.py"), "exec"), {"__name__": "__setup__"})
    finally:
        setuptools.setup = real_setup
        os.chdir(cwd)
    return seen["package_dir"]


def link(root: Path) -> list[str]:
    """Link every `misotts.<sub>` folder into root/misotts; returns the subpackages linked."""
    made = []
    for name, folder in package_dirs(root).items():
        parts = name.split(".")
        if len(parts) != 2 or parts[0] != "misotts":
            continue
        target = root / "misotts" / parts[1]
        if target.is_symlink():
            target.unlink()
        if not target.exists():
            target.symlink_to(os.path.relpath(root / folder, target.parent), target_is_directory=True)
        made.append(parts[1])
    return made


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    print("linked misotts." + ", misotts.".join(link(root)))
