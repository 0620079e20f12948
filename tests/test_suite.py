"""model.evaluation.suite: the model beside the baseline, set by set, cached and resumable."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from model.data import is_heldout
from model.evaluation.suite import main as suite_main


def _pennfudan(root):
    (root / "pennfudan" / "images").mkdir(parents=True)
    (root / "pennfudan" / "instances").mkdir()
    rng = np.random.default_rng(0)
    stems = [f"FudanPed{i:05d}" for i in range(40)]
    for stem in [s for s in stems if is_heldout(s)][:2] + [s for s in stems if not is_heldout(s)][:1]:
        image = rng.integers(0, 80, (64, 96, 3), dtype=np.uint8)
        labels = np.zeros((64, 96), np.uint8)
        labels[10:50, 20:40] = 1
        image[labels == 1] = (200, 60, 60)
        Image.fromarray(image).save(root / "pennfudan" / "images" / f"{stem}.webp")
        Image.fromarray(labels).save(root / "pennfudan" / "instances" / f"{stem}.png")


def test_suite_table_json_and_cache(tmp_path, capsys):
    _pennfudan(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--data-root", str(tmp_path / "data"), "--sets", "pennfudan-heldout", "--max-clicks", "2",
            "--out-dir", str(out), "--label", "shipped"]
    assert suite_main(args) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| pennfudan-heldout"))
    assert row.split("|")[2].strip() == "2"  # the two held-out images' objects, not the training one
    report = json.loads((out / "suite-shipped.json").read_text())
    entry = report["sets"]["pennfudan-heldout"]
    assert entry["model"]["num_objects"] == entry["baseline"]["num_objects"] == 2
    assert (out / "suite-shipped.png").is_file() and (out / "suite-shipped.md").read_text().strip() in table
    cached = sorted(out.glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert suite_main(args) == 0
    assert [p.stat().st_mtime_ns for p in cached if p.name != "suite-shipped.json"] == \
           [m for p, m in zip(cached, mtimes) if p.name != "suite-shipped.json"]  # nothing re-evaluated
    assert capsys.readouterr().out.count("| pennfudan-heldout") == 1


def test_suite_names_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        suite_main(["--sets", "imagenet", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a directory"):
        suite_main(["--data-root", str(tmp_path / "none"), "--out-dir", str(tmp_path)])
