"""A real browser (Debian's chromium, headless, driven by Playwright) annotating in Label Studio's editor.

Log in, open the task, turn on Auto-Annotation (Auto-Accept off, the README's workflow), pick the
smart keypoint tool and click on the object; the brush mask comes back as a suggestion. Alt+click
is the editor's negative click (``negative: dynamic && altKey`` in its KeyPoint tool); it refines
the suggestion. Accept it with ✓, submit, and read the annotation back through the API.
Screenshots go to ``artifacts/e2e/browser-*.png``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import pytest

from e2e_harness import LabelStudio, unavailable
from e2e_helpers import (
    brush_region,
    connect_backend,
    create_project,
    decode_brush,
    readme_label_config,
    synthetic_scene,
    upload_image,
    wait_for,
)

pytestmark = pytest.mark.labelstudio

CHROMIUM = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PAGE_TIMEOUT_MS = int(os.environ.get("E2E_PAGE_TIMEOUT_MS", "120000"))  # the editor's first load on a busy 2-core machine
KEYPOINT_LABELS_INDEX = 1  # label blocks in config order: BrushLabels, KeyPointLabels, RectangleLabels


@pytest.fixture
def page(artifacts, tmp_path) -> Iterator[Any]:
    """A fresh headless chromium page (new profile), console messages logged to the artifacts."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the browser test needs Playwright for Python (pip install playwright; the browser is "
                    "Debian's chromium, never `playwright install`)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        unavailable(f"no chromium at {CHROMIUM} (apt-get install -y chromium, or set CHROMIUM)")
    console = open(artifacts / "browser-console.log", "a")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
            service_workers="block")  # Label Studio registers one; requests it served would be invisible here
        try:
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.on("console", lambda message: console.write(f"{message.type}: {message.text}\n"))
            page.on("pageerror", lambda error: console.write(f"pageerror: {error}\n"))
            yield page
        finally:
            context.close()
            console.close()


def log_in(page, label_studio: LabelStudio) -> None:
    page.goto(f"{label_studio.url}/user/login/")
    page.fill("input[name=email]", label_studio.credentials.username)
    page.fill("input[name=password]", label_studio.credentials.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url)


def set_toggle(page, test_id: str, on: bool) -> None:
    """Set a bottom-bar toggle; the editor ignores clicks until it has loaded the project's ML backend."""
    toggle = page.locator(f"[data-testid={test_id}]")
    toggle.wait_for(state="attached")
    for _ in range(40):
        if toggle.is_checked() == on:
            return
        toggle.click(force=True)
        page.wait_for_timeout(500)
    raise AssertionError(f"the editor's {test_id} did not turn {'on' if on else 'off'}")


def open_in_editor(page, label_studio: LabelStudio, project_id: int, task_id: int, auto_accept: bool) -> None:
    """Log in, open the task in the editor, Auto-Annotation on, Auto-Accept as asked."""
    log_in(page, label_studio)
    page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
    page.locator(".konvajs-content").first.wait_for()
    page.wait_for_load_state("networkidle")
    set_toggle(page, "bottombar-auto-annotation-toggle", True)
    set_toggle(page, "bottombar-auto-accept-toggle", auto_accept)


def choose_smart_keypoint(page) -> None:
    """The smart tools share one toolbar button that cycles through them; then select the keypoint label."""
    smart_keypoint = page.locator("button[aria-label=key-point-tool].lsf-tool_smart.lsf-tool_active")
    for _ in range(6):
        if smart_keypoint.count():
            break
        page.locator("button.lsf-tool_smart:not([aria-label])").click()
        page.wait_for_timeout(300)
    assert smart_keypoint.count() == 1, "the smart keypoint tool could not be selected"
    label = page.locator(".lsf-labels").nth(KEYPOINT_LABELS_INDEX).locator(".lsf-label").first
    if "lsf-label_selected" not in (label.get_attribute("class") or ""):
        label.click()


def click_image(page, scene, row: float, col: float, negative: bool = False) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Click pixel (row, col) of the image; returns (the context the editor sent, Label Studio's answer)."""
    choose_smart_keypoint(page)
    stage = page.locator(".konvajs-content").first.bounding_box()
    assert abs(stage["width"] / stage["height"] - scene.width / scene.height) < 0.01, \
        f"the image is not shown whole and unzoomed: stage {stage}"
    x = stage["x"] + (col + 0.5) / scene.width * stage["width"]
    y = stage["y"] + (row + 0.5) / scene.height * stage["height"]
    with page.expect_response(lambda r: "/interactive-annotating" in r.url, timeout=PAGE_TIMEOUT_MS) as answer:
        if negative:
            page.keyboard.down("Alt")
        page.mouse.click(x, y)
        if negative:
            page.keyboard.up("Alt")
    response = answer.value
    assert response.status == 200, response.text()
    return json.loads(response.request.post_data)["context"], response.json()


def test_a_click_in_the_editor_segments_the_object_and_a_negative_click_refines_it(
        label_studio, backend, page, artifacts, model_trained):
    scene = synthetic_scene(seed=4)
    project = create_project(label_studio, "e2e browser", readme_label_config())
    connect_backend(label_studio, project, backend.url, "clickseg (browser)")
    task_id, _ = upload_image(label_studio, project, scene)

    open_in_editor(page, label_studio, project.id, task_id, auto_accept=False)

    # A positive click on the object.
    row, col = scene.centre
    context, answer = click_image(page, scene, row, col)
    (click,) = context["result"]
    assert click["type"] == "keypointlabels" and click["is_positive"] is True
    assert abs(click["value"]["x"] - (col + 0.5) / scene.width * 100) < 1
    assert abs(click["value"]["y"] - (row + 0.5) / scene.height * 100) < 1
    first = brush_region(answer)
    assert answer["data"]["model_version"] == backend.model_version
    first_mask = decode_brush(first)
    assert first_mask.shape == (scene.height, scene.width) and first_mask.any()
    page.locator("[data-testid=bottombar-accept-suggestions-button]").wait_for(state="visible")
    page.screenshot(path=str(artifacts / "browser-1-positive-click.png"))

    # Alt+click: a negative click on the object's rim, inside the first mask.
    negative_row, negative_col = row, min(col + int(0.7 * scene.radius), scene.width - 1)
    assert first_mask[negative_row, negative_col], "the negative click should fall inside the first mask"
    context, answer = click_image(page, scene, negative_row, negative_col, negative=True)
    assert [c["is_positive"] for c in context["result"]] == [True, False]
    second = brush_region(answer)
    assert answer["data"]["model_version"] == backend.model_version
    second_mask = decode_brush(second)
    assert second["id"] == first["id"], "refining an object keeps its region id"
    if model_trained:
        assert not np.array_equal(second_mask, first_mask), "the negative click did not change the mask"
        assert not second_mask[negative_row, negative_col], "the negatively clicked pixel is still in the mask"
    else:  # an untrained head may threshold to the same mask: the region must still be recomputed
        assert not np.array_equal(second_mask, first_mask) or second["score"] != first["score"], \
            "the negative click did not change the region"
    page.screenshot(path=str(artifacts / "browser-2-negative-click.png"))

    # Accept the suggestion, submit, and find the mask in the annotation Label Studio stored.
    page.locator("[data-testid=bottombar-accept-suggestions-button]").click()
    page.locator("[data-testid=bottombar-submit-button]").click()
    annotations = wait_for(lambda: label_studio.api("GET", f"/api/tasks/{task_id}/annotations").json(), 60,
                           f"the submitted annotation of task {task_id}")
    page.screenshot(path=str(artifacts / "browser-3-submitted.png"))
    brushes = [r for r in annotations[0]["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 1, annotations[0]["result"]
    assert np.array_equal(decode_brush(brushes[0]), second_mask)
