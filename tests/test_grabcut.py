"""The GrabCut baseline: seeded by clicks, keeps only clicked components, and runs in model.evaluation.evaluate."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from model.clicks import Click
from model.evaluation.evaluate import main as evaluate_main
from model.evaluation.grabcut import GrabCutPredictor
from model.evaluation.protocol import iou


def _two_disks(height=80, width=120):
    """Red disks on a noisy green background: the left one is the object, the right one a look-alike."""
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 1] = 140
    image = np.clip(image.astype(int) + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    ys, xs = np.mgrid[:height, :width]
    left = (ys - 40) ** 2 + (xs - 30) ** 2 <= 18 ** 2
    right = (ys - 40) ** 2 + (xs - 90) ** 2 <= 18 ** 2
    image[left | right] = (200, 30, 30)
    return image, left, right


def test_one_positive_click_segments_the_clicked_object_only():
    image, left, right = _two_disks()
    predictor = GrabCutPredictor()
    prob = predictor.predict(predictor.encode_image(image), [Click(40, 30, True)])
    assert prob.shape == left.shape and prob.dtype == np.float32
    assert iou(prob > 0.5, left) > 0.9
    assert not (prob > 0.5)[right].any()  # same colour, not connected to a positive click


def test_negative_clicks_are_background_and_no_positive_means_empty():
    image, left, _ = _two_disks()
    predictor = GrabCutPredictor()
    state = predictor.encode_image(image)
    prob = predictor.predict(state, [Click(40, 30, True), Click(40, 40, False)])
    assert prob[37:44, 37:44].max() == 0.0  # inside the negative click's sure disk
    assert predictor.predict(state, [Click(40, 30, False)]).max() == 0.0
    with pytest.raises(ValueError, match="outside"):
        predictor.predict(state, [Click(500, 30, True)])


def test_large_images_are_cut_to_max_side_and_scaled_back():
    image, left, _ = _two_disks()
    big = np.kron(image, np.ones((4, 4, 1), np.uint8))  # 320 x 480
    big_left = np.kron(left, np.ones((4, 4), bool))
    predictor = GrabCutPredictor(max_side=160)
    state = predictor.encode_image(big)
    assert state.bgr.shape[:2] == (107, 160)
    prob = predictor.predict(state, [Click(160, 120, True)])
    assert prob.shape == big_left.shape
    assert iou(prob > 0.5, big_left) > 0.85


def test_model_evaluate_prints_the_baseline_beside_the_model_and_caches_it(tmp_path, capsys):
    image, left, right = _two_disks()
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "data" / "images" / "disks.png")
    Image.fromarray(left.astype(np.uint8) * 255).save(tmp_path / "data" / "masks" / "disks_1.png")
    Image.fromarray(right.astype(np.uint8) * 255).save(tmp_path / "data" / "masks" / "disks_2.png")
    args = ["--dataset", f"folder:{tmp_path / 'data'}", "--max-clicks", "3", "--out-dir", str(tmp_path / "out"),
            "--label", "model", "--baseline", "grabcut", "--no-zoom-in"]
    assert evaluate_main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:4]]
    assert rows == ["model", "grabcut"]
    assert "vs the baseline's" in out and "target of 30 % below" in out
    cached = list((tmp_path / "out").glob("baseline-grabcut-*.json"))
    assert len(cached) == 1
    data = json.loads(cached[0].read_text())
    assert [o["name"] for o in data["objects"]] == data["settings"]["cache_key"]["objects"]
    assert min(o["ious"][0] for o in data["objects"]) > 0.9  # each disk, alone
    mtime = cached[0].stat().st_mtime_ns
    assert evaluate_main(args) == 0
    assert cached[0].stat().st_mtime_ns == mtime  # the second run reads the cache
    assert "grabcut (baseline)" in capsys.readouterr().out
