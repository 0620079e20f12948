"""Evaluation protocol: clicker placement, NoC/NoF/mIoU, the click loop and its outputs.

Everything runs on tiny hand-made masks and a fake predictor (no data, no weights).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage

from model.clicks import IGNORE_VALUE, Click
from model.evaluation.evaluate import (EvalResult, ObjectResult, Run, evaluate_objects, format_first_click_table,
                                       format_table, load_run, main, write_outputs)
from model.evaluation.protocol import Clicker, by_object_size, iou, mask_overlap, miou_curve, noc, nof, summarize
from model.predictor import ClickSegPredictor

# --------------------------------------------------------------------------- clicker


def test_first_click_is_farthest_from_boundary_with_image_border_as_boundary():
    gt = np.zeros((20, 20), np.uint8)
    gt[0:9, 0:9] = 1  # 9x9 square in the top-left corner
    click = Clicker(gt).make_next_click(None)
    # Without counting the border, the corner (0, 0) would be farthest from the boundary.
    assert click == Click(4.0, 4.0, True)


def test_next_click_is_positive_in_larger_false_negative_region():
    gt = np.zeros((30, 30), np.uint8)
    gt[5:25, 5:25] = 1
    pred = gt.astype(bool)
    pred[10:20, 10:20] = False  # 10x10 false-negative hole (distance 5)
    pred[26:29, 5:25] = True  # 3-row false-positive strip (distance 2)
    clicker = Clicker(gt)
    clicker.make_next_click(None)
    click = clicker.make_next_click(pred)
    assert click == Click(14.0, 14.0, True)
    assert len(clicker.clicks) == 2


def test_next_click_is_negative_in_larger_false_positive_region():
    gt = np.zeros((40, 40), np.uint8)
    gt[5:25, 5:25] = 1
    pred = gt.astype(bool)
    pred[5:8, 5:25] = False  # 3-row false-negative strip (distance 2)
    pred[27:39, 5:25] = True  # 12x20 false-positive block (distance 6 at rows 32/33, cols 10..19)
    click = Clicker(gt).make_next_click(pred)
    assert click == Click(32.0, 10.0, False)


def test_ignore_region_is_excluded_from_clicks_and_iou():
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = IGNORE_VALUE  # large ignore region
    mask[10:30, 5:15] = 1  # 20x10 object
    first = Clicker(mask).make_next_click(None)
    assert mask[int(first.y), int(first.x)] == 1 and first.is_positive

    pred = mask == 1
    pred[:, 20:] = True  # wrong on the whole ignore region
    pred[10:13, 5:15] = False  # small false-negative strip (distance 2)
    click = Clicker(mask).make_next_click(pred)
    assert click.is_positive and mask[int(click.y), int(click.x)] == 1 and click.y < 13
    assert iou(pred, mask) == pytest.approx(170 / 200)
    assert iou((mask == 1) | (mask == IGNORE_VALUE), mask) == 1.0


# --------------------------------------------------------------------------- metrics


def test_noc_counts_clicks_to_first_reach_threshold():
    ious = [0.5, 0.86, 0.9, 0.96]
    assert noc(ious, 0.85, 4) == 2
    assert noc(ious, 0.90, 4) == 3  # reaching the threshold exactly counts
    assert noc(ious, 0.95, 4) == 4
    assert noc(ious, 0.99, 4) == 4  # never reached -> max_clicks
    assert noc([0.1, 0.2, 0.99], 0.95, 2) == 2  # IoU after click 3 lies beyond max_clicks
    assert noc([0.3, 0.96, 0.4], 0.95, 3) == 2  # first time counts, even if it drops later


def test_nof_and_miou_curve():
    curves = [[0.5, 0.91], [0.5, 0.6], [0.95, 0.95]]
    assert nof(curves, 0.90, 2) == 1
    assert nof(curves, 0.90, 1) == 2
    assert nof(curves, 0.50, 1) == 0
    np.testing.assert_allclose(miou_curve([[0.5, 1.0], [0.7, 0.8]], 2), [0.6, 0.9])
    np.testing.assert_allclose(miou_curve([[0.5, 1.0, 0.2], [0.7, 0.8, 0.0]], 1), [0.6])


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="max_clicks"):
        noc([0.9], 0.9, 2)
    with pytest.raises(ValueError, match="max_clicks"):
        noc([0.9], 0.9, 0)
    with pytest.raises(ValueError, match="no IoU curves"):
        miou_curve([], 20)


def test_summarize_keys_and_values():
    s = summarize([[0.8, 0.92, 1.0], [0.0, 0.0, 0.0]], 3)
    assert s["noc@85"] == pytest.approx((2 + 3) / 2)
    assert s["noc@95"] == pytest.approx((3 + 3) / 2)
    assert (s["nof@85"], s["nof@90"]) == (1, 1)
    np.testing.assert_allclose(s["miou_curve"], [0.4, 0.46, 0.5])


# --------------------------------------------------------------------------- evaluation loop


@dataclass
class FakeObject:
    image: np.ndarray
    mask: np.ndarray
    name: str
    image_id: str


class RevealPredictor:
    """Fake predictor reading the answer from the image.

    Channel 0 > 127 marks object components: each one holding a positive click is
    predicted. Channel 1 > 127 marks a distractor, predicted until a negative click lands in it.
    """

    model_version = "fake-reveal"

    def __init__(self):
        self.encoded = 0
        self.calls = []  # (number of clicks, prev_mask) per predict call
        self.returned = []

    def encode_image(self, image):
        self.encoded += 1
        labels, _ = ndimage.label(image[..., 0] > 127)
        return labels, image[..., 1] > 127

    def predict(self, state, clicks, prev_mask=None):
        labels, distractor = state
        self.calls.append((len(clicks), prev_mask))
        prob = np.zeros(labels.shape, np.float32)
        for c in clicks:
            label = labels[int(c.y), int(c.x)]
            if c.is_positive and label:
                prob[labels == label] = 1.0
        if not any(not c.is_positive and distractor[int(c.y), int(c.x)] for c in clicks):
            prob[distractor] = 0.7
        self.returned.append(prob)
        return prob


def make_scene():
    """60x80 image: components A (20x40), B (10x12), C (8x10) and a 12x20 distractor."""
    image = np.zeros((60, 80, 3), np.uint8)
    parts = {"A": (slice(5, 25), slice(5, 45)), "B": (slice(35, 45), slice(5, 17)), "C": (slice(35, 43), slice(30, 40))}
    for rows, cols in parts.values():
        image[rows, cols, 0] = 255
    image[45:57, 50:70, 1] = 255
    return image, parts


def test_evaluate_objects_with_fake_predictor_gives_known_curves():
    image, parts = make_scene()
    whole = (image[..., 0] > 127).astype(np.uint8)  # A + B + C = 800 + 120 + 80 px
    only_b = np.zeros_like(whole)
    only_b[parts["B"]] = 1
    unreachable = np.zeros_like(whole)
    unreachable[0:10, 60:70] = 1
    blank = np.zeros_like(image)
    objects = [
        FakeObject(image, whole, "whole", "scene"),
        FakeObject(image, only_b, "only_b", "scene"),  # same image array: encoding reused
        FakeObject(blank, unreachable, "unreachable", "blank"),
    ]
    predictor = RevealPredictor()
    result = evaluate_objects(predictor, objects, max_clicks=20)

    # whole: +A (distractor shown), -distractor, +B, +C
    expected_whole = [800 / 1240, 800 / 1000, 920 / 1000] + [1.0] * 17
    np.testing.assert_allclose(result.objects[0].ious, expected_whole)
    y, x, positive = result.objects[0].clicks[1]
    assert not positive and image[int(y), int(x), 1] == 255
    # only_b: +B (distractor shown), -distractor
    np.testing.assert_allclose(result.objects[1].ious, [120 / 360] + [1.0] * 19)
    np.testing.assert_allclose(result.objects[2].ious, [0.0] * 20)
    assert predictor.encoded == 2
    assert result.objects[1].encode_seconds == 0.0

    s = result.summary()
    assert s["noc@85"] == pytest.approx((3 + 2 + 20) / 3)
    assert s["noc@90"] == pytest.approx((3 + 2 + 20) / 3)
    assert s["noc@95"] == pytest.approx((4 + 2 + 20) / 3)
    assert (s["nof@85"], s["nof@90"]) == (1, 1)
    assert s["miou_curve"][0] == pytest.approx((800 / 1240 + 120 / 360 + 0.0) / 3)
    assert s["clicks_made"] == 60 and s["mean_seconds_per_click"] > 0

    # the first click's mask: whole = A + the distractor; only_b = B + the distractor; unreachable = nothing
    first = [o.first_click for o in result.objects]
    assert first[0] == pytest.approx({"share": 1000 / 4800, "precision": 800 / 1040, "recall": 0.8})
    assert first[1] == pytest.approx({"share": 120 / 4800, "precision": 120 / 360, "recall": 1.0})
    assert first[2] == pytest.approx({"share": 100 / 4800, "precision": 1.0, "recall": 0.0})
    small, large = s["first_click_by_size"]
    assert small["share"] == [0.0, 0.05] and small["objects"] == 2 and large["share"] == [0.2, 1.0]
    assert small["iou"] == pytest.approx((120 / 360) / 2) and small["recall"] == pytest.approx(0.5)
    assert large["objects"] == 1 and large["precision"] == pytest.approx(800 / 1040)
    assert format_first_click_table(s["first_click_by_size"]).splitlines()[1].split() == \
        ["0-", "5", "%", "2", f"{(120 / 360) / 2:.3f}", f"{(1 / 3 + 1) / 2:.3f}", "0.500"]

    # prev_mask: None on each object's first click, then the previous probability map itself.
    for i, (n_clicks, prev) in enumerate(predictor.calls):
        if n_clicks == 1:
            assert prev is None
        else:
            assert prev is predictor.returned[i - 1]


def test_mask_overlap_leaves_ignored_pixels_out_and_names_bad_input():
    gt = np.zeros((4, 5), np.uint8)
    gt[0, :2] = 1
    gt[3, :] = IGNORE_VALUE
    pred = np.zeros((4, 5), bool)
    pred[0, 1:4] = True
    pred[3, :] = True  # ignored: counts neither way
    assert mask_overlap(pred, gt) == pytest.approx({"share": 2 / 15, "precision": 1 / 3, "recall": 0.5})
    with pytest.raises(ValueError, match="object mask is empty"):
        mask_overlap(pred, np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="2 overlaps for 1 IoUs"):
        by_object_size([mask_overlap(pred, gt)] * 2, [0.5])


def test_stop_at_iou_pads_curve_with_last_iou():
    image, _ = make_scene()
    whole = (image[..., 0] > 127).astype(np.uint8)
    predictor = RevealPredictor()
    result = evaluate_objects(predictor, [FakeObject(image, whole, "whole", "scene")], max_clicks=20, stop_at_iou=0.9)
    obj = result.objects[0]
    assert len(obj.clicks) == 3 and len(obj.click_seconds) == 3 and len(predictor.calls) == 3
    np.testing.assert_allclose(obj.ious, [800 / 1240, 0.8] + [0.92] * 18)
    assert noc(obj.ious, 0.90, 20) == 3


def test_evaluate_objects_rejects_bad_input():
    image, _ = make_scene()
    with pytest.raises(ValueError, match="no objects"):
        evaluate_objects(RevealPredictor(), [])
    with pytest.raises(ValueError, match="does not match image"):
        evaluate_objects(RevealPredictor(), [FakeObject(image, np.ones((5, 5), np.uint8), "bad", "x")])
    with pytest.raises(ValueError, match="stop_at_iou"):
        evaluate_objects(RevealPredictor(), [FakeObject(image, np.ones((60, 80), np.uint8), "o", "x")], stop_at_iou=1.5)


# --------------------------------------------------------------------------- outputs


def fake_result(label: str, curve) -> EvalResult:
    obj = ObjectResult("o", "img", list(curve), [(1.0, 2.0, True)], [0.01], 0.02)
    return EvalResult([obj], len(curve), {"label": label, "dataset": "folder:x"})


def test_write_outputs_json_png_table_and_compare(tmp_path):
    first = fake_result("cfr off", [0.5, 0.7, 0.86])
    json_path, _, _ = write_outputs(first, tmp_path)
    assert json_path.name == "cfr_off.json"
    saved = json.loads(json_path.read_text())
    assert saved["objects"][0]["ious"] == [0.5, 0.7, 0.86]
    assert saved["summary"]["noc@85"] == 3 and saved["settings"]["label"] == "cfr off"

    second = fake_result("cfr-on", [0.6, 0.91, 0.97])
    json2, png2, table = write_outputs(second, tmp_path, compare=[load_run(json_path)])
    assert png2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "objects", "NoC@85"]
    assert lines[2].split()[:5] == ["cfr-on", "1", "2.00", "2.00", "3.00"]
    assert lines[3].startswith("cfr off") and "3.00" in lines[3]
    assert load_run(json2).summary["miou_curve"] == [0.6, 0.91, 0.97]


def test_load_run_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"summary": {}}))
    with pytest.raises(ValueError, match="not an evaluation JSON"):
        load_run(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "missing.json")
    # The CLI checks --compare files before loading any model or data.
    with pytest.raises(ValueError, match="does not exist"):
        main(["--dataset", "folder:/nonexistent", "--out-dir", str(tmp_path), "--compare", str(tmp_path / "missing.json")])


def test_format_table_handles_short_curves():
    table = format_table([Run("short", summarize([[0.5, 0.9]], 2) | {"mean_seconds_per_click": 0.5})])
    row = table.splitlines()[2].split()
    assert row[0] == "short" and row[-1] == "0.500" and "-" in row


# --------------------------------------------------------------------------- benchmark helpers


def test_parse_sizes():
    from model.evaluation.benchmark import parse_sizes

    assert parse_sizes("640x480, 4000X3000") == [(640, 480), (4000, 3000)]
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_sizes("640*480")
    with pytest.raises(ValueError, match="too small"):
        parse_sizes("16x480")


class RedPredictor:
    """Fake predictor: the object is the reddish part of the image."""

    model_version = "fake-red"

    def __init__(self):
        self.clicks_seen = []

    def encode_image(self, image):
        return image

    def predict(self, image, clicks, prev_mask=None):
        self.clicks_seen.append(len(clicks))
        assert (prev_mask is None) == (len(clicks) == 1)
        red = image[..., 0].astype(int) - image[..., 1].astype(int) > 60
        return red.astype(np.float32)


def test_synthetic_scene_and_benchmark_setting_sample_counts():
    from model.evaluation.benchmark import benchmark_setting, synthetic_scene

    image, mask = synthetic_scene(96, 64)
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8 and mask.shape == (64, 96)
    assert 0.1 < mask.mean() < 0.4 and mask[32, 43] == 1 and mask[0, 0] == 0
    predictor = RedPredictor()
    row = benchmark_setting(predictor, (96, 64), "off", repeats=3)
    assert (row.size, row.cfr, row.samples_first, row.samples_later) == ("96x64", "off", 3, 12)
    assert 0 < row.first_p50_ms <= row.first_p90_ms and 0 < row.later_p50_ms <= row.later_p90_ms
    assert row.mean_later_passes == 1.0
    assert predictor.clicks_seen == [1, 2, 3, 4, 5] * 4  # recording session + 3 timed ones


def test_benchmark_times_click_refinement_for_each_click_count():
    from model.evaluation.benchmark import REFINEMENT_CLICK_COUNTS, benchmark_click_refinement, format_refinement_table
    from model.nets.registry import create_model

    predictor = ClickSegPredictor(create_model("effnet-lite", {"input_size": 96}).eval())
    rows = benchmark_click_refinement(predictor, (160, 120), iterations=2, repeats=2)
    assert [r.clicks for r in rows] == list(REFINEMENT_CLICK_COUNTS)
    assert all(r.size == "160x120" and r.samples == 2 and 0 < r.added_p50_ms <= r.added_p90_ms for r in rows)
    assert format_refinement_table(rows, 2).count("160x120") == len(REFINEMENT_CLICK_COUNTS)
