"""Parsing of what Label Studio sends: the label config, the interactive context and the task.

Every problem raises ``BackendError`` with status 400 and a message naming the field.
Shapes follow Label Studio 1.23 (see ``shared/reference/label-studio-1.23.2-calls.jsonl``):

- ``params.context.result`` items: ``{"from_name", "to_name", "type": "keypointlabels",
  "value": {"x", "y", "keypointlabels": [label]}, "is_positive": bool (absent = positive),
  "original_width", "original_height", "id"}``; ``rectanglelabels`` items carry
  ``value.{x, y, width, height, rotation}`` (percent of the image).
- brush regions in ``task.annotations[].result`` / ``task.drafts[].result`` are read by
  ``backend.exemplars.regions_from_task`` (one reader, one set of rules).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from label_studio_sdk.label_interface import LabelInterface

from .errors import BackendError, short_repr
from .exemplars import MAX_ID_CHARS, MAX_ID_DIGITS

MAX_CONTEXT_ITEMS = 1000  # per request; the editor sends the smart regions of one image
PROMPT_TYPES = {"keypointlabels": "KeyPointLabels", "rectanglelabels": "RectangleLabels"}
BRUSH_TAG = "BrushLabels"
IMAGE_TAG = "Image"


def bad_request(message: str) -> BackendError:
    return BackendError(message, status=400)


# --- label config ------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    name: str
    tag: str  # "KeyPointLabels", "BrushLabels", ...
    to_names: Tuple[str, ...]
    labels: Tuple[str, ...]


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a label config the backend uses: controls, and each Image's data field."""

    controls: Mapping[str, Control]
    image_fields: Mapping[str, str]  # Image tag name -> task data key ("$image" -> "image")

    @property
    def has_brush(self) -> bool:
        """Whether a BrushLabels control exists (where the masks go)."""
        return any(c.tag == BRUSH_TAG for c in self.controls.values())

    def prompt_control(self, name: str, result_type: str) -> Control:
        """The smart control a context item came from, checked against its ``type``."""
        control = self.controls.get(name)
        if control is None:
            known = ", ".join(sorted(c.name for c in self.controls.values() if c.tag in PROMPT_TYPES.values()))
            raise bad_request(f"unknown control name {name!r} in the context; the label config's prompt controls are: {known or 'none'}")
        if control.tag != PROMPT_TYPES[result_type]:
            raise bad_request(f"control {name!r} is a {control.tag}, but the context item says type {short_repr(result_type)}")
        return control

    def brush_output(self, image: str, label: Optional[str]) -> Tuple[str, str]:
        """``(BrushLabels control name, brush label)`` for a prompt with ``label`` on ``image``.

        The brush control must target the same Image and offer the prompt's label; a prompt
        without a label uses the brush control's only label.
        """
        brushes = [c for c in self.controls.values() if c.tag == BRUSH_TAG and image in c.to_names]
        if not brushes:
            raise bad_request(f"the label config has no BrushLabels control with toName={image!r} to receive the mask")
        if label is None:
            single = [c for c in brushes if len(c.labels) == 1]
            if single:
                return single[0].name, single[0].labels[0]
            raise bad_request(f"the prompt has no label and no BrushLabels control on {image!r} has exactly one label")
        for brush in brushes:
            if label in brush.labels:
                return brush.name, label
        offered = "; ".join(f"{b.name}: {', '.join(b.labels) or 'no labels'}" for b in brushes)
        raise bad_request(f"label {label!r} is not a label of any BrushLabels control on {image!r} ({offered})")


@functools.lru_cache(maxsize=64)
def parse_label_config(xml: str) -> LabelConfig:
    """Parse a Label Studio label config with the SDK's ``LabelInterface`` (cached per string)."""
    if not isinstance(xml, str) or not xml.strip():
        raise bad_request("label_config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises its own XML error types
        raise bad_request(f"label_config is not a valid Label Studio config: {exc}") from None
    controls = {
        c.name: Control(c.name, c.tag, tuple(c.to_name or ()), tuple(c.labels or ()))
        for c in interface.controls
    }
    image_fields = {
        o.name: str(o.value).lstrip("$") for o in interface.objects if o.tag == IMAGE_TAG and o.value
    }
    return LabelConfig(controls=controls, image_fields=image_fields)


# --- context -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One smart region of the context: a click (keypoint) or a box (rectangle).

    Coordinates are percent of the image, as Label Studio sends them; a rectangle's
    ``x, y`` is its top-left corner, rotated by ``rotation`` degrees around it.
    """

    kind: str  # "keypoint" or "rectangle"
    control: str
    image: str  # to_name: the Image tag
    label: Optional[str]
    x: float
    y: float
    width: float = 0.0
    height: float = 0.0
    rotation: float = 0.0
    is_positive: bool = True
    region_id: str = ""

    @property
    def key(self) -> Tuple:
        """Identity of the prompt across requests (the region id is not relied on)."""
        if self.kind == "keypoint":
            return ("keypoint", round(self.x, 4), round(self.y, 4), self.is_positive)
        return ("rectangle", round(self.x, 4), round(self.y, 4), round(self.width, 4), round(self.height, 4), round(self.rotation, 3))

    @property
    def starts_object(self) -> bool:
        """Whether this prompt can be the first prompt of an object (a positive click or a box)."""
        return self.kind == "rectangle" or self.is_positive


def _number(value: Any, where: str) -> float:
    number = float("nan")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            pass
    if not math.isfinite(number):
        raise bad_request(f"{where} must be a finite number, got {short_repr(value)}")
    return number



def _percent(value: Any, where: str) -> float:
    number = _number(value, where)
    if not 0.0 <= number <= 100.0:
        raise bad_request(f"{where}={number} is outside 0-100 (coordinates are percent of the image)")
    return number


def _label(value: Mapping[str, Any], result_type: str, where: str) -> Optional[str]:
    labels = value.get(result_type, value.get("labels"))
    if labels is None or labels == []:
        return None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise bad_request(f"{where}.value.{result_type} must be a list of label strings, got {short_repr(labels)}")
    return labels[0]


def parse_prompt(item: Any, config: LabelConfig, where: str) -> Optional[Prompt]:
    """A ``Prompt`` from one context item, or None for items that are not prompts (ignored)."""
    if not isinstance(item, Mapping):
        raise bad_request(f"{where} must be an object, got {type(item).__name__}")
    result_type = item.get("type")
    if not isinstance(result_type, str):
        raise bad_request(f"{where}.type must be a string, got {short_repr(result_type)}")
    if result_type not in PROMPT_TYPES:
        return None
    from_name, to_name = item.get("from_name"), item.get("to_name")
    if not isinstance(from_name, str) or not isinstance(to_name, str):
        raise bad_request(f"{where} needs string from_name and to_name")
    control = config.prompt_control(from_name, result_type)
    if to_name not in control.to_names or to_name not in config.image_fields:
        raise bad_request(f"{where}: to_name {to_name!r} is not an Image that control {from_name!r} targets")
    value = item.get("value")
    if not isinstance(value, Mapping):
        raise bad_request(f"{where}.value must be an object")
    is_positive = item.get("is_positive", True)
    if not isinstance(is_positive, bool):
        raise bad_request(f"{where}.is_positive must be true or false, got {short_repr(is_positive)}")
    common = dict(
        control=from_name,
        image=to_name,
        label=_label(value, result_type, where),
        x=_percent(value.get("x"), f"{where}.value.x"),
        y=_percent(value.get("y"), f"{where}.value.y"),
        region_id=str(item.get("id", ""))[:MAX_ID_CHARS],
    )
    if result_type == "keypointlabels":
        return Prompt(kind="keypoint", is_positive=is_positive, **common)
    width = _percent(value.get("width"), f"{where}.value.width")
    height = _percent(value.get("height"), f"{where}.value.height")
    if width <= 0 or height <= 0:
        raise bad_request(f"{where}: the rectangle has zero size ({width} x {height} percent)")
    rotation = _number(value.get("rotation", 0.0), f"{where}.value.rotation")
    return Prompt(kind="rectangle", width=width, height=height, rotation=rotation, **common)


def parse_context(context: Any, config: LabelConfig) -> List[Prompt]:
    """The prompts of an interactive ``params.context``, in the order Label Studio sent them.

    Raises 400 when the context holds no keypoint or rectangle.
    """
    if not isinstance(context, Mapping):
        raise bad_request(f"params.context must be an object or null, got {type(context).__name__}")
    items = context.get("result")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise bad_request("params.context.result must be a list")
    if len(items) > MAX_CONTEXT_ITEMS:
        raise bad_request(f"params.context.result holds {len(items)} items; at most {MAX_CONTEXT_ITEMS} are accepted "
                          "(the editor sends the smart regions of one image)")
    prompts = [p for i, item in enumerate(items) if (p := parse_prompt(item, config, f"params.context.result[{i}]"))]
    if not prompts:
        raise bad_request("params.context has no keypoints or rectangles (keypointlabels / rectanglelabels items) to segment from")
    return prompts


def current_group(prompts: Sequence[Prompt]) -> List[Prompt]:
    """The prompts on the same image with the same label as the newest prompt, in order."""
    newest = prompts[-1]
    return [p for p in prompts if p.image == newest.image and p.label == newest.label]


# --- task ----------------------------------------------------------------------------------


def task_id(task: Mapping[str, Any], where: str) -> int:
    value = task.get("id")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10 ** MAX_ID_DIGITS:
        raise bad_request(f"{where}.id must be an integer task id (0 to 10^{MAX_ID_DIGITS}), got {short_repr(value)}")
    return value


def task_image_url(task: Mapping[str, Any], config: LabelConfig, image: str, where: str) -> str:
    """The URL in the task's data field that the Image tag ``image`` reads."""
    field_name = config.image_fields[image]
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise bad_request(f"{where}.data must be an object")
    url = data.get(field_name)
    if url is None:
        raise bad_request(f"{where}.data has no field {field_name!r} (the Image tag {image!r} reads ${field_name})")
    if not isinstance(url, str) or not url.strip():
        raise bad_request(f"{where}.data.{field_name} must be a non-empty image URL string, got {short_repr(url)}")
    return url


def as_object(body: Any, where: str) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"{where} must be a JSON object, got {type(body).__name__}")
    return body
