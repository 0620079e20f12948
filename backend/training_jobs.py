"""Fine-tuning jobs and per-project model versions, shared by every gunicorn worker.

``JobManager`` starts jobs and reads their status; ``ProjectModels`` serves each project's
promoted version, reloading it when ``current.json`` changes (one ``stat`` per request).
Without ``current.json`` a project is served the default checkpoint (``CHECKPOINT``). What jobs
leave on disk is described in ``backend.job_state``.

Where the lock and the status live is a ``JobRecords``:

- ``FileJobRecords`` (one host, the default): ``train.lock`` and ``job.json``; a job is
  ``python -m backend.fit_worker``, a separate, niced process with its own thread count, which
  inherits the lock;
- ``backend.redis_state.RedisJobRecords`` (``REDIS_URL``: several hosts): a lease that expires
  unless its holder renews it, and the status in Redis; a job is queued on RQ and run by
  ``python -m backend.fit_worker --queue`` on any machine that shares ``MODEL_DIR``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generic, List, Optional, Tuple, TypeVar

from .config import ENV_VARS, Settings
from .job_state import (ACTIVE_STATES, FAILED, IDLE, PACKAGE_ROOT, QUEUED, REJECTED, SUCCEEDED, FileJobRecords, JobLock,
                        JobRecords, ProjectPaths, new_job_id, now_iso, read_json, served_checkpoint)
from .redis_state import RedisJobRecords

log = logging.getLogger(__name__)

MAX_PROJECT_DIRS = 1000  # project directories in MODEL_DIR; a webhook for a new project beyond it is refused

P = TypeVar("P")


@dataclass
class _Served(Generic[P]):
    signature: Optional[Tuple[int, int, int]]  # (inode, mtime ns, size) of current.json
    version: Optional[str]
    predictor: Optional[P]


class ProjectModels(Generic[P]):
    """Each project's promoted predictor in this process, reloaded when ``current.json`` changes.

    ``get(project)`` costs one ``stat`` when nothing changed. A pointer that cannot be read or
    a checkpoint that cannot be loaded is logged once and the project keeps what it was served.
    """

    def __init__(self, model_dir: Path, load: Callable[[Path], P]):
        self.model_dir = model_dir
        self._load = load
        self._served: Dict[str, _Served[P]] = {}
        self._lock = threading.Lock()

    def get(self, project: str) -> Optional[P]:
        """The project's promoted predictor, or None for the default model."""
        paths = ProjectPaths(self.model_dir, project)
        try:
            stat = os.stat(paths.pointer)
            signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            signature = None
        served = self._served.get(project)
        if served is not None and served.signature == signature:
            return served.predictor
        with self._lock:  # one load at a time; others keep serving until it is in place
            served = self._served.get(project)
            if served is not None and served.signature == signature:
                return served.predictor
            previous = served or _Served(None, None, None)
            self._served[project] = self._reload(paths, signature, previous)
            return self._served[project].predictor

    def _reload(self, paths: ProjectPaths, signature, previous: _Served[P]) -> _Served[P]:
        if signature is None:
            if previous.version is not None:
                log.warning("current.json of project %s is gone: serving the default model", paths.project)
            return _Served(None, None, None)
        started = time.perf_counter()
        try:
            pointed = served_checkpoint(paths)
            if pointed is None:  # removed between stat and read
                return _Served(None, None, None)
            version, checkpoint = pointed
            if version == previous.version:
                return _Served(signature, version, previous.predictor)
            predictor = self._load(checkpoint)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("cannot switch project %s to the model in %s: %s; still serving %s", paths.project,
                      paths.pointer, exc, previous.version or "the default model",
                      extra={"project": paths.project, "reason": str(exc)})
            return _Served(signature, previous.version, previous.predictor)
        log.info("project model switched", extra={
            "project": paths.project, "model_version": version, "previous": previous.version,
            "seconds": round(time.perf_counter() - started, 3)})
        return _Served(signature, version, predictor)

    def version(self, project: str) -> Optional[str]:
        """The promoted version served for ``project`` (loading it if needed), None for the default."""
        predictor = self.get(project)
        return None if predictor is None else self._served[project].version


def job_records(settings: Settings) -> JobRecords:
    """Redis records when REDIS_URL is set, else files."""
    if settings.scale.redis_url:
        return RedisJobRecords(settings.model_dir, settings.scale)
    return FileJobRecords(settings.model_dir)


# --- jobs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartResult:
    started: bool
    status: str  # the webhook's answer
    job: Dict[str, Any]


class JobManager:
    """Starts training jobs and reports their status; one per server worker.

    Without REDIS_URL a job is a process of this server (``python -m backend.fit_worker``;
    ``command`` replaces that in tests). With it, a job is queued on RQ for a training worker.
    """

    def __init__(self, settings: Settings, setup_access_token: Callable[[], Optional[str]] = lambda: None,
                 command: Optional[List[str]] = None):
        self.settings = settings
        self.model_dir = settings.model_dir
        self.records = job_records(settings)
        self._setup_access_token = setup_access_token
        self.command = command or [sys.executable, "-m", "backend.fit_worker"]
        self._counter_lock = threading.Lock()

    def paths(self, project: str) -> ProjectPaths:
        return ProjectPaths(self.model_dir, project)

    # starting

    def _no_room(self, paths: ProjectPaths) -> Optional[str]:
        """Why a new project directory may not be created (MAX_PROJECT_DIRS reached), or None."""
        if paths.root.is_dir() or len(self.projects()) < MAX_PROJECT_DIRS:
            return None
        return (f"MODEL_DIR already holds {MAX_PROJECT_DIRS} project directories; remove those of deleted "
                f"projects to train project {paths.project}")

    def start(self, project: str, trigger: str) -> StartResult:
        """Start a job for ``project`` unless one runs or is queued; returns at once."""
        paths = self.paths(project)
        no_room = self._no_room(paths)
        if no_room:
            log.error("training not started: %s", no_room, extra={"project": project})
            return StartResult(False, f"training not started: {no_room}",
                               {"project": project, "state": FAILED, "error": no_room})
        problem = self._cannot_train()
        paths.root.mkdir(parents=True, exist_ok=True)
        lock = self.records.lock(project)
        if not lock.try_acquire():
            job = self.status(project)
            log.info("training already running", extra={"project": project, "job": job.get("job_id"),
                                                         "trigger": trigger})
            return StartResult(False, f"already training (job {job.get('job_id')}, {job.get('stage', job['state'])})", job)
        handed_over = False
        try:
            job_id = new_job_id()
            job: Dict[str, Any] = {
                "project": project, "job_id": job_id, "state": QUEUED, "stage": "starting", "trigger": trigger,
                "queued_at": now_iso(), "updated_at": now_iso(), "progress": 0.0, "log": str(paths.log),
            }
            if problem:
                return self._not_started(job, lock, problem)
            queue = self.settings.scale.queue if self.settings.scale.redis_url else None
            if queue:
                job.update(stage=f"waiting for a training worker on queue {queue!r}", queue=queue)
            self.records.write(project, job, lock)
            try:
                if queue:
                    self.records.enqueue(project, job_id, lock, self._setup_access_token())
                else:
                    job["pid"] = self._spawn(paths, job_id, lock.fd).pid
            except Exception as exc:  # noqa: BLE001 - OSError from a spawn, RedisError from a queue
                return self._not_started(job, lock, f"cannot start the training job: {exc}")
            handed_over = True
        finally:
            if handed_over:
                lock.close()  # the job holds the lock from here on
            else:
                lock.release()
        log.info("training started", extra={"project": project, "job": job_id, "pid": job.get("pid"),
                                            "queue": job.get("queue"), "trigger": trigger})
        return StartResult(True, f"training {'queued' if job.get('queue') else 'started'} (job {job_id})", job)

    def _not_started(self, job: Dict[str, Any], lock: JobLock, problem: str) -> StartResult:
        job.update(state=FAILED, stage="not started", error=problem, finished_at=now_iso())
        self.records.write(job["project"], job, lock)
        log.error("training not started: %s", problem, extra={"project": job["project"]})
        return StartResult(False, f"training not started: {problem}", job)

    def _cannot_train(self) -> Optional[str]:
        access = self.settings.image_access
        if not access.label_studio_url:
            return ("LABEL_STUDIO_URL is not set: the backend needs it (and LABEL_STUDIO_API_KEY) to read the "
                    "project's annotations from Label Studio")
        if not access.api_key and not self._setup_access_token():
            return ("no Label Studio token: set LABEL_STUDIO_API_KEY to a Personal Access Token (or legacy token) "
                    "of a user who can open the project")
        return None

    def child_environment(self) -> Dict[str, str]:
        """The job's environment: this server's settings (not the job's own environment), one thread."""
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        env.update(self.settings.environment)
        env["MODEL_DIR"] = str(self.model_dir.resolve())
        env["CHECKPOINT"] = str(self.settings.checkpoint.resolve())
        threads = str(self.settings.fit.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        token = self._setup_access_token()
        if token:
            env["LS_SETUP_ACCESS_TOKEN"] = token
        return env

    def _spawn(self, paths: ProjectPaths, job_id: str, lock_fd: int) -> subprocess.Popen:
        with open(paths.log, "w") as log_file:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [*self.command, "--project", paths.project, "--job-id", job_id, "--lock-fd", str(lock_fd)],
                env=self.child_environment(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                pass_fds=(lock_fd,), start_new_session=True,
            )
        threading.Thread(target=self._watch, args=(paths, job_id, process), daemon=True,
                         name=f"fit-watch-{paths.project}").start()
        return process

    def _watch(self, paths: ProjectPaths, job_id: str, process: subprocess.Popen) -> None:
        """Reap the job process; record a death the job could not report itself."""
        code = process.wait()
        job = self.records.settle(paths.project, exit_code=code) or {}
        if job.get("job_id") != job_id:
            return
        level = logging.INFO if job.get("state") in (SUCCEEDED, REJECTED) else logging.ERROR
        log.log(level, "training job ended: %s", job.get("state"), extra={
            "project": paths.project, "job": job_id, "exit_code": code, "state": job.get("state"),
            "model_version": job.get("version"), "promoted": job.get("promoted"), "reason": job.get("reason"),
            "error": job.get("error")})

    # reading

    def status(self, project: str) -> Dict[str, Any]:
        """The last job's status (``state`` 'idle' when there was none)."""
        job = self.records.settle(project) or {"project": project, "state": IDLE}
        job["training"] = job["state"] in ACTIVE_STATES
        return job

    def projects(self) -> List[str]:
        if not self.model_dir.is_dir():
            return []
        return sorted((p.name for p in self.model_dir.iterdir() if p.name.isascii() and p.name.isdigit() and p.is_dir()), key=int)

    def served_version(self, project: str) -> Optional[str]:
        """The promoted version ``current.json`` names (what every worker serves), None for the default."""
        try:
            served = served_checkpoint(self.paths(project))
        except ValueError:
            return None
        return served[0] if served else None

    def versions(self, project: str) -> List[Dict[str, Any]]:
        """Every trained version of the project, oldest first, with its metrics and whether it is served."""
        paths = self.paths(project)
        served = self.served_version(project)
        result = []
        for version in paths.versions():
            metrics = read_json(paths.version_dir(version) / "metrics.json") or {}
            result.append({
                "version": version, "served": served == version,
                "created_at": metrics.get("created_at"), "promoted": metrics.get("promoted"),
                "reason": metrics.get("reason"), "evaluation": metrics.get("evaluation"),
                "data": metrics.get("data"), "base_version": metrics.get("base_version"),
            })
        return result

    # TRAIN_EVERY_N_ANNOTATIONS

    def count_annotations(self, project: str, new: int) -> bool:
        """Add ``new`` annotations to the project's count; True (and the count reset) when it reaches
        TRAIN_EVERY_N_ANNOTATIONS and a job could be started."""
        every = self.settings.fit.every_n_annotations
        if every <= 0 or new <= 0:
            return False
        no_room = self._no_room(self.paths(project))
        if no_room:
            log.warning("annotations not counted: %s", no_room, extra={"project": project})
            return False

        def due(count: int) -> bool:
            return count >= every and self.start(
                project, trigger=f"{count} new annotations (TRAIN_EVERY_N_ANNOTATIONS={every})").started

        with self._counter_lock:
            return self.records.count_annotations(project, new, due)
