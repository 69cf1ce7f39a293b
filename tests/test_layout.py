"""The library's shape: no import cycle inside absorber_engine/ or absorber_kernels/, no engine module past
350 lines (a kernel's file, which holds one op whole, past 470), and importing the library pulls in neither the benchmarks, the evaluation nor a
plotting package."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"absorber_engine": ROOT / "absorber_engine", "absorber_kernels": ROOT / "absorber_kernels"}
MAX_LINES = 350          # absorber_engine: one job per module
KERNEL_MAX_LINES = 470   # kernels: one op per file, its reference, Triton kernels and launchers together


def _modules():
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.glob("**/*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg,) + parts)
            yield name.removesuffix(".__init__"), path


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the two packages that `name` imports, at any depth (lazy imports count: they are
    dependencies all the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out.update(c for c in candidates if c.split(".")[0] in PACKAGES)
    return out


def test_no_import_cycle():
    modules = dict(_modules())
    graph = {m: {t for t in _imports(m, p) if t in modules and t != m} for m, p in modules.items()}
    # A package's __init__ re-exports its modules; only module-to-module edges can form a cycle.
    for pkg in PACKAGES:
        graph[pkg] = set()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_is_too_long():
    def limit(m):
        return KERNEL_MAX_LINES if m.startswith("absorber_kernels") else MAX_LINES

    long = {m: n for m, p in _modules() if (n := len(p.read_text().splitlines())) > limit(m)}
    assert not long, long


def test_importing_the_library_pulls_in_no_benchmark_evaluation_or_plotting():
    code = ("import sys, absorber_engine, absorber_engine.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('absorber_bench', 'benchmarks', 'evals', 'matplotlib', 'fuzz')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_folder_of_the_clone_hides_an_installed_package():
    # Commands and tests run from the clone's root, where a folder with an __init__.py is imported
    # before site-packages: a folder once named kernels/ hid the `kernels` package that transformers
    # imports to load GGUF files, and the real model could not be fetched from a clone.
    from importlib.metadata import packages_distributions

    ours = {"absorber_engine", "absorber_kernels"}
    installed = {name for name, dists in packages_distributions().items() if "absorber-engine" not in dists}
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert ours <= folders
    assert not folders & installed, sorted(folders & installed)
