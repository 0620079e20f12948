"""Shared helpers of the tests (no tests here; fixtures live in conftest.py): loopback servers,
Label Studio-shaped payloads (as recorded from Label Studio 1.23.2 in
shared/reference/label-studio-1.23.2-calls.jsonl), a fake Label Studio that serves uploads and
its API for fine-tuning, a deterministic colour-region predictor, a synthetic texture class, a
small checkpoint and settings for a backend that trains quickly."""
from __future__ import annotations

import contextlib
import io
import json
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs

import jwt
import numpy as np
import requests
from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle
from PIL import Image
from scipy import ndimage
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from backend.config import Settings
from backend.rle import mask_to_rle
from model.clicks import Click

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Object" background="#FF0000"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Object" smart="true" background="#FF0000"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Object" background="#FF0000"/>
  </RectangleLabels>
</View>"""

PROJECT = "1.1795419391"
API_KEY = "0123456789abcdef0123456789abcdef01234567"  # a legacy token: 40 hex characters


# --- loopback HTTP --------------------------------------------------------------------------


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s: a slow exit in a test's ``finally`` must not replace its own result."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TricklingServer:
    """A raw loopback server that answers every connection with ``head`` at once, then ``tail`` one
    byte every ``interval`` seconds (a slow image source, or one that trickles its headers)."""

    def __init__(self, head: bytes, tail: bytes, interval: float):
        self.head, self.tail, self.interval = head, tail, interval
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.head)
                for i in range(len(self.tail)):
                    if self.stopped.wait(self.interval):
                        return
                    conn.sendall(self.tail[i:i + 1])
            except OSError:
                return

    def close(self):
        self.stopped.set()
        self.listener.close()


@contextlib.contextmanager
def serve(wsgi_app) -> Iterator[str]:
    """Run ``wsgi_app`` on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


class FakeLabelStudio:
    """Serves ``/data/upload/...`` files to requests with ``Authorization: Token <API_KEY>``."""

    def __init__(self):
        self.files: Dict[str, Tuple[bytes, str]] = {}
        self.requests: List[str] = []

    def add(self, path: str, body: bytes, content_type: str = "image/png") -> str:
        self.files[path] = (body, content_type)
        return path

    def __call__(self, environ, start_response):
        request = Request(environ)
        self.requests.append(request.path)
        if request.headers.get("Authorization") != f"Token {API_KEY}":
            response = Response('{"detail": "Authentication credentials were not provided."}', 401,
                                content_type="application/json")
        elif request.path in self.files:
            body, content_type = self.files[request.path]
            response = Response(body, 200, content_type=content_type)
        else:
            response = Response('{"detail": "Not found."}', 404, content_type="application/json")
        return response(environ, start_response)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- Label Studio-shaped payloads --------------------------------------------------------------


def keypoint(x: float, y: float, is_positive: Optional[bool] = True, region_id: str = "",
             width: int = 160, height: int = 120, label: str = "Object") -> dict:
    """A smart keypoint of ``params.context.result`` (x, y in percent); None omits ``is_positive``."""
    item = {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.78, "keypointlabels": [label], "labels": [label]},
        "id": region_id or f"kp{x:.3f}{y:.3f}".replace(".", "")[:10],
        "from_name": "tag2", "to_name": "image", "type": "keypointlabels", "origin": "manual",
    }
    if is_positive is not None:
        item["is_positive"] = is_positive
    return item


def pixel_keypoint(col: int, row: int, is_positive: Optional[bool] = True, width: int = 160, height: int = 120) -> dict:
    """A keypoint on the centre of pixel (row, col)."""
    return keypoint((col + 0.5) / width * 100, (row + 0.5) / height * 100, is_positive, width=width, height=height)


def rectangle(x0: int, y0: int, x1: int, y1: int, width: int = 160, height: int = 120) -> dict:
    """A smart rectangle covering pixels [x0, x1) x [y0, y1)."""
    return {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": x0 / width * 100, "y": y0 / height * 100, "width": (x1 - x0) / width * 100,
                  "height": (y1 - y0) / height * 100, "rotation": 0, "rectanglelabels": ["Object"]},
        "id": f"rect{x0}{y0}", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
    }


def brush_result(mask: np.ndarray, region_id: str, label: str = "Object") -> dict:
    height, width = mask.shape
    return {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
        "id": region_id, "from_name": "tag", "to_name": "image", "type": "brushlabels", "origin": "manual",
    }


def annotation(results: Sequence[dict], annotation_id: int = 1, task_id: int = 1) -> dict:
    return {
        "id": annotation_id, "completed_by": 1, "result": list(results), "was_cancelled": False,
        "ground_truth": False, "created_at": "2026-11-23T07:36:32.695252Z", "updated_at": "2026-11-23T07:36:32.695278Z",
        "draft_created_at": None, "lead_time": 2.0, "prediction": {}, "result_count": len(results),
        "unique_id": "88dbd289-659c-4dce-a875-d51e24c5b9df", "import_id": None, "last_action": None,
        "bulk_created": False, "task": task_id, "project": 1, "updated_by": 1, "parent_prediction": None,
        "parent_annotation": None, "last_created_by": None,
    }


def draft(results: Sequence[dict], draft_id: int = 1, task_id: int = 1, annotation_id: Optional[int] = None) -> dict:
    return {
        "id": draft_id, "user": "e2e@example.com", "created_username": "e2e@example.com, 1",
        "created_ago": "0\u00a0minutes", "result": list(results), "lead_time": 1.0, "was_postponed": False,
        "import_id": None, "created_at": "2026-11-23T07:36:33.298041Z", "updated_at": "2026-11-23T07:36:33.298076Z",
        "task": task_id, "annotation": annotation_id,
    }


def interactive_task(image_url: str, task_id: int = 1, annotations: Sequence[dict] = (),
                     drafts: Sequence[dict] = ()) -> dict:
    """A task as Label Studio expands it for an interactive call (annotations and drafts included)."""
    return {
        "id": task_id, "annotations": list(annotations), "file_upload": image_url.rsplit("/", 1)[-1],
        "drafts": list(drafts),
        "predictions": [{
            "id": 1, "result": [], "model_version": "recording-0.1", "created_ago": "0\u00a0minutes", "score": 0.0,
            "cluster": None, "neighbors": None, "mislabeling": 0.0, "created_at": "2026-11-23T07:36:32.285460Z",
            "updated_at": "2026-11-23T07:36:32.285475Z", "model": None, "model_run": None, "task": task_id, "project": 1,
        }],
        "data": {"image": image_url}, "meta": {}, "created_at": "2026-11-23T07:36:31.869629Z",
        "updated_at": "2026-11-23T07:36:32.282573Z", "allow_skip": True, "inner_id": task_id,
        "total_annotations": len(annotations), "cancelled_annotations": 0, "total_predictions": 1,
        "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1,
        "updated_by": 1, "comment_authors": [],
    }


def batch_task(image_url: str, task_id: int = 2) -> dict:
    """A task as Label Studio sends it for batch predictions (opening a task, Retrieve predictions)."""
    return {
        "id": task_id, "data": {"image": image_url}, "meta": {}, "created_at": "2026-11-23T07:36:31.869686Z",
        "updated_at": "2026-11-23T07:36:31.869691Z", "is_labeled": False, "overlap": 1, "inner_id": task_id,
        "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0,
        "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1, "updated_by": None,
        "file_upload": task_id, "comment_authors": [], "annotations": [], "predictions": [],
    }


def predict_body(tasks: Sequence[dict], context: Optional[dict], label_config: str = LABEL_CONFIG) -> dict:
    return {
        "tasks": list(tasks), "project": PROJECT, "label_config": label_config,
        "params": {"login": None, "password": None, "context": context},
    }


def setup_body(label_config: str = LABEL_CONFIG, hostname: str = "http://127.0.0.1:50819") -> dict:
    return {"project": PROJECT, "schema": label_config, "hostname": hostname, "access_token": API_KEY,
            "extra_params": None}


def webhook_body(action: str) -> dict:
    return {"action": action, "project": {"id": 1, "title": "e2e", "label_config": LABEL_CONFIG},
            "annotation": {"id": 1, "result": [], "task": 1}, "task": {"id": 1, "data": {"image": "/data/upload/1/a.png"}}}


def decode_region(region: dict) -> np.ndarray:
    """The bool mask of a returned brush region, decoded with the Label Studio SDK."""
    height, width = region["original_height"], region["original_width"]
    rgba = sdk_decode_rle(region["value"]["rle"]).reshape(height, width, 4)
    return rgba[:, :, 3] > 0


def post(url: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else None
    json_body = None if data is not None else body
    return requests.post(url, json=json_body, data=data, timeout=kwargs.pop("timeout", 120), **kwargs)


# --- a deterministic stand-in for the network ---------------------------------------------------

BACKGROUND = (0, 0, 0)
HARD = (0, 200, 0)  # object pixels a click elsewhere on the object does not reach


@dataclass
class FakeImageState:
    height: int
    width: int
    image: np.ndarray
    last_output: Optional[np.ndarray] = None

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + (self.last_output.nbytes if self.last_output is not None else 0)


class ColourRegionPredictor:
    """Segments the connected non-background region under each positive click.

    Pixels of colour ``HARD`` join only when a positive click lies on them, and a negative
    click removes the pixels of its colour: enough structure to need refinement clicks.
    Records ``(number of clicks, prev_mask given)`` of every predict call, and its
    ``clicked_components_only`` override.
    """

    model_version = "colour-regions"
    max_working_side = None  # images are decoded at full size

    def __init__(self):
        self.calls: List[Tuple[int, bool]] = []
        self.clicked_components_only: List[Optional[bool]] = []

    def encode_image(self, image: np.ndarray, size=None) -> FakeImageState:
        assert size is None or tuple(size) == image.shape[:2], "the fake works on full-size images only"
        return FakeImageState(image.shape[0], image.shape[1], image)

    def predict(self, state: FakeImageState, clicks: Sequence[Click], prev_mask=None,
                clicked_components_only=None) -> np.ndarray:
        self.clicked_components_only.append(clicked_components_only)
        self.calls.append((len(clicks), prev_mask is not None))
        image = state.image
        foreground = np.any(image != BACKGROUND, axis=2)
        components, _ = ndimage.label(foreground)
        colour_at = lambda c: tuple(image[int(round(c.y)), int(round(c.x))])  # noqa: E731
        hard = np.all(image == HARD, axis=2)
        mask = np.zeros(foreground.shape, bool)
        positives = [c for c in clicks if c.is_positive]
        for c in positives:
            label = components[int(round(c.y)), int(round(c.x))]
            if label:
                mask |= components == label
        if not any(colour_at(c) == HARD for c in positives):
            mask &= ~hard
        for c in clicks:
            if not c.is_positive and colour_at(c) != BACKGROUND:
                mask &= ~np.all(image == colour_at(c), axis=2)
        prob = mask.astype(np.float32)
        state.last_output = prob
        return prob


def three_object_image() -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """A 160x120 scene with objects A (red, with a HARD strip), B (blue, with a cyan part), C (yellow).

    Returns the image and each object's full mask (B's without its cyan part as "B_core").
    """
    image = np.zeros((120, 160, 3), np.uint8)
    image[10:50, 10:40] = (220, 30, 30)   # A: red body
    image[10:50, 40:48] = HARD             # A: a strip the first click misses
    image[60:100, 20:60] = (30, 30, 220)  # B: blue body
    image[60:100, 60:70] = (0, 220, 220)  # B: a cyan part that a negative click removes
    image[20:70, 100:150] = (230, 230, 20)  # C: yellow
    masks = {name: np.zeros((120, 160), bool) for name in ("A_body", "A", "B", "B_core", "C")}
    masks["A_body"][10:50, 10:40] = True
    masks["A"][10:50, 10:48] = True
    masks["B"][60:100, 20:70] = True
    masks["B_core"][60:100, 20:60] = True
    masks["C"][20:70, 100:150] = True
    return image, masks


# --- fine-tuning ---------------------------------------------------------------------------------

PROJECT_ID = 1
SIGNING_KEY = "a-signing-key-that-only-this-fake-label-studio-knows"


def make_pat(expires_in: float = 3600.0) -> str:
    """A Label Studio personal access token: a JWT refresh token."""
    claims = {"token_type": "refresh", "exp": int(time.time() + expires_in), "jti": secrets.token_hex(8), "user_id": 1}
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")


class FakeLabelStudioApi:
    """The parts of Label Studio's API that ``label-studio-sdk`` 2.x calls to export a project:
    ``GET /api/projects/<id>/``, ``GET /api/tasks/?project=&fields=all&page=&page_size=`` (404 past
    the last page, as Label Studio answers), ``GET /api/tasks/<id>/annotations/``,
    ``POST /api/token/refresh/`` (personal access tokens) and ``GET /data/upload/...`` files.

    Accepts ``Authorization: Token <legacy_token>`` and ``Bearer <access token it issued>``.
    """

    def __init__(self, legacy_token: Optional[str] = API_KEY, pat: Optional[str] = None):
        self.legacy_token = legacy_token
        self.pat = pat
        self.access_tokens: set = set()
        self.projects: Dict[int, dict] = {}
        self.tasks: Dict[int, List[dict]] = {}
        self.files: Dict[str, Tuple[bytes, str]] = {}
        self.requests: List[Tuple[str, str, str]] = []  # (method, path, authorization scheme)
        self.url = ""

    # content

    def add_project(self, project_id: int = PROJECT_ID, label_config: str = LABEL_CONFIG, title: str = "textures") -> None:
        self.projects[project_id] = {"id": project_id, "title": title, "label_config": label_config,
                                     "task_number": 0, "created_by": {"id": 1}}
        self.tasks.setdefault(project_id, [])

    def add_task(self, image: Optional[np.ndarray], annotations: Sequence[dict] = (), project_id: int = PROJECT_ID,
                 image_url: Optional[str] = None) -> dict:
        """A task whose image is served at /data/upload/<project>/<task>.png (unless ``image_url`` is given)."""
        task_id = sum(len(t) for t in self.tasks.values()) + 1
        url = image_url or f"/data/upload/{project_id}/task{task_id}.png"
        if image is not None:
            self.files[url] = (png_bytes(image), "image/png")
        task = interactive_task(url, task_id=task_id, annotations=[
            {**a, "id": 100 * task_id + i, "task": task_id, "project": project_id} for i, a in enumerate(annotations)])
        task.update(project=project_id, total_annotations=len(annotations),
                    cancelled_annotations=sum(bool(a.get("was_cancelled")) for a in annotations))
        self.tasks[project_id].append(task)
        return task

    # HTTP

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme == "Token":
            return self.legacy_token is not None and token == self.legacy_token
        return scheme == "Bearer" and token in self.access_tokens

    def __call__(self, environ, start_response):
        request = Request(environ)
        header = request.headers.get("Authorization", "")
        self.requests.append((request.method, request.path, header.partition(" ")[0]))
        if request.path == "/api/token/refresh/" and request.method == "POST":
            return self._refresh(request)(environ, start_response)
        if not self._authorized(header):
            return _json({"detail": "Authentication credentials were not provided."}, 401)(environ, start_response)
        return self._route(request)(environ, start_response)

    def _refresh(self, request: Request) -> Response:
        body = json.loads(request.get_data() or b"{}")
        if self.pat is None or body.get("refresh") != self.pat:
            return _json({"detail": "Token is invalid or expired", "code": "token_not_valid"}, 401)
        access = jwt.encode({"token_type": "access", "exp": int(time.time() + 300), "jti": secrets.token_hex(8)},
                            SIGNING_KEY, algorithm="HS256")
        self.access_tokens.add(access)
        return _json({"access": access}, 200)

    def _route(self, request: Request) -> Response:
        parts = [p for p in request.path.split("/") if p]
        if request.path in self.files:
            body, content_type = self.files[request.path]
            return Response(body, 200, content_type=content_type)
        if parts[:2] == ["api", "projects"] and len(parts) == 3 and parts[2].isdigit():
            project = self.projects.get(int(parts[2]))
            return _json(project, 200) if project else _json({"detail": "Not found."}, 404)
        if parts == ["api", "tasks"]:
            return self._task_page(parse_qs(request.query_string.decode()))
        if parts[:2] == ["api", "tasks"] and len(parts) == 4 and parts[3] == "annotations":
            for tasks in self.tasks.values():
                for task in tasks:
                    if str(task["id"]) == parts[2]:
                        return _json(task["annotations"], 200)
        return _json({"detail": "Not found."}, 404)

    def _task_page(self, query: Dict[str, List[str]]) -> Response:
        project = int(query.get("project", ["0"])[0])
        if project not in self.projects:
            return _json({"detail": "Not found."}, 404)
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
        tasks = self.tasks[project]
        chunk = tasks[(page - 1) * size: page * size]
        if page > 1 and not chunk:
            return _json({"detail": "Invalid page."}, 404)
        full = query.get("fields", [""])[0] == "all"
        listed = [task if full else {k: v for k, v in task.items() if k not in ("annotations", "drafts", "predictions")}
                  for task in chunk]
        return _json({"tasks": listed, "total": len(tasks),
                      "total_annotations": sum(len(t["annotations"]) for t in tasks), "total_predictions": 0}, 200)


def _json(body, status: int) -> Response:
    return Response(json.dumps(body), status, content_type="application/json")


# --- a texture class --------------------------------------------------------------------------------


def texture_scene(seed: int, size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """An image (size, size, 3) uint8 with one elliptic object filled with a fine checker texture whose
    mean colour is the background's there (colour alone does not find it), and its bool mask."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(60, 200, (4, 4, 3)).astype(np.float32)
    background = np.stack([np.asarray(Image.fromarray(coarse[:, :, c]).resize((size, size), Image.BICUBIC))
                           for c in range(3)], axis=-1)
    background = background + rng.normal(0, 6, background.shape)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    ry, rx = rng.uniform(0.15, 0.3, 2) * size
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    checker = (((yy // 3) + (xx // 3)) % 2).astype(np.float32)[..., None]
    texture = background[mask].mean(axis=0) + (checker - 0.5) * 90
    image = np.where(mask[..., None], texture, background)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def brush_annotation(masks: Sequence[np.ndarray], cancelled: bool = False) -> dict:
    return {**annotation([brush_result(m, f"r{i}") for i, m in enumerate(masks)]), "was_cancelled": cancelled}


def small_checkpoint(path: Path, input_size: int = 128, version: str = "small-untrained-head") -> Path:
    """An effnet-lite with the ImageNet backbone and an untrained click head: it handles textures poorly."""
    from model.checkpoint import save_checkpoint
    from model.nets.effnet_lite import load_imagenet_backbone
    from model.nets.registry import create_model

    net = create_model("effnet-lite", {"input_size": input_size})
    load_imagenet_backbone(net)
    return save_checkpoint(net, path, meta={"version": version, "steps": 0}, half=True)


FAST_FIT = {"FIT_STEPS": "30", "FIT_LR": "0.001", "FIT_BATCH_SIZE": "4", "TRAIN_THREADS": "1",
            "FIT_EVAL_MAX_CLICKS": "10", "CFR_STEPS": "1", "DEVICE": "cpu", "LOG_LEVEL": "WARNING"}


def fit_env(label_studio_url: str, model_dir: Path, checkpoint: Path, **overrides: str) -> Dict[str, str]:
    return {"LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": API_KEY, "MODEL_DIR": str(model_dir),
            "CHECKPOINT": str(checkpoint), **FAST_FIT, **overrides}


def fit_settings(label_studio_url: str, model_dir: Path, checkpoint: Path, **overrides: str) -> Settings:
    return Settings.from_env(fit_env(label_studio_url, model_dir, checkpoint, **overrides))


def start_training_body(project_id: int = PROJECT_ID) -> dict:
    """START_TRAINING as Label Studio 1.23.2 sends it (shared/reference, trimmed): no tasks, no annotations."""
    return {"action": "START_TRAINING", "project": {
        "id": project_id, "task_number": 3, "finished_task_number": 1, "total_annotations_number": 1,
        "title": "textures", "label_config": LABEL_CONFIG, "model_version": "", "min_annotations_to_start_training": 0,
        "organization": 1, "created_by": 1}}


def annotation_created_body(task: dict, annotation_entry: dict) -> dict:
    """ANNOTATION_CREATED as Label Studio 1.23.2 sends it (shared/reference, trimmed)."""
    return {"action": "ANNOTATION_CREATED", "annotation": annotation_entry,
            "project": {"id": task["project"], "title": "textures", "label_config": LABEL_CONFIG},
            "task": {k: task[k] for k in ("id", "data", "meta", "created_at", "updated_at", "project")}}
