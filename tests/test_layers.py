"""The package's layers (docs/architecture.md): each folder imports only the folders below it, and
no module imports itself back through others.  Read from the source (ast), nothing is imported."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "runtime", "weights", "engine", "misotts", "server", "bench")

# What each folder may import, besides itself (docs/architecture.md, "Layers").
ALLOWED = {
    "kernels": set(),
    "runtime": {"kernels"},
    "weights": {"kernels", "runtime"},
    "engine": {"kernels", "runtime", "weights"},  # quantised linears (weights/quantize.py)
    "misotts": {"kernels", "runtime", "weights", "engine"},  # the API
    "server": {"kernels", "runtime", "weights", "engine", "misotts"},
    "bench": {"kernels", "runtime", "weights", "engine", "misotts", "server"},
}
# Imports across layers that are known and named, made inside a function (never at import time):
# the command line starts the server and the bench, and checks an API key as the server will; the
# codec reads Mimi weights bundled in a checkpoint folder with the checkpoint reader; the quantised
# GEMV's compile-report cases take the stored shapes from the quantiser.
EXCEPTIONS = {("misotts/cli.py", "server"), ("misotts/cli.py", "bench"), ("misotts/cli_checks.py", "server"),
              ("runtime/codec.py", "weights"), ("kernels/quant_linear.py", "weights")}
# A tool, run as `python -m misotts.kernels.report` and imported by no library module: it sizes
# the kernels' compile cases from the presets.
TOOLS = {("kernels/report.py", "runtime")}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] != "misotts":
        parts.insert(0, "misotts")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path, top_level_only: bool) -> list[str]:
    """misotts.* modules (or names in them) that `path` imports: all, or those at import time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import) and not (top_level_only and in_function):
                found.extend(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and not (top_level_only and in_function):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                found.extend([base, *(f"{base}.{a.name}" for a in child.names)])  # a submodule, or a name in base
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return [n for n in found if n == "misotts" or n.startswith("misotts.")]


def _files(root: Path) -> list[Path]:
    return [p for folder in FOLDERS if (root / folder).is_dir() for p in sorted((root / folder).rglob("*.py"))]


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else "misotts"


def layer_violations(path: Path, root: Path = ROOT) -> list[str]:
    here, rel = path.relative_to(root).parts[0], path.relative_to(root).as_posix()
    return sorted({_folder(n) for n in _imports(path, root, top_level_only=False)}
                  - ALLOWED[here] - {here} - {f for (p, f) in EXCEPTIONS | TOOLS if p == rel})


def import_cycle(root: Path = ROOT) -> list[str]:
    """A cycle of modules importing each other at import time ([] if none)."""
    modules = {_module_name(p, root): p for p in _files(root)}
    graph = {m: {n for n in _imports(p, root, top_level_only=True) if n in modules and n != m
                 and not (p.name == "__init__.py" and n.startswith(m + "."))}  # a package loading its own parts
             for m, p in modules.items()}
    state, stack = {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := dfs(n)):
                return cycle
        stack.pop()
        state[m] = "done"
        return []

    for m in sorted(graph):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return []


@pytest.mark.parametrize("path", _files(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_module_imports_only_the_layers_below_it(path):
    bad = layer_violations(path)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: docs/architecture.md says which layer may import which"


def test_the_known_exceptions_are_imported_inside_functions_only():
    for rel, folder in EXCEPTIONS:
        assert folder not in {_folder(n) for n in _imports(ROOT / rel, ROOT, top_level_only=True)}, rel


def test_no_library_module_imports_a_tool():
    for rel, _ in TOOLS:
        tool = _module_name(ROOT / rel, ROOT)
        users = [p.relative_to(ROOT).as_posix() for p in _files(ROOT)
                 if tool in _imports(p, ROOT, top_level_only=False) and not p.parts[-2] in ("bench",)]
        assert not users, f"{tool} is imported by {users}"


def test_no_import_cycle_at_import_time():
    cycle = import_cycle()
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_a_violation_and_a_cycle(tmp_path):
    """The walk is not vacuous: a runtime module importing the engine, and two modules importing
    each other at import time, are found."""
    for folder in ("runtime", "engine"):
        (tmp_path / folder).mkdir()
    (tmp_path / "runtime" / "a.py").write_text("from misotts.engine import b\n")
    (tmp_path / "engine" / "b.py").write_text("def f():\n    pass\nfrom ..runtime import a\n")
    assert layer_violations(tmp_path / "runtime" / "a.py", tmp_path) == ["engine"]
    assert import_cycle(tmp_path) == ["misotts.engine.b", "misotts.runtime.a", "misotts.engine.b"]
