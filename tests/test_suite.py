"""model.evaluation.suite: the model beside the baseline, set by set, cached and resumable."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from model.data import is_heldout
from model.evaluation.suite import main as suite_main
from model.predictor import DEFAULT_CLICK_REFINEMENT_ITERATIONS


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
    row, first_click = [line for line in table.splitlines() if line.startswith("| pennfudan-heldout")]
    assert row.split("|")[2].strip() == "2"  # the two held-out images' objects, not the training one
    # each object (800 of 6 144 pixels, 13 %) falls in the 5-20 % column of the first-click table
    assert [cell.strip().split(":")[0] for cell in first_click.split("|")[2:5]] == ["-", "2", "-"]
    report = json.loads((out / "suite-shipped.json").read_text())
    entry = report["sets"]["pennfudan-heldout"]
    assert entry["model"]["num_objects"] == entry["baseline"]["num_objects"] == 2
    assert (out / "suite-shipped.png").is_file() and (out / "suite-shipped.md").read_text().strip() in table
    cached = sorted(out.glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert suite_main(args) == 0
    assert [p.stat().st_mtime_ns for p in cached if p.name != "suite-shipped.json"] == \
           [m for p, m in zip(cached, mtimes) if p.name != "suite-shipped.json"]  # nothing re-evaluated
    assert capsys.readouterr().out.count("| pennfudan-heldout") == 2  # from the cache, first clicks included


def test_suite_names_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        suite_main(["--sets", "imagenet", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a directory"):
        suite_main(["--data-root", str(tmp_path / "none"), "--out-dir", str(tmp_path)])


def test_click_refinement_is_its_own_cached_run(tmp_path, capsys):
    _pennfudan(tmp_path / "data")
    out = tmp_path / "out"
    common = ["--data-root", str(tmp_path / "data"), "--sets", "pennfudan-heldout", "--max-clicks", "2",
              "--out-dir", str(out)]
    assert suite_main(common + ["--label", "plain", "--click-refinement", "0"]) == 0
    assert suite_main(common + ["--label", "refined", "--click-refinement", "3"]) == 0
    assert suite_main(common + ["--label", "default"]) == 0
    tables = capsys.readouterr().out
    assert "no click refinement" in tables and "click refinement 3" in tables
    assert f"click refinement {DEFAULT_CLICK_REFINEMENT_ITERATIONS}, clicked components only)" in tables

    def key(label):
        return json.loads((out / f"{label}-pennfudan-heldout.json").read_text())["settings"]["cache_key"]

    assert "click_refinement_iterations" not in key("plain")  # as in caches made before refinement existed
    assert key("refined")["click_refinement_iterations"] == 3
    assert key("default")["click_refinement_iterations"] == DEFAULT_CLICK_REFINEMENT_ITERATIONS
    assert json.loads((out / "suite-refined.json").read_text())["settings"]["click_refinement_iterations"] == 3


def test_all_components_is_its_own_cached_run(tmp_path, capsys):
    _pennfudan(tmp_path / "data")
    out = tmp_path / "out"
    common = ["--data-root", str(tmp_path / "data"), "--sets", "pennfudan-heldout", "--max-clicks", "2",
              "--out-dir", str(out)]
    assert suite_main(common + ["--label", "clicked"]) == 0
    assert suite_main(common + ["--label", "all", "--all-components"]) == 0
    tables = capsys.readouterr().out
    assert "clicked components only" in tables and "all components" in tables

    def key(label):
        return json.loads((out / f"{label}-pennfudan-heldout.json").read_text())["settings"]["cache_key"]

    assert key("clicked")["clicked_components_only"] is True
    assert "clicked_components_only" not in key("all")  # as in caches made before the option existed
    assert json.loads((out / "suite-all.json").read_text())["settings"]["clicked_components_only"] is False


def test_suite_rejects_bad_click_refinement(tmp_path):
    with pytest.raises(SystemExit, match="--click-refinement must be >= 0"):
        suite_main(["--data-root", str(tmp_path), "--click-refinement", "-1", "--out-dir", str(tmp_path)])
