"""The click-selection rule, with contexts shaped as Label Studio 1.23.2's editor sends them:
with Auto-Accept off the editor keeps every smart keypoint of the label until ✓ / ✗ deletes them
all; with Auto-Accept on it deletes them after every answer (each request holds one keypoint).

Runs over real HTTP with a deterministic colour-region predictor (support.py), so that
each expected mask is exact.
"""
from __future__ import annotations

import numpy as np
import pytest
from support import (API_KEY, LABEL_CONFIG, ColourRegionPredictor, FakeLabelStudio, annotation, brush_result,
                     decode_region, draft, interactive_task, pixel_keypoint, png_bytes, post, predict_body, rectangle,
                     serve, three_object_image)

from backend import click_selection
from backend.app import create_app
from backend.config import Settings
from backend.exemplars import Exemplar
from backend.payload import parse_label_config, parse_prompt
from backend.service import ClickSegModel

IMAGE, MASKS = three_object_image()
TWO_LABEL_CONFIG = LABEL_CONFIG.replace('<Label value="Object" background="#FF0000"/>',
                                        '<Label value="Object" background="#FF0000"/><Label value="Other"/>').replace(
    '<Label value="Object" smart="true" background="#FF0000"/>',
    '<Label value="Object" smart="true" background="#FF0000"/><Label value="Other" smart="true"/>')
IMAGE_URL = "/data/upload/1/scene.png"

# The clicks, in the order the annotator places them.
A1 = pixel_keypoint(25, 30)          # A: red body
A2 = pixel_keypoint(44, 30)          # A: positive on the strip the first mask missed (outside that mask)
B1 = pixel_keypoint(40, 80)          # B: the next object
B2 = pixel_keypoint(65, 80, False)   # B: negative on its cyan part
C1 = pixel_keypoint(125, 45)         # C: the next object
# Auto-Accept off: the contexts of each click, ✓ between objects (it deletes the keypoints).
ACCEPT_OFF = [[A1], [A1, A2], [B1], [B1, B2], [C1]]
EXPECTED = ["A_body", "A", "B", "B_core", "C"]  # the mask after each click
SEQUENCE = [A1, A2, B1, B2, C1]  # every click, as an editor that never deletes keypoints would send them

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

    def click(self, url: str, context_items, drafts=(), label_config=LABEL_CONFIG) -> dict:
        """POST one interactive request; returns its single brush region."""
        self.predictor.calls.clear()
        body = predict_body([interactive_task(IMAGE_URL, drafts=drafts)], {"result": list(context_items)})
        body["label_config"] = label_config
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
    assert_mask_of(region, MASKS[name], name)


def assert_mask_of(region: dict, expected: np.ndarray, name: str = "the expected mask") -> None:
    mask = decode_region(region)
    assert mask.shape == (120, 160)
    assert np.array_equal(mask, expected), f"expected {name} ({expected.sum()} pixels), got {mask.sum()} pixels"


def test_three_objects_accepted_with_the_check_mark(backend):
    regions, calls = [], []
    for context in ACCEPT_OFF:
        regions.append(backend.click(backend.url, context))
        calls.append(list(backend.predictor.calls))
    for region, name in zip(regions, EXPECTED):
        assert_mask(region, name)
        assert region["from_name"] == "tag" and region["value"]["brushlabels"] == ["Object"]
    ids = [r["id"] for r in regions]
    assert ids[0] == ids[1] and ids[2] == ids[3] and len({ids[0], ids[2], ids[4]}) == 3
    # (clicks, previous mask fed back) of each model call: one per click, never a guess from a mask
    assert calls == [[(1, False)], [(2, True)], [(1, False)], [(2, True)], [(1, False)]]


def test_a_click_in_a_missed_part_refines_the_object_wherever_it_lies(backend):
    """Without ✓ (no signal), every click refines the current object, even one on another object."""
    backend.click(backend.url, [A1])
    region = backend.click(backend.url, [A1, A2, B1])
    assert_mask_of(region, MASKS["A"] | MASKS["B"])
    assert backend.predictor.calls == [(2, True), (3, True)]  # refined click by click, never restarted


def test_auto_accept_on_lone_clicks_refine_or_start_objects(backend):
    """With Auto-Accept on each request holds the newest keypoint alone, and the accepted mask is in the draft."""
    regions, calls, accepted = [], [], {}
    for item, name in zip(SEQUENCE, EXPECTED):
        region = backend.click(backend.url, [item], drafts=[draft(list(accepted.values()))] if accepted else [])
        accepted[region["id"]] = brush_result(decode_region(region), region["id"])
        regions.append(region)
        calls.append(list(backend.predictor.calls))
        assert_mask(region, name)
    ids = [r["id"] for r in regions]
    assert ids[0] == ids[1] and ids[2] == ids[3] and len({ids[0], ids[2], ids[4]}) == 3
    assert calls == [[(1, False)],
                     [(1, False), (2, True)],  # A2 outside the mask: alone it overlaps A -> refine A
                     [(1, False), (1, False)],  # B1 alone (all parts) is disjoint from A -> B, run again for its mask
                     [(2, True)],              # a negative click refines B
                     [(1, False), (1, False)]]  # C1 the same


def test_once_the_editor_kept_two_clicks_a_lone_click_starts_a_new_object(backend):
    """Auto-Accept off is known once a context held two keypoints: a reset then is ✓ or ✗, a signal."""
    backend.click(backend.url, [A1])
    backend.click(backend.url, [A1, A2])
    region = backend.click(backend.url, [pixel_keypoint(30, 20)])  # after ✓, on A's body again
    assert_mask(region, "A_body")
    assert backend.predictor.calls == [(1, False)]


def test_a_label_switch_finishes_the_object(backend):
    other = dict(pixel_keypoint(125, 45), value={**pixel_keypoint(125, 45)["value"],
                                                 "keypointlabels": ["Other"], "labels": ["Other"]})
    backend.click(backend.url, [A1])
    backend.click(backend.url, [A1, A2])
    backend.click(backend.url, [other], label_config=TWO_LABEL_CONFIG)
    region = backend.click(backend.url, [A1, A2, B1], label_config=TWO_LABEL_CONFIG)
    assert_mask(region, "B")
    assert backend.predictor.calls == [(1, False)]


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


def test_a_restarted_server_replays_the_clicks_to_the_same_object(label_studio, backend):
    for context in ACCEPT_OFF[:2]:
        expected = backend.click(backend.url, context)
    region, calls = fresh_backend_click(label_studio, ACCEPT_OFF[1])
    assert region == expected
    assert calls == [(1, False), (2, True)]  # replayed click by click, with mask feedback


def test_a_long_replay_is_bounded_to_a_few_model_calls(label_studio, backend):
    """A fresh server given 40 prompts of one object makes MAX_REPLAYED_PROMPTS calls, not 40: the
    first takes the clicks up to there, the others feed the mask back; the mask is the same."""
    from backend.click_selection import MAX_REPLAYED_PROMPTS

    clicks = [A1, A2] + [pixel_keypoint(5 + i, 3, False) for i in range(18)] + \
             [pixel_keypoint(22 + i, 62 + i) for i in range(20)]  # negatives on the background, positives on B
    for n in range(1, len(clicks) + 1):
        expected = backend.click(backend.url, clicks[:n])
    region, calls = fresh_backend_click(label_studio, clicks)
    assert region == expected
    assert_mask_of(region, MASKS["A"] | MASKS["B"])
    first = len(clicks) - MAX_REPLAYED_PROMPTS + 1
    assert calls == [(first, False)] + [(n, True) for n in range(first + 1, len(clicks) + 1)]


def test_deleting_a_click_replays_from_the_last_unchanged_object(backend):
    for context in ([A1], [A1, A2], [A1, A2, B2]):
        backend.click(backend.url, context)
    region = backend.click(backend.url, [A1, B2])  # the annotator deleted A2
    assert_mask(region, "A_body")
    assert backend.predictor.calls == [(1, False), (2, True)]


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
    assert backend.predictor.calls == [(2, True)]


def test_a_box_prompt_gives_a_mask_cropped_to_the_box(backend):
    region = backend.click(backend.url, [rectangle(100, 20, 150, 70)])
    assert_mask(region, "C")
    region = backend.click(backend.url, [rectangle(100, 20, 150, 70), rectangle(20, 60, 65, 100)])
    expected = MASKS["B"].copy()
    expected[:, 65:] = False  # B's cyan part sticks out of the box
    assert np.array_equal(decode_region(region), expected)


def test_a_box_keeps_every_part_inside_it_and_clicks_keep_the_clicked_parts_only(backend):
    backend.predictor.clicked_components_only.clear()
    backend.click(backend.url, [rectangle(100, 20, 150, 70)])
    backend.click(backend.url, [rectangle(100, 20, 150, 70), pixel_keypoint(120, 40)])
    assert backend.predictor.clicked_components_only == [False, False]  # the box's object, refined too
    backend.click(backend.url, [A1])
    assert backend.predictor.clicked_components_only[-1] is None  # the predictor's setting


def test_auto_accept_on_judges_a_lone_click_by_every_part_it_lights_up(backend):
    backend.click(backend.url, [SEQUENCE[0]])
    backend.predictor.clicked_components_only.clear()
    backend.click(backend.url, [SEQUENCE[2]], drafts=[])  # B1 alone: a new object
    assert backend.predictor.clicked_components_only == [False, None]  # the test, then B's own mask


def test_saved_masks_are_decoded_once_per_task(backend, monkeypatch):
    decoded = []
    real = click_selection.rle_to_mask
    monkeypatch.setattr(click_selection, "rle_to_mask", lambda *args: decoded.append(args[1:]) or real(*args))
    accepted = [draft([brush_result(MASKS["A"], "a-region"), brush_result(MASKS["B_core"], "b-region")])]
    assert_mask(backend.click(backend.url, SEQUENCE[:4], drafts=accepted), "B_core")
    assert_mask(backend.click(backend.url, SEQUENCE[:5], drafts=accepted), "C")
    assert decoded == [(120, 160), (120, 160)]


def test_region_cache_forgets_regions_the_task_no_longer_has():
    regions = [Exemplar("draft:1", name, ("Object",), 120, 160, bytes(brush_result(MASKS[name], name)["value"]["rle"]))
               for name in ("A", "C")]
    cache = {}
    first = click_selection.RegionMasks(regions, (120, 160), cache)
    assert first.contains(prompt(A1), set()) and not first.contains(prompt(B1), set())
    assert first.contains(prompt(C1), set()) and not first.contains(prompt(C1), {"C"})
    for name, mask in cache.items():  # bit-packed inside the region's bounding box
        rows, cols = np.nonzero(MASKS[name[0]])
        assert mask.box == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
        assert mask.nbytes == -(-((mask.box[1] - mask.box[0]) * (mask.box[3] - mask.box[2])) // 8)
        assert np.array_equal(mask.crop(), MASKS[name[0]][mask.slices])
    assert len(cache) == 2
    second = click_selection.RegionMasks(regions[:1], (120, 160), cache)
    second.prune()
    assert [key[0] for key in cache] == ["A"]


def test_regions_of_another_size_than_the_image_are_never_decoded(monkeypatch):
    """A draft declaring 32768 x 32768 pixels on a 160 x 120 image: skipped, no 1 GB decode."""
    decoded = []
    monkeypatch.setattr(click_selection, "rle_to_mask", lambda *args: decoded.append(args[1:]) or MASKS["A"])
    big = Exemplar("draft:1", "big", ("Object",), 32768, 32768, bytes(brush_result(MASKS["A"], "big")["value"]["rle"]))
    regions = click_selection.RegionMasks([big], (120, 160))
    assert regions.regions == [] and not regions.contains(prompt(A1), set()) and decoded == []


def prompt(item):
    return parse_prompt(item, parse_label_config(LABEL_CONFIG), "item")
