"""Shared helpers of the fine-tuning tests (no tests here): a fake Label Studio API on loopback,
a synthetic texture class, a small checkpoint and settings for a backend that trains quickly."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs

import jwt
import numpy as np
from PIL import Image
from werkzeug.wrappers import Request, Response

from backend.config import Settings
from test_server_support import API_KEY, LABEL_CONFIG, annotation, brush_result, interactive_task, png_bytes

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
    from model.effnet_lite import load_imagenet_backbone
    from model.registry import create_model

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
            "project": {"id": task["project"], "title": "textures"},
            "task": {k: task[k] for k in ("id", "data", "meta", "created_at", "updated_at", "project")}}
