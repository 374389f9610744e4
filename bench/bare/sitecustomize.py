"""Pretend some packages are not installed, so that the GPU suite's CPU rehearsal runs as on the device
image (bench/gpu_suite.sh --dry-run).

With this folder on PYTHONPATH and MISOTTS_WITHOUT=fastapi,av,... (top-level import names), every
Python process loads this at start and no finder finds those names: `import av` fails with
ModuleNotFoundError and `importlib.util.find_spec("av")` is None, as on a machine without av.  So
`pytest.importorskip` skips, and a module-level import of one of them shows as the collection
error it would be there.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


class _Hiding:
    """A meta-path finder that finds nothing under the hidden names and defers to its finder otherwise."""

    def __init__(self, finder, names):
        self._finder, self._names = finder, names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self._names:
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(fullname, path, target) if find else None

    def __getattr__(self, name):  # invalidate_caches, find_distributions, ...
        return getattr(self._finder, name)


def _hide(names):
    sys.meta_path[:] = [_Hiding(f, names) for f in sys.meta_path]
    for name in list(sys.modules):  # anything of them imported before this ran is dropped
        if name.partition(".")[0] in names:
            del sys.modules[name]


def _chain():
    """Run the sitecustomize this one shadows (a distribution's), if there is one."""
    import importlib.machinery
    import importlib.util

    for entry in sys.path:
        if os.path.abspath(entry or ".") == _HERE:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None and spec.loader is not None:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_names = frozenset(n.strip() for n in os.environ.get("MISOTTS_WITHOUT", "").split(",") if n.strip())
if _names:
    _hide(_names)
_chain()
