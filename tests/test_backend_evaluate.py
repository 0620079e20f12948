"""``backend.evaluate``: the standard clicker through ``/predict`` gives the model's own numbers."""
from __future__ import annotations

import numpy as np
import pytest

from backend import evaluate as protocol
from model.clicks import Click
from model.data import ObjectSample
from model.evaluation.benchmark import synthetic_scene
from model.evaluation.evaluate import evaluate_objects
from model.predictor import DEFAULT_CHECKPOINT, ClickSegPredictor


@pytest.fixture(scope="module")
def objects():
    image, labels = synthetic_scene(200, 150, seed=3, objects=4)
    return [ObjectSample(image, (labels == k).astype(np.uint8), f"blob{k}", "scene") for k in range(1, 4)]


def test_a_keypoint_lands_on_the_clicked_pixel():
    from model.transforms import continuous_to_click

    item = protocol.keypoint_item(Click(37.0, 141.0, False), 150, 200, "k")
    click = continuous_to_click(item["value"]["x"] / 100 * 200, item["value"]["y"] / 100 * 150, 150, 200, item["is_positive"])
    assert (click.y, click.x, click.is_positive) == pytest.approx((37.0, 141.0, False))


@pytest.mark.slow
def test_the_product_matches_the_model_click_by_click(tmp_path, objects):
    model = evaluate_objects(ClickSegPredictor.from_checkpoint(DEFAULT_CHECKPOINT, device="cpu", cfr_steps=2),
                             objects, max_clicks=4)
    post, image_url = protocol.wsgi_target({"MODEL_DIR": str(tmp_path), "LOG_LEVEL": "WARNING", "DEVICE": "cpu",
                                            "CFR_STEPS": "2", "RECALL": "false"})
    product = protocol.evaluate_through_protocol(post, objects, image_url, max_clicks=4)
    for ours, theirs in zip(product.objects, model.objects):
        assert ours.clicks == theirs.clicks
        assert ours.ious == pytest.approx(theirs.ious, abs=1e-3)
        assert ours.first_click == pytest.approx(theirs.first_click, abs=1e-3)
    for key in ("noc@85", "noc@90", "noc@95"):
        assert product.summary()[key] == model.summary()[key]


def test_a_multi_object_scene_gives_each_object_its_own_region(tmp_path, objects):
    regions = []
    post, image_url = protocol.wsgi_target({"MODEL_DIR": str(tmp_path), "LOG_LEVEL": "WARNING", "DEVICE": "cpu"})

    def recording_post(body):
        answer = post(body)
        regions.append((len(body["params"]["context"]["result"]), answer["results"][0]["result"][0]["id"]))
        return answer

    result = protocol.evaluate_scenes(recording_post, objects, image_url, max_clicks=3, accept_iou=0.5)
    assert len(result.objects) == 3
    starts = []
    for prompts, region_id in regions:
        if prompts == 1:  # ✓ deleted the keypoints: the object's first click
            starts.append(region_id)
        else:  # every later click refines the object its first click started
            assert region_id == starts[-1]
    assert len(starts) == 3 and len(set(starts)) == 3


def test_a_scene_needs_three_objects_on_one_image(tmp_path, objects):
    post, image_url = protocol.wsgi_target({"MODEL_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"})
    with pytest.raises(ValueError, match="3 objects"):
        protocol.evaluate_scenes(post, objects[:2], image_url)


def test_a_keypoint_near_a_pixel_centre_is_snapped_to_it():
    """Percent coordinates carry float noise; the model must see the clicked pixel itself."""
    from model.transforms import continuous_to_click

    for col in range(0, 481):
        x = (col + 0.5) / 481 * 100 / 100 * 481
        assert continuous_to_click(x, x, 481, 481, True).x == float(col)
    assert continuous_to_click(10.75, 3.5, 20, 20, True).x == 10.25  # a click off the centre stays where it is


def test_the_product_table_shows_the_baseline_beside_it(tmp_path, objects, capsys):
    from PIL import Image

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    Image.fromarray(objects[0].image).save(tmp_path / "data" / "images" / "scene.png")
    Image.fromarray(objects[0].mask * 255).save(tmp_path / "data" / "masks" / "scene_1.png")
    args = ["--dataset", f"folder:{tmp_path / 'data'}", "--max-clicks", "2", "--out-dir", str(tmp_path / "out"),
            "--baseline", "grabcut"]
    assert protocol.main(args) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["product", "grabcut"]
    assert "vs the baseline's" in out
    with pytest.raises(SystemExit, match="does not apply to --multi-object"):
        protocol.main(args + ["--multi-object"])


@pytest.mark.parametrize("extra, message", [
    (["--click-refinement", "-1"], "--click-refinement must be >= 0"),
    (["--cfr-steps", "-2"], "--cfr-steps must be >= 0"),
    (["--click-refinement", "5", "--backend-url", "http://127.0.0.1:9", "--local-files-root", "."],
     "a running backend .* has its own CFR_STEPS and CLICK_REFINEMENT"),
    (["--all-components", "--backend-url", "http://127.0.0.1:9", "--local-files-root", "."],
     "a running backend .* has its own CLICKED_COMPONENTS_ONLY"),
])
def test_predictor_flags_are_checked_before_any_work(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        protocol.main(["--dataset", "folder:/nonexistent", "--out-dir", str(tmp_path)] + extra)
