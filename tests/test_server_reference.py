"""Replays every call that a real Label Studio 1.23.2 made to an ML backend
(shared/reference/label-studio-1.23.2-calls.jsonl) against this backend, and checks that the
test helpers build payloads with exactly the recorded structure."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import requests
from support import (API_KEY, ColourRegionPredictor, FakeLabelStudio, annotation, batch_task, brush_result,
                     decode_region, draft, interactive_task, keypoint, png_bytes, predict_body, serve, setup_body,
                     webhook_body)

from backend.app import create_app
from backend.config import Settings
from backend.service import ClickSegModel

# The recording redacts its label config; this is the config its parsed_label_config describes.
RECORDED_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image"><Label value="Object" smart="true"/></KeyPointLabels>
</View>"""
REDACTED = "<label config, "


@pytest.fixture(scope="module")
def calls(shared_dir):
    path = shared_dir / "reference" / "label-studio-1.23.2-calls.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "ls_to_backend"]


def unredact(value):
    """The recorded body with the redacted label config put back."""
    if isinstance(value, dict):
        return {k: unredact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unredact(v) for v in value]
    if isinstance(value, str) and value.startswith(REDACTED):
        return RECORDED_CONFIG
    return value


def test_the_recorded_calls_replay_against_this_backend(calls, tmp_path):
    label_studio = FakeLabelStudio()
    image = np.zeros((480, 640, 3), np.uint8)
    image[200:300, 250:350] = (200, 40, 40)
    for record in calls:
        for task in (record["body"] or {}).get("tasks", []):
            label_studio.add(task["data"]["image"], png_bytes(image))
    with serve(label_studio) as ls_url:
        settings = Settings.from_env({"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": API_KEY, "LOG_LEVEL": "ERROR",
                                      "MODEL_DIR": str(tmp_path / "model_dir")})
        model = ClickSegModel(settings, predictor_factory=ColourRegionPredictor)
        with serve(create_app(settings, model)) as url:
            seen = set()
            for record in calls:
                body = unredact(record["body"])
                response = requests.request(record["method"], url + record["path"], json=body, timeout=60)
                assert response.status_code == record["status"], (record["phase"], response.text)
                answer = response.json()
                seen.add(record["phase"])
                if record["path"] == "/predict":
                    check_prediction(body, answer)
                elif record["path"] == "/webhook":
                    assert answer["action"] == body["action"]
                else:
                    assert set(record["response"]) <= set(answer)
    assert {"connect", "interactive_is_positive_absent", "interactive_after_draft", "train", "batch_dm_action"} <= seen


def check_prediction(body, answer):
    results = answer["results"]
    assert len(results) == len(body["tasks"])
    if body["params"]["context"] is None:
        assert all(r["result"] == [] for r in results)
        return
    (region,) = results[0]["result"]
    assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
    assert region["value"]["brushlabels"] == ["Object"]
    assert decode_region(region).shape == (480, 640)


def key_tree(value):
    """The nested key structure of a JSON value (list items merged)."""
    if isinstance(value, dict):
        return {k: key_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        merged = {}
        for item in value:
            tree = key_tree(item)
            if isinstance(tree, dict):
                merged.update(tree)
        return [merged] if merged else []
    return None


def recorded(calls, phase, path="/predict"):
    return next(r["body"] for r in calls if r["phase"] == phase and r["path"] == path)


def test_helpers_build_the_recorded_payload_shapes(calls):
    mask = np.zeros((480, 640), bool)
    point = keypoint(46.953125, 52.1875, True, width=640, height=480)
    ours = predict_body([interactive_task(
        "/data/upload/1/3eaa608b-a.png",
        annotations=[annotation([brush_result(mask, "ann-1")])],
        drafts=[draft([brush_result(mask, "draft-1"), point]), draft([brush_result(mask, "draft-2")], 2, annotation_id=1)],
    )], {"result": [point]})
    theirs = copy.deepcopy(recorded(calls, "interactive_after_draft"))
    assert key_tree(ours) == key_tree(theirs)

    absent = keypoint(46.953125, 52.1875, None, width=640, height=480)
    assert key_tree(absent) == key_tree(recorded(calls, "interactive_is_positive_absent")["params"]["context"]["result"][0])
    assert key_tree(predict_body([batch_task("/data/upload/1/8b0499b4-b.png")], None)) == key_tree(
        recorded(calls, "batch_dm_action"))
    assert set(setup_body()) == set(recorded(calls, "connect", "/setup"))
    assert set(webhook_body("START_TRAINING")) >= set(recorded(calls, "train", "/webhook"))
