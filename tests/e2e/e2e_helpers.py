"""Helpers of the end-to-end tests (no tests here): the synthetic scene, Label Studio project set-up
through its API, editor-shaped keypoint contexts, brush decoding and polling."""
from __future__ import annotations

import io
import re
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from e2e_harness import REPO, LabelStudio

T = TypeVar("T")

# The smart keypoint tool's label lives in KeyPointLabels "tag2"; masks come back in BrushLabels "tag".
KEYPOINT_CONTROL, BRUSH_CONTROL, IMAGE_NAME, LABEL = "tag2", "tag", "image", "Object"

NO_BRUSH_LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Object" smart="true" background="#FF0000"/>
  </KeyPointLabels>
</View>"""


def readme_label_config() -> str:
    """The label config the README tells users to paste (its first ```xml block)."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```xml\n(.*?)```", readme, re.S)
    assert match, "README.md has no ```xml block with the label config"
    return match.group(1).strip()


# --- the synthetic scene ---------------------------------------------------------------------------------


class ImageScene:
    """What a test image offers: its size and PNG bytes (subclasses hold ``image`` (H, W, 3) uint8)."""

    image: np.ndarray

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    def png(self) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.image).save(buffer, format="PNG")
        return buffer.getvalue()


@dataclass(frozen=True)
class Scene(ImageScene):
    """One clear object on a textured background: ``image`` (H, W, 3) uint8, ``mask`` (H, W) bool."""

    image: np.ndarray
    mask: np.ndarray
    centre: Tuple[int, int]  # (row, col) of the object's centre
    radius: int


def synthetic_scene(seed: int = 0, height: int = 240, width: int = 320) -> Scene:
    """A saturated orange disk (radius ~ a fifth of the height) on dull, striped, noisy foliage colours."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack([
        70 + 30 * np.sin(cols / 9.0 + seed) + 15 * np.cos(rows / 13.0),
        95 + 25 * np.sin((rows + cols) / 17.0) + 20 * np.cos(cols / 23.0 + seed),
        60 + 20 * np.cos(rows / 7.0 - seed),
    ], axis=2)
    background += rng.normal(0, 12, background.shape)
    radius = height // 5
    centre = (int(height * (0.45 + 0.1 * rng.random())), int(width * (0.4 + 0.2 * rng.random())))
    distance = np.hypot(rows - centre[0], cols - centre[1])
    mask = distance <= radius
    shading = 1.0 - 0.25 * (distance / radius)[..., None]
    disk = np.array([245, 120, 20], np.float32) * shading + rng.normal(0, 6, (height, width, 3))
    image = np.where(mask[..., None], disk, background)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), mask, centre, radius)


# --- Label Studio projects -----------------------------------------------------------------------------


@dataclass
class Project:
    id: int
    uid: str  # "<id>.<created-at unix time>": the project id Label Studio sends to the backend
    label_config: str
    ml_backend: Optional[int] = None


def create_project(ls: LabelStudio, title: str, label_config: str) -> Project:
    body = ls.api("POST", "/api/projects", json={"title": title, "label_config": label_config}).json()
    created = datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))
    return Project(body["id"], f"{body['id']}.{int(created.timestamp())}", label_config)


def upload_image(ls: LabelStudio, project: Project, scene: Scene, name: str = "scene.png") -> Tuple[int, str]:
    """Import ``scene`` as an uploaded file (one task); returns (task id, its /data/upload/... URL)."""
    body = ls.api("POST", f"/api/projects/{project.id}/import?return_task_ids=true",
                  files={"file": (name, scene.png(), "image/png")}).json()
    (task_id,) = body["task_ids"]
    url = ls.api("GET", f"/api/tasks/{task_id}").json()["data"]["image"]
    assert url.startswith("/data/upload/"), f"an uploaded image should have a /data/upload/ URL, got {url!r}"
    return task_id, url


def connect_backend(ls: LabelStudio, project: Project, backend_url: str, title: str) -> int:
    """Project > Settings > Model > Connect Model, with "Interactive preannotations" on."""
    body = ls.api("POST", "/api/ml", json={"url": backend_url, "project": project.id, "title": title,
                                           "is_interactive": True}).json()
    assert body["state"] == "CO" and not body.get("error_message"), f"the backend did not connect: {body}"
    project.ml_backend = body["id"]
    return body["id"]


def submit_annotation(ls: LabelStudio, task_id: int, results: Sequence[Dict[str, Any]]) -> int:
    """Submit an annotation as the editor does; returns its id (Label Studio fires ANNOTATION_CREATED)."""
    body = ls.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": list(results), "lead_time": 2.0}).json()
    return body["id"]


# --- what the editor sends and receives ------------------------------------------------------------------


def _region_id() -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(secrets.choice(alphabet) for _ in range(10))


def keypoint(scene: Scene, row: float, col: float, positive: bool) -> Dict[str, Any]:
    """A smart keypoint exactly as Label Studio 1.23.2's editor serialises it (x, y in percent)."""
    return {
        "original_width": scene.width, "original_height": scene.height, "image_rotation": 0,
        "value": {"x": (col + 0.5) / scene.width * 100, "y": (row + 0.5) / scene.height * 100, "width": 0.26,
                  "labels": [LABEL], "keypointlabels": [LABEL]},
        "is_positive": positive, "id": _region_id(), "from_name": KEYPOINT_CONTROL, "to_name": IMAGE_NAME,
        "type": "keypointlabels", "origin": "manual",
    }


def interactive(ls: LabelStudio, project: Project, task_id: int, keypoints: Sequence[Dict[str, Any]]
                ) -> Tuple[Dict[str, Any], float]:
    """``POST /api/ml/<id>/interactive-annotating`` as the editor calls it; returns (answer, seconds).

    Label Studio answers 200 even when the backend failed, with ``{"errors": [...]}``.
    """
    body = {"task": task_id, "context": {"result": list(keypoints)}}
    started = time.perf_counter()
    response = ls.api("POST", f"/api/ml/{project.ml_backend}/interactive-annotating", json=body, expect=(200,))
    return response.json(), time.perf_counter() - started


def brush_regions(answer: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The brushlabels regions of a successful interactive answer (asserts there are no errors)."""
    assert "errors" not in answer, f"Label Studio reports the backend failed: {answer['errors']}"
    return [r for r in answer["data"]["result"] if r.get("type") == "brushlabels"]


def brush_region(answer: Dict[str, Any]) -> Dict[str, Any]:
    """The single brushlabels region of a successful interactive answer."""
    regions = brush_regions(answer)
    assert len(regions) == 1, f"expected one brushlabels region, got {answer['data']['result']!r:.500}"
    return regions[0]


def decode_brush(region: Dict[str, Any]) -> np.ndarray:
    """(original_height, original_width) bool mask of a brush region, decoded by the Label Studio SDK."""
    height, width = region["original_height"], region["original_width"]
    flat = decode_rle(region["value"]["rle"])
    assert flat.size == height * width * 4, \
        f"the RLE holds {flat.size} values, not {height}x{width}x4 = {height * width * 4}"
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def brush_result(scene: Scene, mask: np.ndarray, region_id: str) -> Dict[str, Any]:
    """A brushlabels result for an annotation, encoded by the SDK."""
    return {
        "original_width": scene.width, "original_height": scene.height, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [LABEL]},
        "id": region_id, "from_name": BRUSH_CONTROL, "to_name": IMAGE_NAME, "type": "brushlabels", "origin": "manual",
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def wait_for(condition: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``condition`` until it returns something truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def model_is_trained(checkpoint) -> bool:
    """True when the checkpoint's header says it was trained (meta.steps > 0)."""
    from model.checkpoint import read_header

    return read_header(checkpoint)[2].get("steps", 0) > 0
