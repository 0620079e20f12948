import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.clicked_components import UNCLICKED_PROB, keep_clicked_components
from model.clicks import MASK_THRESHOLD, Click
from model.evaluation.evaluate import main as evaluate_main
from model.nets.registry import create_model
from model.predictor import ClickSegPredictor


def two_blobs(size=40):
    prob = torch.full((1, 1, size, size), 0.1)
    prob[0, 0, 5:15, 5:15] = 0.9
    prob[0, 0, 25:35, 25:35] = 0.8
    return prob


def test_a_part_without_a_positive_click_drops_just_below_the_threshold():
    prob = two_blobs()
    kept = keep_clicked_components(prob, [Click(10, 10)])
    assert torch.equal(kept[0, 0, 5:15, 5:15], prob[0, 0, 5:15, 5:15])
    assert (kept[0, 0, 25:35, 25:35] == UNCLICKED_PROB).all() and UNCLICKED_PROB < MASK_THRESHOLD
    assert torch.equal(kept[prob <= MASK_THRESHOLD], prob[prob <= MASK_THRESHOLD])  # the background is untouched


def test_every_part_with_a_positive_click_is_kept():
    prob = two_blobs()
    assert torch.equal(keep_clicked_components(prob, [Click(10, 10), Click(30, 30)]), prob)


def test_a_negative_click_keeps_nothing():
    kept = keep_clicked_components(two_blobs(), [Click(10, 10), Click(30, 30, False)])
    assert (kept[0, 0, 25:35, 25:35] < MASK_THRESHOLD).all()


def test_parts_touching_at_a_corner_are_one_part():
    prob = torch.full((1, 1, 10, 10), 0.1)
    prob[0, 0, 2, 2] = prob[0, 0, 3, 3] = 0.9
    prob[0, 0, 8, 8] = 0.9
    kept = keep_clicked_components(prob, [Click(2, 2)])
    assert kept[0, 0, 3, 3] == pytest.approx(0.9) and kept[0, 0, 8, 8] < MASK_THRESHOLD


@pytest.mark.parametrize("clicks", [
    [Click(20, 20)],  # a positive click off the mask (contradicted)
    [Click(20, 20, False)],  # negative clicks only
])
def test_without_a_positive_click_on_the_mask_the_map_is_unchanged(clicks):
    prob = two_blobs()
    assert keep_clicked_components(prob, clicks) is prob


def test_a_click_outside_the_map_reads_the_nearest_pixel():
    prob = two_blobs()
    prob[0, 0, 37:, 37:] = 0.7  # a third part, in the corner
    kept = keep_clicked_components(prob, [Click(45.0, 44.0)])  # reads (39, 39)
    assert torch.equal(kept[0, 0, 37:, 37:], prob[0, 0, 37:, 37:])
    assert (kept[0, 0, 5:15, 5:15] < MASK_THRESHOLD).all() and (kept[0, 0, 25:35, 25:35] < MASK_THRESHOLD).all()


@pytest.mark.parametrize("on", [True, False])
def test_the_predictor_keeps_clicked_parts_in_its_working_frame_from_the_first_click(monkeypatch, on):
    calls = []

    def recording(prob, clicks):
        calls.append((tuple(prob.shape), clicks))
        return torch.zeros_like(prob)

    monkeypatch.setattr("model.predictor.keep_clicked_components", recording)
    torch.manual_seed(0)
    net = create_model("effnet-lite", {"input_size": 96}).eval()
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    predictor = ClickSegPredictor(net, clicked_components_only=on, click_refinement_iterations=0, max_working_side=40)
    first = predictor.predict(image, [Click(30, 40)])
    second = predictor.predict(image, [Click(30, 40), Click(9.5, 11.5, False)], prev_mask=first)
    if not on:
        assert calls == [] and first.any()
        return
    assert not first.any() and not second.any()  # what predict answers is the kept map
    assert [shape for shape, _ in calls] == [(1, 1, 32, 40)] * 2  # the working frame, half the image
    assert [(c.y, c.x, c.is_positive) for c in calls[1][1]] == [(14.75, 19.75, True), (4.5, 5.5, False)]
    assert predictor.predict(image, [Click(30, 40)], clicked_components_only=False).any()  # a per-call override
    assert len(calls) == 2


def test_evaluate_records_the_option_and_all_components_turns_it_off(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    image = np.full((96, 128, 3), 30, np.uint8)
    image[20:60, 10:50] = image[20:60, 78:118] = 220
    gt = np.zeros(image.shape[:2], np.uint8)
    gt[20:60, 10:50] = 255
    Image.fromarray(image).save(tmp_path / "data" / "images" / "squares.png")
    Image.fromarray(gt).save(tmp_path / "data" / "masks" / "squares_1.png")
    common = ["--dataset", f"folder:{tmp_path / 'data'}", "--max-clicks", "1", "--out-dir", str(tmp_path / "out")]
    assert evaluate_main(common + ["--label", "clicked"]) == 0
    assert evaluate_main(common + ["--label", "all", "--all-components"]) == 0
    runs = {label: json.loads((tmp_path / "out" / f"{label}.json").read_text()) for label in ("clicked", "all")}
    assert runs["clicked"]["settings"]["predictor_options"]["clicked_components_only"] is True
    assert runs["all"]["settings"]["predictor_options"]["clicked_components_only"] is False
