"""Label config, context and task parsing: the shapes Label Studio 1.23 sends, and clear 400s."""
from __future__ import annotations

import numpy as np
import pytest
from support import keypoint

from backend.errors import BackendError
from backend.exemplars import regions_from_task
from backend.rle import mask_to_rle
from backend.payload import current_group, parse_context, parse_label_config, task_image_url

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/><Label value="Car"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Object" smart="true"/><Label value="Car" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
  <Image name="other" value="$other"/>
  <KeyPointLabels name="kp_other" toName="other" smart="true"><Label value="Thing"/></KeyPointLabels>
</View>"""


def kp(x, y, label="Object", is_positive=True, from_name="tag2", to_name="image"):
    return dict(keypoint(x, y, is_positive, label=label), from_name=from_name, to_name=to_name)


def status_and_message(fn, *args):
    with pytest.raises(BackendError) as info:
        fn(*args)
    return info.value.status, info.value.message


def test_label_config_maps_controls_and_image_fields():
    config = parse_label_config(CONFIG)
    assert config.image_fields == {"image": "image", "other": "other"}
    assert config.controls["tag2"].tag == "KeyPointLabels"
    assert config.brush_output("image", "Car") == ("tag", "Car")


def test_brush_output_needs_a_brush_control_with_the_label():
    config = parse_label_config(CONFIG)
    status, message = status_and_message(config.brush_output, "image", "Dog")
    assert status == 400 and "'Dog'" in message and "tag: Object, Car" in message
    status, message = status_and_message(config.brush_output, "other", "Thing")
    assert status == 400 and "no BrushLabels control with toName='other'" in message


@pytest.mark.parametrize("xml", ["", "<View><Image", 17])
def test_invalid_label_config_is_a_400(xml):
    status, message = status_and_message(parse_label_config, xml)
    assert status == 400 and "label_config" in message


def test_is_positive_true_false_and_absent():
    config = parse_label_config(CONFIG)
    prompts = parse_context({"result": [kp(10, 20, is_positive=True), kp(30, 40, is_positive=False),
                                         kp(50, 60, is_positive=None)]}, config)
    assert [p.is_positive for p in prompts] == [True, False, True]
    assert (prompts[1].x, prompts[1].y, prompts[1].label, prompts[1].control) == (30, 40, "Object", "tag2")


def test_rectangles_are_prompts_and_other_region_types_are_ignored():
    config = parse_label_config(CONFIG)
    rect = {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": ["Object"]}}
    brush = {"type": "brushlabels", "from_name": "tag", "to_name": "image", "value": {"format": "rle", "rle": [1]}}
    prompts = parse_context({"result": [brush, rect]}, config)
    assert len(prompts) == 1 and prompts[0].kind == "rectangle" and prompts[0].starts_object


@pytest.mark.parametrize("context, fragment", [
    ({"result": []}, "no keypoints or rectangles"),
    ({}, "no keypoints or rectangles"),
    ({"result": "x"}, "must be a list"),
    ("clicks", "must be an object"),
    ({"result": [kp(100.5, 20)]}, "value.x=100.5 is outside 0-100"),
    ({"result": [kp(10, -1)]}, "value.y=-1.0 is outside 0-100"),
    ({"result": [dict(kp(10, 20), value={"x": 10, "y": "7"})]}, "value.y must be a finite number"),
    ({"result": [kp(10, 20, from_name="nope")]}, "unknown control name 'nope'"),
    ({"result": [kp(10, 20, from_name="tag")]}, "'tag' is a BrushLabels"),
    ({"result": [kp(10, 20, to_name="elsewhere")]}, "to_name 'elsewhere'"),
    ({"result": [dict(kp(10, 20), is_positive="yes")]}, "is_positive must be true or false"),
])
def test_bad_contexts_are_400s_naming_the_problem(context, fragment):
    status, message = status_and_message(parse_context, context, parse_label_config(CONFIG))
    assert status == 400 and fragment in message


def test_current_group_keeps_the_newest_prompts_image_and_label():
    config = parse_label_config(CONFIG)
    prompts = parse_context({"result": [kp(1, 1), kp(2, 2, label="Car"), kp(3, 3),
                                         kp(4, 4, label="Thing", from_name="kp_other", to_name="other"),
                                         kp(5, 5)]}, config)
    assert [p.x for p in current_group(prompts)] == [1, 3, 5]


def test_task_image_field_missing_or_empty_is_a_400():
    config = parse_label_config(CONFIG)
    assert task_image_url({"data": {"image": "/data/upload/1/a.png"}}, config, "image", "tasks[0]") == "/data/upload/1/a.png"
    status, message = status_and_message(task_image_url, {"data": {"img": "x"}}, config, "image", "tasks[0]")
    assert status == 400 and "no field 'image'" in message
    status, message = status_and_message(task_image_url, {"data": {"image": ""}}, config, "image", "tasks[0]")
    assert status == 400 and "non-empty image URL" in message


def test_finished_regions_come_from_annotations_and_drafts_with_the_label():
    """Click selection reads the task's regions with the exemplar store's rules (one reader)."""
    rle = mask_to_rle(np.eye(3, 4, dtype=bool))

    def brush(region_id, label, to_name="image"):
        return {"id": region_id, "type": "brushlabels", "to_name": to_name, "from_name": "tag",
                "original_width": 4, "original_height": 3,
                "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}
    task = {
        "id": 7, "project": 1,
        "annotations": [{"id": 1, "result": [brush("a1", "Object"), brush("a2", "Car")]},
                        {"id": 2, "was_cancelled": True, "result": [brush("skipped", "Object")]}],
        "drafts": [{"id": 3, "result": [brush("d1", "Object"), brush("d2", "Object", to_name="other"),
                                        {"type": "keypointlabels", "value": {"x": 1, "y": 1}}]}],
    }
    regions = regions_from_task(task).on_image("image", "Object")
    assert [r.region_id for r in regions] == ["a1", "d1"]  # not the cancelled annotation's
    assert (regions[0].width, regions[0].height, regions[0].rle) == (4, 3, bytes(rle))
    assert [r.region_id for r in regions_from_task(task).on_image("image")] == ["a1", "a2", "d1"]
