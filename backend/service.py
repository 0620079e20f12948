"""The Label Studio model: label_studio_ml 2.x-shaped ``predict`` / ``fit`` around the predictor.

    model = ClickSegModel(Settings.from_env())
    model.predict(tasks, context)   # -> one {"result", "score", "model_version"} per task
    model.fit("START_TRAINING", data)   # -> {"status": "training started (job ...)"}

This is the façade: setup, predict, fit, versions, jobs and model loading. Interactive
requests (``context`` with smart keypoints / rectangles) are parsed here and answered by
``backend.interactive``, with the predictor and the exemplar store passed in; batch requests
(``context`` None) return empty results at once, without touching images or the model. The
predictor is loaded lazily, in the process that serves (gunicorn loads it after forking), and
all model calls are serialised on one thread (``backend.model_thread``).

Each project is served its promoted fine-tuned version when it has one
(``MODEL_DIR/<project>/current.json``, see ``backend.training_jobs``), else the default
checkpoint. ``START_TRAINING`` starts a fine-tuning job in a separate process; annotation
webhooks and interactive requests keep the exemplar store (``backend.exemplars``) current.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from model.predictor import ClickSegPredictor

from .config import Settings
from .errors import BackendError, short_repr
from .exemplars import ExemplarStore, SQLiteExemplarStore, StoreError, project_key, regions_from_webhook
from .images import ImageFetcher
from .interactive import InteractivePipeline, InteractiveRequest, normalized_project
from .model_thread import ModelThread
from .payload import bad_request, parse_label_config
from .redis_state import RedisExemplarStore
from .training_jobs import JobManager, ProjectModels

log = logging.getLogger(__name__)

MAX_LABEL_CONFIGS = 256  # label configs from /setup kept (least recently set dropped first)
MAX_PROJECT_CHARS = 40  # "<id>.<timestamp>" as Label Studio sends it
TRAINING_EVENTS = ("START_TRAINING",)
CREATED_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED")
STORE_RETRY_S = 30.0  # an exemplar store that could not be opened is tried again after this


def request_project(project: Any) -> str:
    """The ``project`` of a request as a key: "" when absent; a 400 unless a short string or integer."""
    if project is None:
        return ""
    if isinstance(project, bool) or not isinstance(project, (str, int)) or len(str(project)) > MAX_PROJECT_CHARS:
        raise bad_request(f"project must be a Label Studio project id (at most {MAX_PROJECT_CHARS} characters), "
                          f"got {short_repr(project)}")
    return str(project)


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
        self.interactive = InteractivePipeline(settings, self.fetcher, self._model_thread)
        self._label_configs: "OrderedDict[str, str]" = OrderedDict()  # project key -> label config from /setup
        self._setup_access_token: Optional[str] = None
        self.project_models: ProjectModels[ClickSegPredictor] = ProjectModels(settings.model_dir, self._load_project_checkpoint)
        self.jobs = JobManager(settings, setup_access_token=lambda: self._setup_access_token)
        self._exemplars: Optional[ExemplarStore] = None
        self._exemplars_retry_at = 0.0  # after a failed open, the next attempt is not before this (monotonic)
        self._exemplars_lock = threading.Lock()

    # --- model ---------------------------------------------------------------------------------

    def _load_checkpoint(self) -> ClickSegPredictor:
        return ClickSegPredictor.from_checkpoint(self.settings.checkpoint, **self.settings.predictor_options())

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
                            f"the model could not be loaded from CHECKPOINT={self.settings.checkpoint} "
                            f"(CFR_STEPS={self.settings.cfr_steps}, CLICK_REFINEMENT="
                            f"{'default' if self.settings.click_refinement is None else self.settings.click_refinement}): "
                            f"{exc}", status=503
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
        return self._model_thread.run(ClickSegPredictor.from_checkpoint, path, **self.settings.predictor_options())

    def predictor_for(self, project: Any) -> ClickSegPredictor:
        """The project's promoted fine-tuned predictor, or the default one."""
        key = normalized_project(project)
        served = self.project_models.get(key) if key is not None else None
        return served if served is not None else self.predictor

    @property
    def exemplars(self) -> Optional[ExemplarStore]:
        """The exemplar store (EXEMPLAR_STORE: ``MODEL_DIR/exemplars.sqlite3`` or Redis), opened on first
        use; None while it cannot be (logged; tried again after STORE_RETRY_S), and requests go on without it."""
        if self._exemplars is None and time.monotonic() >= self._exemplars_retry_at:
            with self._exemplars_lock:
                if self._exemplars is None and time.monotonic() >= self._exemplars_retry_at:
                    self._exemplars = self._open_exemplar_store()
                    if self._exemplars is None:
                        self._exemplars_retry_at = time.monotonic() + STORE_RETRY_S
        return self._exemplars

    def _open_exemplar_store(self) -> Optional[ExemplarStore]:
        scale, max_tasks = self.settings.scale, self.settings.exemplar_max_tasks
        try:
            if scale.exemplar_store == "redis":
                return RedisExemplarStore(scale.redis_url, max_tasks=max_tasks)
            return SQLiteExemplarStore(self.settings.model_dir / "exemplars.sqlite3", max_tasks=max_tasks)
        except (OSError, StoreError) as exc:
            log.error("the exemplar store cannot be opened; accepted masks are not remembered for now",
                      extra={"store": scale.exemplar_store, "reason": str(exc)})
            return None

    # --- label_studio_ml 2.x interface ---------------------------------------------------------

    def setup(self, project: Any, schema: Optional[str], hostname: Optional[str] = None,
              access_token: Optional[str] = None, extra_params: Any = None) -> Dict[str, str]:
        """Remember the project's label config and Label Studio's legacy token (a fallback for images)."""
        if schema:
            config = parse_label_config(schema)
            if not config.has_brush:
                log.warning("the label config has no BrushLabels control; interactive requests will fail",
                            extra={"project": str(project)})
            key = request_project(project)
            self._label_configs[key] = schema
            self._label_configs.move_to_end(key)
            while len(self._label_configs) > MAX_LABEL_CONFIGS:
                self._label_configs.popitem(last=False)
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
        project = request_project(project)
        config_xml = label_config or self._label_configs.get(project)
        if not config_xml:
            raise bad_request("the request has no label_config and /setup has not sent this project's schema")
        request = InteractiveRequest.parse(tasks[0], context, config_xml, project)
        return [self.interactive.answer(request, self.predictor_for(request.project_key), self.exemplars)]

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
            project = project_key(data.get("project"))
            if not self._knows_project(project, data):
                raise bad_request(f"{event} for project {project}, which this backend has not seen: connect the "
                                  "model in the project's settings (Label Studio then calls /setup), or send the "
                                  "webhook as Label Studio does, with the project's label_config")
            return {"status": self.jobs.start(project, trigger=event).status}
        changes = regions_from_webhook(data)
        if changes is None:
            return {"status": "ignored"}
        store = self.exemplars
        if store is not None:
            try:
                store.apply_webhook(changes)
            except (ValueError, StoreError) as exc:
                log.error("exemplar store update failed", extra={"event": event, "reason": str(exc)})
        status = "ok"
        if event in CREATED_EVENTS and self._knows_project(changes.project, data):
            created = sum(1 for task in changes.tasks for regions in task.sources.values() if regions)
            if self.jobs.count_annotations(changes.project, created):
                status = "ok; training started"
        return {"status": status}

    def _knows_project(self, project: str, data: Mapping[str, Any]) -> bool:
        """Whether ``project`` may get training files in MODEL_DIR: seen through /setup, or described
        by the webhook itself as Label Studio sends it (a label config with a BrushLabels control)."""
        if any(normalized_project(seen) == project for seen in list(self._label_configs)):  # keys as /setup sent them
            return True
        described = data.get("project")
        if not isinstance(described, Mapping) or not isinstance(described.get("label_config"), str):
            return False
        try:
            return parse_label_config(described["label_config"]).has_brush
        except BackendError:
            return False

    # --- batch -----------------------------------------------------------------------------------

    def _batch(self, tasks: Sequence[Any], project: Any = None) -> List[Dict[str, Any]]:
        """Empty predictions: masks need clicks. Never loads images and never fails."""
        try:
            version = self.predictor_for(project).model_version
        except BackendError:
            version = self.settings.checkpoint.stem
        return [{"result": [], "score": 0.0, "model_version": version} for _ in tasks]
