"""The click-selection rule: three objects clicked one after another, with Label Studio resending
every earlier click, with and without their masks accepted, across server restarts.

Runs over real HTTP with a deterministic colour-region predictor (test_server_support), so that
each expected mask is exact.
"""
from __future__ import annotations

import numpy as np
import pytest

from backend import click_selection
from backend.app import create_app
from backend.config import Settings
from backend.payload import BrushRegion, parse_label_config, parse_prompt
from backend.service import ClickSegModel
from test_server_support import (
    API_KEY,
    LABEL_CONFIG,
    ColourRegionPredictor,
    FakeLabelStudio,
    annotation,
    brush_result,
    decode_region,
    draft,
    interactive_task,
    pixel_keypoint,
    png_bytes,
    post,
    predict_body,
    rectangle,
    serve,
    three_object_image,
)

IMAGE, MASKS = three_object_image()
IMAGE_URL = "/data/upload/1/scene.png"

# The clicks, in the order the annotator places them.
A1 = pixel_keypoint(25, 30)          # A: red body
A2 = pixel_keypoint(44, 30)          # A: positive on the strip the first mask missed
B1 = pixel_keypoint(40, 80)          # B: a new object
B2 = pixel_keypoint(65, 80, False)   # B: negative on its cyan part
C1 = pixel_keypoint(125, 45)         # C: a new object
SEQUENCE = [A1, A2, B1, B2, C1]
EXPECTED = ["A_body", "A", "B", "B_core", "C"]  # the mask after each click


@pytest.fixture(scope="module")
def label_studio():
    fake = FakeLabelStudio()
    fake.add(IMAGE_URL, png_bytes(IMAGE))
    with serve(fake) as url:
        yield url


class Backend:
    """A backend server with its own memory (a fresh one models a restart or an evicted session)."""

    def __init__(self, label_studio_url: str):
        settings = Settings.from_env({"LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": API_KEY,
                                      "LOG_LEVEL": "WARNING"})
        self.predictor = ColourRegionPredictor()
        self.app = create_app(settings, ClickSegModel(settings, predictor_factory=lambda: self.predictor))

    def click(self, url: str, context_items, drafts=()) -> dict:
        """POST one interactive request; returns its single brush region."""
        self.predictor.calls.clear()
        body = predict_body([interactive_task(IMAGE_URL, drafts=drafts)], {"result": list(context_items)})
        response = post(f"{url}/predict", body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 1 and len(results[0]["result"]) == 1
        return results[0]["result"][0]


@pytest.fixture
def backend(label_studio):
    backend = Backend(label_studio)
    with serve(backend.app) as url:
        backend.url = url
        yield backend


def fresh_backend_click(label_studio, context_items, drafts=()):
    """The answer of a backend that has never seen this task, and its model calls."""
    backend = Backend(label_studio)
    with serve(backend.app) as url:
        region = backend.click(url, context_items, drafts)
    return region, list(backend.predictor.calls)


def assert_mask(region: dict, name: str) -> None:
    mask = decode_region(region)
    assert mask.shape == (120, 160)
    assert np.array_equal(mask, MASKS[name]), f"expected object {name}, got {mask.sum()} pixels"


def test_three_objects_without_accepting_their_masks(backend):
    regions, calls = [], []
    for n in range(1, len(SEQUENCE) + 1):
        regions.append(backend.click(backend.url, SEQUENCE[:n]))
        calls.append(list(backend.predictor.calls))
    for region, name in zip(regions, EXPECTED):
        assert_mask(region, name)
        assert region["from_name"] == "tag" and region["value"]["brushlabels"] == ["Object"]
    ids = [r["id"] for r in regions]
    assert ids[0] == ids[1] and ids[2] == ids[3] and len({ids[0], ids[2], ids[4]}) == 3
    # (clicks, previous mask fed back) of each model call:
    assert calls[0] == [(1, False)]                 # A1 starts A
    assert calls[1] == [(1, False), (2, True)]      # A2 alone overlaps A -> refine A with feedback
    assert calls[2] == [(1, False)]                 # B1 alone is disjoint from A -> new object, no rerun
    assert calls[3] == [(2, True)]                  # B2 negative refines B with feedback
    assert calls[4] == [(1, False)]                 # C1 starts C


def test_three_objects_with_masks_accepted_into_the_draft(backend):
    """The annotator accepts each finished mask; Label Studio saves it in the draft, keypoints kept."""
    accepted = []
    for n, name in enumerate(EXPECTED, start=1):
        region = backend.click(backend.url, SEQUENCE[:n], drafts=[draft(accepted)] if accepted else [])
        assert_mask(region, name)
        if name in ("A", "B_core"):  # object finished: accept its mask
            accepted.append(brush_result(decode_region(region), region["id"]))
    assert len(accepted) == 2


def test_accepted_masks_select_the_object_without_any_memory(label_studio):
    accepted = [draft([brush_result(MASKS["A"], "a-region"), brush_result(MASKS["B_core"], "b-region")])]
    region, calls = fresh_backend_click(label_studio, SEQUENCE, drafts=accepted)
    assert_mask(region, "C")
    assert calls == [(1, False)]  # everything before C1 is known finished: no replay


def test_a_submitted_annotation_finishes_objects_like_a_draft(label_studio):
    saved = [annotation([brush_result(MASKS["A"], "ann-a")])]
    body_items = [A1, A2, B1, B2]
    backend = Backend(label_studio)
    with serve(backend.app) as url:
        body = predict_body([interactive_task(IMAGE_URL, annotations=saved)], {"result": body_items})
        region = post(f"{url}/predict", body).json()["results"][0]["result"][0]
    assert_mask(region, "B_core")
    assert backend.predictor.calls == [(1, False), (2, True)]  # only B's clicks were applied


@pytest.mark.parametrize("n, name", [(4, "B_core"), (5, "C")])
def test_a_restarted_server_replays_the_clicks_to_the_same_object(label_studio, n, name):
    region, calls = fresh_backend_click(label_studio, SEQUENCE[:n])
    assert_mask(region, name)
    assert len(calls) == {4: 5, 5: 6}[n]


def test_deleting_a_click_replays_from_the_last_unchanged_object(backend):
    for n in range(1, 5):
        backend.click(backend.url, SEQUENCE[:n])
    # The annotator deletes B2, then clicks C1: B restarts from B1, then C1 starts C.
    region = backend.click(backend.url, [A1, A2, B1, C1])
    assert_mask(region, "C")
    assert backend.predictor.calls == [(1, False), (1, False)]


def test_the_same_request_twice_is_answered_from_memory(backend):
    first = backend.click(backend.url, [A1, A2])
    again = backend.click(backend.url, [A1, A2])
    assert again == first and backend.predictor.calls == []


def test_an_auto_accepted_mask_of_the_object_being_refined_does_not_finish_it(backend):
    first = backend.click(backend.url, [A1])
    in_draft = [draft([brush_result(decode_region(first), first["id"])])]
    second = backend.click(backend.url, [A1, A2], drafts=in_draft)
    assert_mask(second, "A")
    assert second["id"] == first["id"]  # the same region is refined, not a new one started at A2
    assert backend.predictor.calls == [(1, False), (2, True)]


def test_a_box_prompt_gives_a_mask_cropped_to_the_box(backend):
    region = backend.click(backend.url, [rectangle(100, 20, 150, 70)])
    assert_mask(region, "C")
    region = backend.click(backend.url, [rectangle(100, 20, 150, 70), rectangle(20, 60, 65, 100)])
    expected = MASKS["B"].copy()
    expected[:, 65:] = False  # B's cyan part sticks out of the box
    assert np.array_equal(decode_region(region), expected)


def test_saved_masks_are_decoded_once_per_task(backend, monkeypatch):
    decoded = []
    real = click_selection.rle_to_mask
    monkeypatch.setattr(click_selection, "rle_to_mask", lambda *args: decoded.append(args[1:]) or real(*args))
    accepted = [draft([brush_result(MASKS["A"], "a-region"), brush_result(MASKS["B_core"], "b-region")])]
    assert_mask(backend.click(backend.url, SEQUENCE[:4], drafts=accepted), "B_core")
    assert_mask(backend.click(backend.url, SEQUENCE[:5], drafts=accepted), "C")
    assert decoded == [(120, 160), (120, 160)]


def test_region_cache_forgets_regions_the_task_no_longer_has():
    regions = [BrushRegion(name, 160, 120, tuple(brush_result(MASKS[name], name)["value"]["rle"]))
               for name in ("A", "C")]
    cache = {}
    first = click_selection.RegionMasks(regions, cache)
    assert first.contains(prompt(A1), set()) and not first.contains(prompt(B1), set())
    assert first.contains(prompt(C1), set()) and not first.contains(prompt(C1), {"C"})
    for name, mask in cache.items():  # bit-packed inside the region's bounding box
        rows, cols = np.nonzero(MASKS[name[0]])
        assert mask.box == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
        assert mask.nbytes == -(-((mask.box[1] - mask.box[0]) * (mask.box[3] - mask.box[2])) // 8)
        assert np.array_equal(mask.crop(), MASKS[name[0]][mask.slices])
    assert len(cache) == 2
    second = click_selection.RegionMasks(regions[:1], cache)
    second.prune()
    assert [key[0] for key in cache] == ["A"]


def prompt(item):
    return parse_prompt(item, parse_label_config(LABEL_CONFIG), "item")
