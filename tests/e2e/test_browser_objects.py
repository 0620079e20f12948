"""Three objects annotated in a real browser, with Auto-Accept off and on (every click refines its object).

Headless chromium (Playwright) in Label Studio 1.23.2's editor, on an image with three
objects in two parts each. For each object: a positive click on one lobe, a second positive click in
the part the mask missed (the other part, or the largest missed part), a negative click on the
largest false part (or just outside the mask), then ✓ (Auto-Accept off). Then submit and read the
annotation back through the API: three brush regions, each as good as the model alone on the
same clicks. With Auto-Accept on, the lone-click contexts and what the editor then does are
measured on one object.

What the editor sends is recorded to ``artifacts/e2e/editor-calls-<mode>.json`` (the context of
every click and what the backend logged about the task it received); screenshots go to
``artifacts/e2e/objects-<mode>-*.png``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from scipy import ndimage

from e2e_helpers import ImageScene, brush_regions, connect_backend, create_project, decode_brush, iou, readme_label_config, wait_for
from e2e_harness import LabelStudio, start_backend, stop_process
from test_browser import click_image, open_in_editor, page  # noqa: F401 (page is a fixture)

pytestmark = pytest.mark.labelstudio

IOU_SLACK = 0.02  # the editor's percent coordinates may move a click by a fraction of a pixel


@dataclass(frozen=True)
class ObjectsScene(ImageScene):
    """Three objects of two parts each on a textured background; ``labels`` (H, W) int, 0 = background, k = object k."""

    image: np.ndarray
    labels: np.ndarray
    lobes: Tuple[Tuple[Tuple[int, int], Tuple[int, int]], ...]  # per object: (row, col) of its two lobe centres


def objects_scene(seed: int = 7, height: int = 300, width: int = 480) -> ObjectsScene:
    """Each object: two disks of two hues with a gap of about 19 px (a first click may get one part), far from the others."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([70 + 30 * np.sin(cols / 9.0), 95 + 25 * np.sin((rows + cols) / 17.0),
                      60 + 20 * np.cos(rows / 7.0)], axis=2) + rng.normal(0, 10, (height, width, 3))
    labels = np.zeros((height, width), np.int32)
    colours = [((245, 120, 20), (230, 200, 40)), ((40, 90, 235), (150, 60, 220)), ((235, 40, 60), (240, 140, 170))]
    lobes = []
    for k, (col, (c1, c2)) in enumerate(zip((90, 240, 390), colours), start=1):
        a, b = (110, col - 18), (185, col + 18)
        for centre, colour, radius in ((a, c1, 34), (b, c2, 30)):
            disk = np.hypot(rows - centre[0], cols - centre[1]) <= radius
            image[disk] = np.asarray(colour, np.float32) + rng.normal(0, 6, (int(disk.sum()), 3))
            labels[disk] = k
        lobes.append((a, b))
    return ObjectsScene(np.clip(image, 0, 255).astype(np.uint8), labels, tuple(lobes))


def error_centre(mask: np.ndarray, region: np.ndarray) -> Tuple[int, int] | None:
    """(row, col) of the interior-most pixel of the largest component of ``region`` (None if empty)."""
    components, count = ndimage.label(region)
    if count == 0:
        return None
    largest = 1 + int(np.argmax(ndimage.sum(region, components, range(1, count + 1))))
    distance = ndimage.distance_transform_edt(np.pad(components == largest, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row), int(col)


def beside(mask: np.ndarray, start: Tuple[int, int], gap: int = 8) -> Tuple[int, int]:
    """A background pixel ``gap`` pixels left of where ``mask`` ends on ``start``'s row (left of ``start``)."""
    row, col = start
    while col > 0 and mask[row, col]:
        col -= 1
    return row, max(0, col - gap)


def model_alone_iou(checkpoint, scene: ObjectsScene, sent: List[Dict[str, Any]], gt: np.ndarray) -> float:
    """IoU of the served model, run in-process on the clicks the editor sent (percent), with mask feedback."""
    from model.clicks import MASK_THRESHOLD
    from model.predictor import ClickSegPredictor
    from model.transforms import continuous_to_click

    predictor = ClickSegPredictor.from_checkpoint(checkpoint, device="cpu")
    state = predictor.encode_image(scene.image)
    made, prob = [], None
    for item in sent:
        x, y = item["x"] / 100 * scene.width, item["y"] / 100 * scene.height
        made.append(continuous_to_click(x, y, scene.height, scene.width, item["is_positive"] is not False))
        prob = predictor.predict(state, made, prev_mask=prob)
    return iou(prob >= MASK_THRESHOLD, gt)


@pytest.fixture(scope="module")
def plain_backend(label_studio, e2e_checkpoint, artifacts, tmp_path_factory):
    """A backend without exemplar recall, so each answer holds the clicked object's region alone."""
    backend = start_backend("objects", label_studio.url, label_studio.legacy_token, tmp_path_factory.mktemp("objects"),
                            e2e_checkpoint, artifacts / "backend-objects.log", extra_env={"RECALL": "false"})
    try:
        yield backend
    finally:
        stop_process(backend.process)


def upload(label_studio: LabelStudio, project, scene: ObjectsScene) -> int:
    body = label_studio.api("POST", f"/api/projects/{project.id}/import?return_task_ids=true",
                            files={"file": ("objects.png", scene.png(), "image/png")}).json()
    return body["task_ids"][0]


def accept(page) -> None:
    button = page.locator("[data-testid=bottombar-accept-suggestions-button]")
    button.wait_for(state="visible")
    button.click()
    button.wait_for(state="hidden")


def open_task(page, label_studio, plain_backend, artifacts, auto_accept: bool):  # noqa: F811
    """A new project with the three-object image, its task open in the editor; returns (scene, task id)."""
    mode = "on" if auto_accept else "off"
    scene = objects_scene()
    project = create_project(label_studio, f"e2e three objects, auto-accept {mode}", readme_label_config())
    connect_backend(label_studio, project, plain_backend.url, f"clickseg (objects, {mode})")
    task_id = upload(label_studio, project, scene)

    open_in_editor(page, label_studio, project.id, task_id, auto_accept)
    return scene, task_id


def test_three_objects_each_refined_by_its_clicks(label_studio, plain_backend, page, artifacts, e2e_checkpoint,  # noqa: F811
                                                  model_trained):
    auto_accept, mode = False, "off"
    scene, task_id = open_task(page, label_studio, plain_backend, artifacts, auto_accept)

    calls: List[Dict[str, Any]] = []
    final: Dict[int, Dict[str, Any]] = {}
    sent_of: Dict[int, List[Dict[str, Any]]] = {}  # per object: the keypoints the editor sent, in order

    def click(k: int, row: int, col: int, positive: bool) -> np.ndarray:
        context, answer = click_image(page, scene, row, col, negative=not positive)
        region = brush_regions(answer)[0]  # the object's region comes first (proposals follow)
        sent = [{"x": r["value"]["x"], "y": r["value"]["y"], "is_positive": r.get("is_positive")}
                for r in context["result"]]
        mask = decode_brush(region)
        calls.append({"object": k, "click": [row, col, positive], "context": sent,
                      "answer_region_ids": [r["id"] for r in brush_regions(answer)],
                      "iou": iou(mask, scene.labels == k)})
        sent_of.setdefault(k, []).append(sent[-1])
        final[k] = region
        return mask

    for k, (lobe_a, lobe_b) in enumerate(scene.lobes, start=1):
        gt = scene.labels == k
        mask = click(k, *lobe_a, True)
        missed = error_centre(mask, gt & ~mask)
        second = missed if missed is not None else lobe_b
        mask = click(k, *second, True)
        false = error_centre(mask, mask & ~gt)
        if false is None:
            false = beside(mask, lobe_a)
        click(k, *false, False)
        page.screenshot(path=str(artifacts / f"objects-{mode}-{k}.png"))
        if not auto_accept:
            accept(page)

    page.locator("[data-testid=bottombar-submit-button]").click()
    annotations = wait_for(lambda: label_studio.api("GET", f"/api/tasks/{task_id}/annotations").json(), 60,
                           f"the submitted annotation of task {task_id}")
    page.screenshot(path=str(artifacts / f"objects-{mode}-submitted.png"))
    received = [r for r in plain_backend.log_records() if r.get("message") == "interactive prediction"
                and r.get("task") == task_id]
    (artifacts / f"editor-calls-{mode}.json").write_text(json.dumps({"calls": calls, "backend": received}, indent=1))
    # What the editor sends: with Auto-Accept off it keeps the object's keypoints until ✓, on it keeps none.
    assert [len(c["context"]) for c in calls] == ([1, 2, 3] * 3 if not auto_accept else [1] * 9), calls

    brushes = [r for r in annotations[0]["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 3, f"expected one brush region per object, got {[b['id'] for b in brushes]}"
    submitted = {b["id"]: decode_brush(b) for b in brushes}
    for k in (1, 2, 3):
        assert final[k]["id"] in submitted, f"object {k}'s region {final[k]['id']} is not in the annotation"
        gt = scene.labels == k
        got = iou(submitted[final[k]["id"]], gt)
        alone = model_alone_iou(e2e_checkpoint, scene, sent_of[k], gt)
        if model_trained:
            assert got >= alone - IOU_SLACK, f"object {k}: IoU {got:.3f} through the editor, {alone:.3f} model alone"


def test_auto_accept_on_sends_lone_clicks_that_refine_the_object(label_studio, plain_backend, page, artifacts):  # noqa: F811
    """Auto-Accept on: the editor deletes the keypoints after every answer, so each request holds one.

    The second lone click refines the same region (rule 3): a positive click in the part the first
    mask missed, or, where the first mask got the whole object (better models do on this scene), a
    negative click in the background beside it. Label Studio 1.23.2's editor then creates no
    keypoint for any further click on the task (its console logs mobx-state-tree "no longer part of
    a state tree" errors for the replaced region): measured here, so that the README's advice
    (Auto-Accept off) is re-checked when Label Studio changes.
    """
    scene, task_id = open_task(page, label_studio, plain_backend, artifacts, auto_accept=True)
    # Object 2: its two hues are far apart, so a first click may get one part. A click on or right
    # beside a region selects that region in the editor instead of placing a keypoint: every
    # second click here is at least 4 px from the first mask.
    lobe_a, lobe_b = scene.lobes[1]
    gt = scene.labels == 2
    context, answer = click_image(page, scene, *lobe_a)
    first = brush_regions(answer)[0]
    first_mask = decode_brush(first)
    missed = error_centre(first_mask, gt & ~first_mask)
    if missed is not None and ndimage.distance_transform_edt(~first_mask)[missed] >= 4:
        second_context, answer = click_image(page, scene, *missed)
    else:
        second_context, answer = click_image(page, scene, *beside(first_mask, lobe_a), negative=True)
    second = brush_regions(answer)[0]
    page.screenshot(path=str(artifacts / "objects-on-2-clicks.png"))
    assert len(context["result"]) == 1 and len(second_context["result"]) == 1, "the editor kept keypoints"
    assert second["id"] == first["id"], "the click in the missed part started a new object"
    logged = [r for r in plain_backend.log_records() if r.get("message") == "interactive prediction"
              and r.get("task") == task_id]
    assert [r["object_clicks"] for r in logged] == [1, 2]

    with pytest.raises(Exception, match="Timeout"):  # the editor's limitation; see the docstring
        with page.expect_response(lambda r: "/interactive-annotating" in r.url, timeout=20_000):
            page.mouse.click(*canvas_point(page, scene, *lobe_b))


def canvas_point(page, scene, row: int, col: int) -> Tuple[float, float]:
    stage = page.locator(".konvajs-content").first.bounding_box()
    return (stage["x"] + (col + 0.5) / scene.width * stage["width"],
            stage["y"] + (row + 0.5) / scene.height * stage["height"])
