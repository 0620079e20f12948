"""Exemplar recall in /predict: proposals after the first click of a new object, kept while it is
refined, never touching accepted regions; failures, settings and the background warm-up.

A tiny random network carries the real recall plumbing (features, ``propose``); the object masks
(colour regions, support.py) and the recall map are hand-made, so every expected
proposal is exact.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch
from support import (HARD, PROJECT, ColourRegionPredictor, FakeImageState, brush_result, decode_region, draft,
                     interactive_task, pixel_keypoint, predict_body)

from backend.app import create_app
from backend.benchmark import SceneFetcher
from backend.config import Settings
from backend.service import ClickSegModel
from model.nets.registry import create_model
from model.predictor import ClickSegPredictor

H, W = 48, 64
IMAGE_URL = "/data/upload/1/grapes.png"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Object"/><Label value="Leaf"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Object" smart="true"/><Label value="Leaf" smart="true"/>
  </KeyPointLabels>
</View>"""
RED = (220, 30, 30)


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


# The scene: A is accepted; B (a red body and a HARD strip that the first click misses) is clicked.
A, B_BODY, B_STRIP = box(4, 16, 4, 16), box(4, 16, 24, 34), box(4, 16, 34, 36)
C, D, E = box(28, 40, 4, 16), box(28, 40, 24, 36), box(28, 40, 44, 56)
LEAF = box(28, 40, 20, 24)  # an accepted region of another label, next to D

IMAGE = np.zeros((H, W, 3), np.uint8)
for part in (A, B_BODY, C, D, E):
    IMAGE[part] = RED
IMAGE[B_STRIP] = HARD

# The recall map (at working size = image size, the image is small).
RECALL_MAP = np.zeros((H, W), np.float32)
RECALL_MAP[box(4, 16, 4, 19)] = 0.95  # A and a strip beside it: mostly accepted, dropped
RECALL_MAP[C] = 0.95
RECALL_MAP[box(28, 40, 20, 36)] = 0.9  # D and 25 % of LEAF: kept without LEAF's pixels
RECALL_MAP[E] = 0.6  # below the default RECALL_MIN_SCORE
F = box(4, 16, 32, 50)  # overlaps B's body by 11 %, and its strip
RECALL_MAP[F] = 0.85

B1 = pixel_keypoint(28, 10, width=W, height=H)  # B's body
B2 = pixel_keypoint(35, 10, width=W, height=H)  # B's strip (refines B)
B3 = pixel_keypoint(30, 22, False, width=W, height=H)  # negative, on the background
E1 = pixel_keypoint(50, 34, width=W, height=H)  # a new object


def tiny_net(recall: bool):
    return create_model("effnet-lite", {"input_size": 64, "decoder_channels": 8, "click_channels": 8,
                                        "recall_channels": 16 if recall else 0, "recall_input_size": 64})


@pytest.fixture(scope="module")
def recall_net():
    return tiny_net(recall=True)


@pytest.fixture(scope="module")
def plain_net():
    return tiny_net(recall=False)


class ScenePredictor(ClickSegPredictor):
    """The real predictor with colour-region object masks and ``RECALL_MAP`` as the recall output (its grid is the image's)."""

    def __init__(self, net):
        super().__init__(net, cfr_steps=0)
        self.recall_error = None
        self.recall_calls = 0
        self.recall_encodes = 0
        self.exemplars = []  # the exemplar mask of each recall call

    def predict(self, state, clicks, prev_mask=None, clicked_components_only=None):
        image = (state.working[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        prob = ColourRegionPredictor().predict(FakeImageState(state.height, state.width, image), clicks)
        state.last_output, state.last_output_working = prob, None
        return prob

    def encode_recall(self, state):
        if state.recall_features is None:
            self.recall_encodes += 1
        return super().encode_recall(state)

    def recall_logits(self, state, exemplar_mask, clicks, object_prob):
        self.recall_calls += 1
        self.encode_recall(state)
        if self.recall_error is not None:
            raise self.recall_error
        self.exemplars.append(np.array(exemplar_mask, bool))
        return torch.logit(torch.from_numpy(RECALL_MAP.copy()), eps=1e-6)[None, None]


class Backend:
    def __init__(self, tmp_path, predictor, **env):
        settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "LOG_LEVEL": "WARNING", **env})
        self.predictor = predictor
        self.model = ClickSegModel(settings, predictor_factory=lambda: predictor, fetcher=SceneFetcher(IMAGE))
        self.client = create_app(settings, self.model).test_client()

    def post(self, clicks, drafts=()):
        task = interactive_task(IMAGE_URL, drafts=[draft(list(drafts))] if drafts else [])
        return self.client.post("/predict", json=predict_body([task], {"result": list(clicks)}, CONFIG))

    def click(self, clicks, drafts=()):
        """The regions of one interactive answer."""
        response = self.post(clicks, drafts)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["results"][0]["result"]

    @property
    def session(self):
        return self.model.interactive.sessions.cache.get((PROJECT, 1, IMAGE_URL, self.predictor.model_version))

    def wait_for_warm_up(self, timeout=60.0):
        """Wait until the background thread has stored the session's recall features and re-measured it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            session = self.session
            if session.image_state.recall_features is not None and \
                    self.model.interactive.sessions.cache.total_bytes == session.nbytes:
                return session
            time.sleep(0.02)
        raise AssertionError("the recall features were not computed in the background")


@pytest.fixture
def backend(tmp_path, recall_net):
    return Backend(tmp_path, ScenePredictor(recall_net))


ACCEPTED = [brush_result(A, "acceptedA"), brush_result(LEAF, "leaf1", label="Leaf")]


def assert_masks(regions, expected):
    """The regions' decoded masks are exactly ``expected``, in order."""
    decoded = [decode_region(r) for r in regions]
    assert all(m.shape == (H, W) for m in decoded)
    assert len(decoded) == len(expected) and all(np.array_equal(m, e) for m, e in zip(decoded, expected)), \
        f"got masks of {[int(m.sum()) for m in decoded]} pixels, expected {[int(e.sum()) for e in expected]}"


# --- when proposals appear ------------------------------------------------------------------------


@pytest.mark.parametrize("drafts", [(), [brush_result(LEAF, "leaf1", label="Leaf")]],
                         ids=["no accepted region", "only another label accepted"])
def test_without_an_exemplar_of_the_label_the_answer_is_the_object_alone(backend, drafts):
    regions = backend.click([B1], drafts)
    assert len(regions) == 1 and np.array_equal(decode_region(regions[0]), B_BODY)
    assert backend.predictor.recall_calls == 0


def test_the_first_click_of_a_new_object_proposes_the_objects_like_the_exemplar(backend, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="backend.interactive")
    regions = backend.click([B1], ACCEPTED)

    (tmp_path / "off").mkdir()
    plain = Backend(tmp_path / "off", ScenePredictor(backend.predictor.net), RECALL="0").click([B1], ACCEPTED)
    assert regions[0] == plain[0]  # the object's region, exactly as without recall
    object_id = regions[0]["id"]
    assert [r["id"] for r in regions[1:]] == [f"{object_id}-r0", f"{object_id}-r1", f"{object_id}-r2"]
    assert_masks(regions[1:], [C, D, F & ~B_BODY])  # D without LEAF's pixels; E and A's strip dropped
    assert [r["score"] for r in regions[1:]] == pytest.approx([0.95, 0.9, 0.85])
    for region in regions[1:]:
        assert region["from_name"] == "tag" and region["to_name"] == "image" and region["type"] == "brushlabels"
        assert (region["original_width"], region["original_height"], region["image_rotation"]) == (W, H, 0)
        assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Object"]
    assert np.array_equal(backend.predictor.exemplars[0], A)  # the clicked label's regions only
    line = next(r for r in caplog.records if r.getMessage() == "interactive prediction")
    assert line.proposals == 3 and line.recall_ms > 0


def test_proposals_never_cover_accepted_regions_or_the_object(backend):
    regions = backend.click([B1], ACCEPTED)
    taken = A | LEAF | decode_region(regions[0])
    for mask in map(decode_region, regions[1:]):
        assert mask.any() and not (mask & taken).any()


@pytest.mark.parametrize("env, expected", [
    ({"RECALL_MIN_SCORE": "0.92"}, [C]),
    ({"RECALL_MAX_PROPOSALS": "2"}, [C, D]),
    ({"RECALL_MIN_AREA": "150"}, [F & ~B_BODY]),  # 192 pixels; C and D (without LEAF) have 144
    ({"RECALL_MIN_SCORE": "0.5"}, [C, D, F & ~B_BODY, E]),
])
def test_settings_bound_the_proposals(tmp_path, recall_net, env, expected):
    regions = Backend(tmp_path, ScenePredictor(recall_net), **env).click([B1], ACCEPTED)
    assert_masks(regions[1:], expected)


def test_recall_off_answers_the_object_alone_and_warms_nothing(tmp_path, recall_net):
    backend = Backend(tmp_path, ScenePredictor(recall_net), RECALL="false")
    assert len(backend.click([B1], ACCEPTED)) == 1
    assert backend.predictor.recall_calls == 0 and backend.model.interactive._recall_warmer is None


def test_a_model_without_a_recall_branch_answers_as_before(tmp_path, plain_net):
    backend = Backend(tmp_path, ScenePredictor(plain_net))
    assert not backend.predictor.has_recall
    regions = backend.click([B1], ACCEPTED)
    assert len(regions) == 1 and np.array_equal(decode_region(regions[0]), B_BODY)
    assert backend.model.interactive._recall_warmer is None


# --- while the object is refined ------------------------------------------------------------------


def test_refining_keeps_the_proposals_and_a_new_object_recomputes_them(backend):
    first = backend.click([B1], ACCEPTED)
    b_id = first[0]["id"]

    # A positive click on B's strip: same proposals and ids, without the object's new pixels.
    second = backend.click([B1, B2], ACCEPTED)
    assert second[0]["id"] == b_id and np.array_equal(decode_region(second[0]), B_BODY | B_STRIP)
    assert [r["id"] for r in second[1:]] == [r["id"] for r in first[1:]]
    assert_masks(second[1:], [C, D, F & ~(B_BODY | B_STRIP)])
    assert backend.predictor.recall_calls == 1  # from the cache

    # The annotator accepts proposal r0 and draws a region over most of D: both proposals go.
    drawn = box(28, 40, 24, 33)
    accepted = ACCEPTED + [brush_result(C, f"{b_id}-r0"), brush_result(drawn, "drawn")]
    third = backend.click([B1, B2, B3], accepted)
    assert [r["id"] for r in third] == [b_id, f"{b_id}-r2"]
    assert backend.predictor.recall_calls == 1

    # ✓ deletes the keypoints, so a click on E starts a new object: new proposals from every
    # accepted region of the label.
    fourth = backend.click([E1], accepted)
    e_id = fourth[0]["id"]
    assert e_id != b_id and np.array_equal(decode_region(fourth[0]), E)
    assert [r["id"] for r in fourth[1:]] == [f"{e_id}-r0"]
    assert_masks(fourth[1:], [F])  # B was never accepted; C and D are covered
    assert backend.predictor.recall_calls == 2
    assert np.array_equal(backend.predictor.exemplars[-1], A | C | drawn)


def test_the_same_first_click_twice_is_answered_from_the_cache(backend):
    first = backend.click([B1], ACCEPTED)
    assert backend.click([B1], ACCEPTED) == first
    assert backend.predictor.recall_calls == 1


def test_the_objects_own_auto_accepted_region_is_no_exemplar(backend):
    b_id = backend.click([B1], ACCEPTED)[0]["id"]
    auto_accepted = ACCEPTED + [brush_result(B_BODY, b_id)]  # Auto-Accept put it into the draft
    for clicks in ([B1], [B1, B2]):
        regions = backend.click(clicks, auto_accepted)
        assert [r["id"] for r in regions] == [b_id, f"{b_id}-r0", f"{b_id}-r1", f"{b_id}-r2"]
    assert backend.predictor.recall_calls == 1


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError("no exemplar"), RuntimeError("CUDA out of memory")])
def test_a_recall_failure_still_answers_the_object(backend, caplog, error):
    backend.predictor.recall_error = error
    with caplog.at_level(logging.WARNING, logger="backend.interactive"):
        response = backend.post([B1], ACCEPTED)
    assert response.status_code == 200
    regions = response.get_json()["results"][0]["result"]
    assert len(regions) == 1 and np.array_equal(decode_region(regions[0]), B_BODY)
    assert any("exemplar recall failed" in r.getMessage() and str(error) in r.reason for r in caplog.records)


def test_a_corrupt_rle_in_a_draft_is_logged_and_skipped(backend, caplog):
    corrupt = brush_result(C, "corrupt")
    corrupt["value"]["rle"] = [1, 2, 3]
    with caplog.at_level(logging.WARNING):
        regions = backend.click([B1], ACCEPTED + [corrupt])
    assert len(regions) == 4 and np.array_equal(backend.predictor.exemplars[0], A)
    assert any("corrupt" in r.getMessage() or "corrupt" in str(getattr(r, "reason", "")) for r in caplog.records)


def test_without_the_exemplar_store_the_payload_regions_are_the_exemplars(tmp_path, recall_net):
    (tmp_path / "exemplars.sqlite3").mkdir()  # the store cannot open its database
    backend = Backend(tmp_path, ScenePredictor(recall_net))
    regions = backend.click([B1], ACCEPTED)
    assert backend.model.exemplars is None and len(regions) == 4


# --- latency -----------------------------------------------------------------------------------


def test_the_recall_features_are_computed_in_the_background(backend):
    assert len(backend.click([B1])) == 1  # no exemplar yet: nothing to propose, features warmed
    session = backend.wait_for_warm_up()
    assert session.nbytes > session.image_state.recall_features.nbytes  # the LRU counts them

    assert len(backend.click([B1, B3], ACCEPTED)) == 1  # a refining click does not propose
    assert len(backend.click([E1], ACCEPTED)) > 1  # a new object (after ✓) does, with the warm features
    assert backend.predictor.recall_encodes == 1


# --- settings ----------------------------------------------------------------------------------


def test_recall_settings_defaults_and_values():
    defaults = Settings.from_env({})
    assert (defaults.recall, defaults.recall_min_score, defaults.recall_min_area, defaults.recall_max_proposals) == \
        (True, 0.8, 64, 20)
    settings = Settings.from_env({"RECALL": "0", "RECALL_MIN_SCORE": "0.75", "RECALL_MIN_AREA": "10",
                                  "RECALL_MAX_PROPOSALS": "5"})
    assert (settings.recall, settings.recall_min_score, settings.recall_min_area, settings.recall_max_proposals) == \
        (False, 0.75, 10, 5)
    assert Settings.from_env({"RECALL": "true"}).recall and not Settings.from_env({"RECALL": "false"}).recall


@pytest.mark.parametrize("env, fragment", [
    ({"RECALL": "maybe"}, "RECALL='maybe' is not a boolean"),
    ({"RECALL_MIN_SCORE": "high"}, "RECALL_MIN_SCORE='high' is not a number"),
    ({"RECALL_MIN_SCORE": "1.5"}, "RECALL_MIN_SCORE=1.5 must lie between"),
    ({"RECALL_MIN_AREA": "0"}, "RECALL_MIN_AREA=0 must be at least 1"),
    ({"RECALL_MAX_PROPOSALS": "many"}, "RECALL_MAX_PROPOSALS='many' is not an integer"),
])
def test_bad_recall_settings_name_the_variable(env, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        Settings.from_env(env)


def test_the_service_runs_predict_and_recall_on_the_model_thread(tmp_path):
    seen = []

    class Recording(ScenePredictor):
        def predict(self, state, clicks, prev_mask=None, clicked_components_only=None):
            seen.append(("predict", threading.current_thread().name))
            return super().predict(state, clicks, prev_mask)

        def recall_logits(self, *args, **kwargs):
            seen.append(("recall", threading.current_thread().name))
            return super().recall_logits(*args, **kwargs)

    backend = Backend(tmp_path, Recording(tiny_net(recall=True)))
    regions = backend.click([B1], ACCEPTED)
    assert len(regions) > 1 and {kind for kind, _ in seen} == {"predict", "recall"}
    assert len({name for _, name in seen}) == 1 and seen[0][1].startswith("model_")
