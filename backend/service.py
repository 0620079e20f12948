"""The Label Studio model: label_studio_ml 2.x-shaped ``predict`` / ``fit`` around the predictor.

    model = ClickSegModel(Settings.from_env())
    model.predict(tasks, context)   # -> one {"result", "score", "model_version"} per task
    model.fit("START_TRAINING", data)   # -> {"status": "training started (job ...)"}

Interactive requests (``context`` with smart keypoints / rectangles) return the current
object's brush mask; batch requests (``context`` None) return empty results at once,
without touching images or the model. The predictor is loaded lazily, in the process
that serves (gunicorn loads it after forking), and all model calls are serialised.

Each project is served its promoted fine-tuned version when it has one
(``MODEL_DIR/<project>/current.json``, see ``backend.training_jobs``), else the default
checkpoint. ``START_TRAINING`` starts a fine-tuning job in a separate process; annotation
webhooks and interactive requests keep the exemplar store (``backend.exemplars``) current.

Exemplar recall (RECALL, models with a recall branch): the first click of a new object, on a
task with accepted regions of the clicked label, also returns one region per other object
like them (``backend.proposals``). The click-independent recall features of an image are
computed in a background thread after its first interactive request (every interactive
session while RECALL is on, since any task may get exemplars), so that the click that
triggers recall usually pays only the recall head.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from model.boxes import Box
from model.clicks import Click
from model.predictor import ClickSegPredictor, ImageState

from .click_selection import ClickHistory, ObjectTracker, RegionMasks, TrackedObject
from .config import Settings
from .errors import BackendError
from .exemplars import SQLiteExemplarStore, TaskRegions, project_key, regions_from_task, regions_from_webhook
from .images import ImageFetcher
from .payload import (
    Prompt,
    bad_request,
    current_group,
    parse_context,
    parse_label_config,
    task_id,
    task_image_url,
)
from .model_thread import ModelThread
from .proposals import AcceptedRegions, BoxMask, ObjectProposals
from .rle import mask_to_rle
from .sessions import SessionKey, SessionStore, TaskSession
from .training_jobs import JobManager, ProjectModels

log = logging.getLogger(__name__)

TRAINING_EVENTS = ("START_TRAINING",)
CREATED_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu`` (call only after forking)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def normalized_project(project: Any) -> Optional[str]:
    """The project id ("1.1795419391", 1, {"id": 1} -> "1"), None when there is no usable one."""
    try:
        return project_key(project)
    except ValueError:
        return None


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
        self._model_thread = ModelThread()  # every model call of the process, one at a time
        self.fetcher = fetcher or ImageFetcher(settings.image_access)
        self.sessions = SessionStore(settings.session_cache_bytes)
        self._label_configs: Dict[str, str] = {}  # project -> label config from /setup
        self._setup_access_token: Optional[str] = None
        self.project_models: ProjectModels[ClickSegPredictor] = ProjectModels(settings.model_dir, self._load_project_checkpoint)
        self.jobs = JobManager(settings, setup_access_token=lambda: self._setup_access_token)
        self._exemplars: Optional[SQLiteExemplarStore] = None
        self._exemplars_failed = False
        self._exemplars_lock = threading.Lock()
        self._recall_warmer: Optional[ThreadPoolExecutor] = None  # one background thread per process
        self._recall_warmer_pid: Optional[int] = None
        self._recall_warming: Set[SessionKey] = set()  # session keys queued for warm-up
        self._recall_warmer_lock = threading.Lock()

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
                        self._predictor = self._model_thread.run(self._predictor_factory)
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
        """The default model's version (projects without a promoted fine-tuned version)."""
        return self.predictor.model_version

    def _load_project_checkpoint(self, path) -> ClickSegPredictor:
        return self._model_thread.run(ClickSegPredictor.from_checkpoint, path, device=resolve_device(self.settings.device),
                                      cfr_steps=self.settings.cfr_steps)

    def predictor_for(self, project: Any) -> ClickSegPredictor:
        """The project's promoted fine-tuned predictor, or the default one."""
        key = normalized_project(project)
        served = self.project_models.get(key) if key is not None else None
        return served if served is not None else self.predictor

    @property
    def exemplars(self) -> Optional[SQLiteExemplarStore]:
        """The exemplar store (``MODEL_DIR/exemplars.sqlite3``), opened on first use; None if it cannot be."""
        if self._exemplars is None and not self._exemplars_failed:
            with self._exemplars_lock:
                if self._exemplars is None and not self._exemplars_failed:
                    path = self.settings.model_dir / "exemplars.sqlite3"
                    try:
                        self._exemplars = SQLiteExemplarStore(path, max_tasks=self.settings.exemplar_max_tasks)
                    except (OSError, sqlite3.Error) as exc:
                        self._exemplars_failed = True
                        log.error("the exemplar store cannot be opened; accepted masks are not remembered",
                                  extra={"path": str(path), "reason": str(exc)})
        return self._exemplars

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
        self._setup_access_token = (access_token or "").strip() or None
        if hostname and not self.settings.image_access.label_studio_url:
            log.warning("LABEL_STUDIO_URL is not set, so uploaded images cannot be downloaded; "
                        "Label Studio reports its address as %s", hostname, extra={"hostname": hostname})
        return {"model_version": self.predictor_for(project).model_version}

    def versions(self) -> Dict[str, Any]:
        """``versions``: every servable version (the default first); ``projects``: per project, the
        version served and each fine-tuned version with its evaluation."""
        default = self.model_version
        projects = {}
        for project in self.jobs.projects():
            trained = self.jobs.versions(project)
            if trained:
                projects[project] = {"served": self.jobs.served_version(project) or default, "versions": trained}
        names = [default] + [v["version"] for p in projects.values() for v in p["versions"]]
        return {"versions": names, "default": default, "projects": projects}

    def job_status(self, project: Any) -> Dict[str, Any]:
        """``GET /jobs/<project>``: the last training job of the project and the version it is served."""
        key = normalized_project(project)
        if key is None:
            raise bad_request(f"{project!r} is not a Label Studio project id")
        job = self.jobs.status(key)
        served = self.jobs.served_version(key)
        if served is None:
            try:
                served = self.model_version
            except BackendError as exc:
                job["serving_error"] = exc.message
        job["served_version"] = served
        return job

    def predict(self, tasks: Sequence[Any], context: Optional[Mapping[str, Any]] = None,
                label_config: Optional[str] = None, project: Any = None, **kwargs: Any) -> List[Dict[str, Any]]:
        """One ``{"result", "score", "model_version"}`` per task."""
        if context is None:
            return self._batch(tasks, project)
        if len(tasks) != 1:
            raise bad_request(f"an interactive request (params.context set) must carry exactly one task, got {len(tasks)}")
        return [self._interactive(tasks[0], context, label_config, "" if project is None else str(project))]

    def check_webhook(self, event: str, data: Mapping[str, Any]) -> None:
        """Raise a 400 naming the problem when a webhook payload is malformed (quick: no I/O)."""
        try:
            if event in TRAINING_EVENTS:
                project_key(data.get("project"))
            regions_from_webhook(data)
        except ValueError as exc:
            raise bad_request(f"malformed {event} webhook: {exc}") from None

    def fit(self, event: str, data: Mapping[str, Any], **kwargs: Any) -> Dict[str, str]:
        """Webhook events: ``START_TRAINING`` starts a fine-tuning job for the project (in another
        process; answers at once); annotation events update the exemplar store and, with
        TRAIN_EVERY_N_ANNOTATIONS, start a job every N new annotations."""
        self.check_webhook(event, data)
        if event in TRAINING_EVENTS:
            return {"status": self.jobs.start(project_key(data.get("project")), trigger=event).status}
        changes = regions_from_webhook(data)
        if changes is None:
            return {"status": "ignored"}
        store = self.exemplars
        if store is not None:
            try:
                store.apply_webhook(changes)
            except (ValueError, sqlite3.Error) as exc:
                log.error("exemplar store update failed", extra={"event": event, "reason": str(exc)})
        status = "ok"
        if event in CREATED_EVENTS:
            created = sum(1 for task in changes.tasks for regions in task.sources.values() if regions)
            if self.jobs.count_annotations(changes.project, created):
                status = "ok; training started"
        return {"status": status}

    # --- batch -----------------------------------------------------------------------------------

    def _batch(self, tasks: Sequence[Any], project: Any = None) -> List[Dict[str, Any]]:
        """Empty predictions: masks need clicks. Never loads images and never fails."""
        try:
            version = self.predictor_for(project).model_version
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
        known_project = normalized_project(project or task.get("project"))
        task_regions = regions_from_task(task, known_project or "0")  # task id checked above
        regions = task_regions.on_image(newest.image, brush_label)
        predictor = self.predictor_for(project or task.get("project"))
        version = predictor.model_version
        recall_on = self.settings.recall and bool(getattr(predictor, "has_recall", False))
        # With recall, accepted regions of every label on the image are kept out of proposals.
        accepted_regions = task_regions.on_image(newest.image) if recall_on else regions

        # Sessions hold the model's image features: one model version never reads another's.
        key = (project, tid, url, version)
        project_id = task.get("project") if isinstance(task.get("project"), int) else None
        session = self.sessions.get_or_create(key, lambda: self._open_session(predictor, url, tid, project_id))
        if known_project is not None:
            self._sync_exemplars(task_regions, session.image_state)
        with session.lock:
            state = session.image_state
            group = (newest.image, newest.label)
            history = session.histories.setdefault(group, ClickHistory())
            if session.last_group not in (None, group):  # a label switch finishes the other label's object
                finished = session.histories.get(session.last_group)
                if finished is not None:
                    finished.finished = True
            session.last_group = group
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
            decoded = RegionMasks(accepted_regions, history.region_masks)  # shares saved's decoded masks
            proposals, recall_ms = [], 0.0
            if recall_on:
                recall_started = time.perf_counter()
                try:
                    proposals = self._proposals(predictor, state, history, obj, decoded, task, project, tid,
                                                newest.image, brush_label)
                except Exception as exc:  # recall is a bonus: never fail the object's answer
                    history.proposals = None
                    log.warning("exemplar recall failed; answering the object's region only",
                                extra={"task": tid, "reason": f"{type(exc).__name__}: {exc}"})
                recall_ms = (time.perf_counter() - recall_started) * 1000
            else:
                history.proposals = None
            decoded.prune()
            mask = obj.mask
            score = float(obj.prob[mask].mean()) if mask.any() else 0.0
            height, width = state.height, state.width
            self.sessions.remeasure(key)  # under the session lock: no request changes it meanwhile
        if recall_on and state.recall_features is None:
            self._warm_recall(predictor, key, session)

        def brush(region_id: str, region_mask: np.ndarray, region_score: float,
                  box: Optional[Box] = None) -> Dict[str, Any]:
            """A brush region of ``region_mask`` (the whole image's, or the part inside ``box``)."""
            rle = mask_to_rle(region_mask, box=box, shape=None if box is None else (height, width))
            return {
                "id": region_id,
                "from_name": brush_control,
                "to_name": newest.image,
                "type": "brushlabels",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {"format": "rle", "rle": rle, "brushlabels": [brush_label]},
                "score": region_score,
            }

        result = [brush(obj.result_id, mask, score)] + [brush(region_id, crop, proposal_score, box)
                                                         for region_id, crop, box, proposal_score in proposals]
        log.info("interactive prediction", extra={
            "task": tid, "prompts": len(prompts), "object_clicks": len(obj.clicks), "object_start": obj.start,
            "object_id": obj.result_id, "saved_regions": [r.region_id for r in regions],
            "model_calls": tracker.predictions, "mask_pixels": int(mask.sum()),
            "proposals": len(proposals), "recall_ms": round(recall_ms, 1),
            "ms": round((time.perf_counter() - started) * 1000, 1),
        })
        return {"result": result, "score": score, "model_version": version}

    # --- exemplar recall ---------------------------------------------------------------------------

    def _proposals(self, predictor: ClickSegPredictor, state: ImageState, history: ClickHistory,
                   obj: TrackedObject, decoded: RegionMasks, task: Mapping[str, Any], project: str, tid: int,
                   image: str, label: str) -> List[Tuple[str, np.ndarray, Box, float]]:
        """``(region id, mask in box, box, score)`` of the current object's proposals (call under the session lock).

        Computed on the object's first click when the task has accepted regions of ``label``,
        then kept in ``history`` and returned again while the object is refined.
        """
        cached = history.proposals
        if cached is not None and not cached.belongs_to(obj.result_id, obj.start):
            cached = history.proposals = None  # an earlier object's
        first_click = len(obj.clicks) == 1 and obj.clicks[0].is_positive
        if cached is None and not first_click:
            return []
        accepted = self._accepted_regions(decoded, task, project, tid, image, label, state.height, state.width,
                                          current_id=obj.result_id)
        if first_click and (cached is None or cached.exemplar_ids != accepted.exemplar_ids):
            history.proposals = None
            if not accepted.exemplar_ids:
                return []
            settings = self.settings
            found = self._model_thread.run(
                predictor.propose, state, accepted.exemplar, obj.clicks, obj.prob,
                exclude=accepted.covered, min_score=settings.recall_min_score,
                min_area=settings.recall_min_area, max_proposals=settings.recall_max_proposals)
            cached = history.proposals = ObjectProposals.of(obj.result_id, obj.start, accepted.exemplar_ids, found)
        return cached.visible(accepted, obj.mask, self.settings.recall_min_area)

    def _accepted_regions(self, decoded: RegionMasks, task: Mapping[str, Any], project: str, tid: int, image: str,
                          label: str, height: int, width: int, current_id: str) -> AcceptedRegions:
        """The task's accepted regions on ``image``: the payload's, plus the store's that it lacks.

        The region of the object being refined (``current_id``, e.g. auto-accepted) is not
        accepted; regions of another size or with a corrupt RLE are skipped.
        """
        accepted = AcceptedRegions(height, width)
        for index, region in enumerate(decoded.regions):
            mask = decoded.mask(index) if self._fits(region, current_id, height, width) else None
            if mask is not None:
                accepted.add(region.region_id, mask, label in region.labels)
        store = self.exemplars
        key = normalized_project(project or task.get("project"))
        if store is None or key is None:
            return accepted
        try:
            stored = store.accepted_masks(key, tid)
        except (ValueError, sqlite3.Error) as exc:
            log.warning("exemplar store unreadable; recall uses the payload's regions",
                        extra={"task": tid, "reason": str(exc)})
            return accepted
        for exemplar in stored:
            if (exemplar.region_id in accepted.ids or exemplar.to_name not in ("", image)
                    or not self._fits(exemplar, current_id, height, width)):
                continue
            try:
                mask = exemplar.mask
            except ValueError as exc:
                log.warning("ignoring a stored region with a corrupt RLE",
                            extra={"task": tid, "region_id": exemplar.region_id, "reason": str(exc)})
                continue
            accepted.add(exemplar.region_id, BoxMask.of(mask), label in exemplar.labels)
        return accepted

    @staticmethod
    def _fits(region: Any, current_id: str, height: int, width: int) -> bool:
        """Whether a ``BrushRegion`` or ``Exemplar`` is another object's region of the image's size."""
        return region.region_id != current_id and (region.height, region.width) == (height, width)

    def _warm_recall(self, predictor: ClickSegPredictor, key: SessionKey, session: TaskSession) -> None:
        """Queue the image's recall features for the background thread (once per session at a time)."""
        with self._recall_warmer_lock:
            if key in self._recall_warming:
                return
            if self._recall_warmer is None or self._recall_warmer_pid != os.getpid():  # none yet, or forked
                self._recall_warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recall-warmup")
                self._recall_warmer_pid = os.getpid()
                self._recall_warming = set()
            self._recall_warming.add(key)
            self._recall_warmer.submit(self._encode_recall, predictor, key, session)

    def _encode_recall(self, predictor: ClickSegPredictor, key: SessionKey, session: TaskSession) -> None:
        started = time.perf_counter()
        try:
            if key not in self.sessions.cache:
                return  # evicted meanwhile
            if session.image_state.recall_features is not None:
                return
            self._model_thread.run(predictor.encode_recall, session.image_state)  # a no-op once computed
            with session.lock:
                self.sessions.remeasure(key)
            log.debug("recall features computed in the background", extra={
                "task": key[1], "ms": round((time.perf_counter() - started) * 1000, 1)})
        except Exception as exc:
            log.warning("recall warm-up failed", extra={"task": key[1], "reason": f"{type(exc).__name__}: {exc}"})
        finally:
            with self._recall_warmer_lock:
                self._recall_warming.discard(key)

    def _sync_exemplars(self, task_regions: TaskRegions, state: ImageState) -> None:
        """Store the task's accepted brush masks (annotations, drafts); never fails the request."""
        store = self.exemplars
        if store is None:
            return
        try:
            store.sync_task(task_regions, image_size=(state.height, state.width))
        except (ValueError, sqlite3.Error) as exc:
            log.warning("exemplar sync skipped", extra={"task": task_regions.task_id, "reason": str(exc)})

    def _open_session(self, predictor: ClickSegPredictor, url: str, tid: int, project_id: Optional[int]) -> TaskSession:
        started = time.perf_counter()
        image = self.fetcher.fetch(url, task_id=tid, project_id=project_id)
        state = self._model_thread.run(predictor.encode_image, image)
        log.info("image fetched and encoded", extra={"task": tid, "width": state.width, "height": state.height,
                                          "ms": round((time.perf_counter() - started) * 1000, 1)})
        return TaskSession(image_state=state)

    def _run_model(self, predictor: ClickSegPredictor, state: ImageState, clicks: List[Click],
                   prev: Optional[np.ndarray]) -> np.ndarray:
        try:
            return self._model_thread.run(predictor.predict, state, clicks, prev_mask=prev)
        except ValueError as exc:
            raise bad_request(f"the model rejected the clicks: {exc}") from None
