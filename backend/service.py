"""The Label Studio model: label_studio_ml 2.x-shaped ``predict`` / ``fit`` around the predictor.

    model = ClickSegModel(Settings.from_env())
    model.predict(tasks, context)   # -> one {"result", "score", "model_version"} per task
    model.fit("START_TRAINING", data)

Interactive requests (``context`` with smart keypoints / rectangles) return the current
object's brush mask; batch requests (``context`` None) return empty results at once,
without touching images or the model. The predictor is loaded lazily, in the process
that serves (gunicorn loads it after forking), and all model calls are serialised.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from model.clicks import Click
from model.predictor import ClickSegPredictor, ImageState

from .click_selection import ClickHistory, ObjectTracker, RegionMasks
from .config import Settings
from .errors import BackendError
from .images import ImageFetcher
from .payload import (
    Prompt,
    bad_request,
    current_group,
    finished_brush_regions,
    parse_context,
    parse_label_config,
    task_id,
    task_image_url,
)
from .rle import mask_to_rle
from .sessions import SessionStore, TaskSession

log = logging.getLogger(__name__)

TRAINING_EVENTS = ("START_TRAINING",)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu`` (call only after forking)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def object_id(project: str, task: int, prompt: Prompt) -> str:
    """Stable 10-hex-digit region id of the object that ``prompt`` starts."""
    digest = hashlib.sha1(repr((project, task, prompt.image, prompt.label, prompt.key)).encode()).hexdigest()
    return digest[:10]


class ClickSegModel:
    """Click-based interactive segmentation for Label Studio.

    ``predictor_factory`` (tests) replaces ``ClickSegPredictor.from_checkpoint(CHECKPOINT)``;
    ``fetcher`` replaces ``ImageFetcher(settings.image_access)``.
    """

    def __init__(
        self,
        settings: Settings,
        predictor_factory: Optional[Callable[[], ClickSegPredictor]] = None,
        fetcher: Optional[ImageFetcher] = None,
    ):
        self.settings = settings
        self._predictor_factory = predictor_factory or self._load_checkpoint
        self._predictor: Optional[ClickSegPredictor] = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one model call at a time per process
        self.fetcher = fetcher or ImageFetcher(settings.image_access)
        self.sessions = SessionStore(settings.session_cache_bytes)
        self._label_configs: Dict[str, str] = {}  # project -> label config from /setup

    # --- model ---------------------------------------------------------------------------------

    def _load_checkpoint(self) -> ClickSegPredictor:
        device = resolve_device(self.settings.device)
        return ClickSegPredictor.from_checkpoint(
            self.settings.checkpoint, device=device, cfr_steps=self.settings.cfr_steps
        )

    @property
    def predictor(self) -> ClickSegPredictor:
        """The predictor, loaded on first use; a load failure is a 503 naming the cause."""
        if self._predictor is None:
            with self._load_lock:
                if self._predictor is None:
                    started = time.perf_counter()
                    try:
                        self._predictor = self._predictor_factory()
                    except (OSError, ValueError, RuntimeError) as exc:
                        log.error("model failed to load", extra={"checkpoint": str(self.settings.checkpoint), "reason": str(exc)})
                        raise BackendError(
                            f"the model could not be loaded from CHECKPOINT={self.settings.checkpoint}: {exc}", status=503
                        ) from None
                    log.info("model loaded", extra={"model_version": self._predictor.model_version,
                                                    "seconds": round(time.perf_counter() - started, 3)})
        return self._predictor

    def ensure_loaded(self) -> None:
        self.predictor  # noqa: B018 (loads it)

    @property
    def model_version(self) -> str:
        return self.predictor.model_version

    # --- label_studio_ml 2.x interface ---------------------------------------------------------

    def setup(self, project: Any, schema: Optional[str], hostname: Optional[str] = None,
              access_token: Optional[str] = None, extra_params: Any = None) -> Dict[str, str]:
        """Remember the project's label config and Label Studio's legacy token (a fallback for images)."""
        if schema:
            config = parse_label_config(schema)
            if not any(c.tag == "BrushLabels" for c in config.controls.values()):
                log.warning("the label config has no BrushLabels control; interactive requests will fail",
                            extra={"project": str(project)})
            self._label_configs[str(project)] = schema
        self.fetcher.set_setup_access_token(access_token)
        if hostname and not self.settings.image_access.label_studio_url:
            log.warning("LABEL_STUDIO_URL is not set, so uploaded images cannot be downloaded; "
                        "Label Studio reports its address as %s", hostname, extra={"hostname": hostname})
        return {"model_version": self.model_version}

    def versions(self) -> List[str]:
        return [self.model_version]

    def predict(self, tasks: Sequence[Any], context: Optional[Mapping[str, Any]] = None,
                label_config: Optional[str] = None, project: Any = None, **kwargs: Any) -> List[Dict[str, Any]]:
        """One ``{"result", "score", "model_version"}`` per task."""
        if context is None:
            return self._batch(tasks)
        if len(tasks) != 1:
            raise bad_request(f"an interactive request (params.context set) must carry exactly one task, got {len(tasks)}")
        return [self._interactive(tasks[0], context, label_config, "" if project is None else str(project))]

    def fit(self, event: str, data: Mapping[str, Any], **kwargs: Any) -> Dict[str, str]:
        """Webhook events. Training is a later issue: START_TRAINING is acknowledged, nothing else is handled."""
        if event in TRAINING_EVENTS:
            log.warning("training requested but not implemented yet", extra={"event": event})
            return {"status": "training not implemented yet"}
        return {"status": "ignored"}

    # --- batch -----------------------------------------------------------------------------------

    def _batch(self, tasks: Sequence[Any]) -> List[Dict[str, Any]]:
        """Empty predictions: masks need clicks. Never loads images and never fails."""
        try:
            version = self.model_version
        except BackendError:
            version = self.settings.checkpoint.stem
        return [{"result": [], "score": 0.0, "model_version": version} for _ in tasks]

    # --- interactive -------------------------------------------------------------------------------

    def _interactive(self, task: Any, context: Mapping[str, Any], label_config: Optional[str], project: str) -> Dict[str, Any]:
        started = time.perf_counter()
        if not isinstance(task, Mapping):
            raise bad_request(f"tasks[0] must be an object, got {type(task).__name__}")
        config_xml = label_config or self._label_configs.get(project)
        if not config_xml:
            raise bad_request("the request has no label_config and /setup has not sent this project's schema")
        config = parse_label_config(config_xml)
        prompts = current_group(parse_context(context, config))
        newest = prompts[-1]
        brush_control, brush_label = config.brush_output(newest.image, newest.label)
        tid = task_id(task, "tasks[0]")
        url = task_image_url(task, config, newest.image, "tasks[0]")
        regions = finished_brush_regions(task, newest.image, brush_label)
        predictor = self.predictor

        key = (project, tid, url)
        project_id = task.get("project") if isinstance(task.get("project"), int) else None
        session = self.sessions.get_or_create(key, lambda: self._open_session(url, tid, project_id))
        with session.lock:
            state = session.image_state
            group = (newest.image, newest.label)
            history = session.histories.setdefault(group, ClickHistory())
            tracker = ObjectTracker(
                state.height, state.width,
                predict=lambda clicks, prev: self._run_model(predictor, state, clicks, prev),
                object_id=lambda prompt: object_id(project, tid, prompt),
            )
            saved = RegionMasks(regions, history.region_masks)
            try:
                obj = tracker.segment(history, prompts, saved)
            except BaseException:
                session.histories.pop(group, None)  # never keep a half-applied history
                raise
            saved.prune()
            mask = obj.mask
            score = float(obj.prob[mask].mean()) if mask.any() else 0.0
            rle = mask_to_rle(mask)
            height, width = state.height, state.width
        self.sessions.remeasure(key)

        version = predictor.model_version
        region = {
            "id": obj.result_id,
            "from_name": brush_control,
            "to_name": newest.image,
            "type": "brushlabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": rle, "brushlabels": [brush_label]},
            "score": score,
        }
        log.info("interactive prediction", extra={
            "task": tid, "prompts": len(prompts), "object_clicks": len(obj.clicks), "object_start": obj.start,
            "model_calls": tracker.predictions, "mask_pixels": int(mask.sum()),
            "ms": round((time.perf_counter() - started) * 1000, 1),
        })
        return {"result": [region], "score": score, "model_version": version}

    def _open_session(self, url: str, tid: int, project_id: Optional[int]) -> TaskSession:
        started = time.perf_counter()
        image = self.fetcher.fetch(url, task_id=tid, project_id=project_id)
        with self._model_lock:
            state = self.predictor.encode_image(image)
        log.info("image fetched and encoded", extra={"task": tid, "width": state.width, "height": state.height,
                                          "ms": round((time.perf_counter() - started) * 1000, 1)})
        return TaskSession(image_state=state)

    def _run_model(self, predictor: ClickSegPredictor, state: ImageState, clicks: List[Click],
                   prev: Optional[np.ndarray]) -> np.ndarray:
        with self._model_lock:
            try:
                return predictor.predict(state, clicks, prev_mask=prev)
            except ValueError as exc:
                raise bad_request(f"the model rejected the clicks: {exc}") from None
