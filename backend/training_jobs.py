"""Fine-tuning jobs and per-project model versions, shared by every gunicorn worker through files.

Layout under ``MODEL_DIR/<project>/`` (``<project>`` is Label Studio's numeric project id):

    train.lock         flock-ed by the running job's process for its whole life: a job runs
                       while (and only while) this lock is held; a killed job releases it
    job.json           the job's status (state, stage, progress, step, loss, evaluation,
                       skipped items, error), written atomically by the job; ``GET /jobs/<project>``
    job.log            the job process's JSON log lines
    p<project>-v<n>/   one trained version: ``model.safetensors`` (meta: version, project,
                       steps, data counts, metrics) and ``metrics.json``; built in
                       ``.tmp-p<project>-v<n>-<pid>/`` and renamed when complete
    current.json       the version served for this project, replaced atomically on promotion
    annotations.count  new annotations since the last job (TRAIN_EVERY_N_ANNOTATIONS)

``JobManager`` starts jobs and reads their status; ``ProjectModels`` serves each project's
promoted version, reloading it when ``current.json`` changes (one ``stat`` per request).
Without ``current.json`` a project is served the default checkpoint (``CHECKPOINT``).

Where the lock and the status live is a ``JobRecords``:

- ``FileJobRecords`` (one host, the default): ``train.lock`` and ``job.json`` above; a job is
  ``python -m backend.fit_worker``, a separate, niced process with its own thread count, which
  inherits the lock;
- ``backend.redis_state.RedisJobRecords`` (``REDIS_URL``: several hosts): a lease that expires
  unless its holder renews it, and the status in Redis; a job is queued on RQ and run by
  ``python -m backend.fit_worker --queue`` on any machine that shares ``MODEL_DIR``.
"""
from __future__ import annotations

import abc
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generic, List, Mapping, Optional, Tuple, TypeVar

from .config import Settings
from .exemplars import MAX_ID_DIGITS

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, REJECTED, IDLE = "queued", "running", "succeeded", "failed", "rejected", "idle"
ACTIVE_STATES = (QUEUED, RUNNING)
TMP_PREFIX = ".tmp-"
MAX_PROJECT_DIRS = 1000  # project directories in MODEL_DIR; a webhook for a new project beyond it is refused
VERSION_NAME = re.compile(r"^p(\d+)-v(\d+)$")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory holding ``backend`` and ``model``


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_job_id() -> str:
    """``20261123T101352-25164-3fa2``: start time (UTC), the starting process, a random tag."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{secrets.token_hex(2)}"


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``; None when it is absent or unreadable (logged)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProjectPaths:
    """Where one project's jobs and versions live."""

    model_dir: Path
    project: str  # normalised id, digits only (``backend.exemplars.project_key``)

    def __post_init__(self) -> None:
        if not (self.project.isascii() and self.project.isdigit() and len(self.project) <= MAX_ID_DIGITS):
            raise ValueError(f"project id must be at most {MAX_ID_DIGITS} digits, got {self.project[:40]!r}")

    @property
    def root(self) -> Path:
        return self.model_dir / self.project

    @property
    def lock(self) -> Path:
        return self.root / "train.lock"

    @property
    def status(self) -> Path:
        return self.root / "job.json"

    @property
    def log(self) -> Path:
        return self.root / "job.log"

    @property
    def pointer(self) -> Path:
        return self.root / "current.json"

    @property
    def counter(self) -> Path:
        return self.root / "annotations.count"

    def version_dir(self, version: str) -> Path:
        if not VERSION_NAME.match(version):
            raise ValueError(f"not a version name: {version!r}")
        return self.root / version

    def versions(self) -> List[str]:
        """Complete versions, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = VERSION_NAME.match(entry.name)
            if match and match.group(1) == self.project and (entry / "metrics.json").is_file():
                found.append((int(match.group(2)), entry.name))
        return [name for _, name in sorted(found)]

    def next_version(self) -> str:
        numbers = [int(VERSION_NAME.match(v).group(2)) for v in self.versions()]
        return f"p{self.project}-v{max(numbers, default=0) + 1}"

    def clean_partial_files(self) -> List[str]:
        """Remove what an interrupted job left (``.tmp-*``); call only while holding the lock."""
        removed = []
        for entry in self.root.glob(f"{TMP_PREFIX}*"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        return removed


class JobLock(abc.ABC):
    """One project's right to run a job, taken by the starting server and handed to the job."""

    @abc.abstractmethod
    def try_acquire(self) -> bool:
        """Take it unless someone holds it."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give it up (the holder, when the job ends or did not start)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Hand it over: the job keeps it from here on."""


class ProjectLock(JobLock):
    """The per-project training lock (``flock`` on ``train.lock``), shared by every process.

    flock belongs to the open file, so a child process that inherits the descriptor keeps
    the lock after the parent closes its copy, and the kernel releases it when the last
    holder exits, however it exits: a killed job never leaves a stale lock.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd: Optional[int] = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        """Unlock and close (only where no child shares the descriptor)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.close()

    def close(self) -> None:
        """Close this process's descriptor; a child that inherited it keeps the lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def adopt(fd: int, path: Path) -> "ProjectLock":
        """The lock a parent passed down as descriptor ``fd``; ValueError if it is not held through it."""
        lock = ProjectLock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds: the lock is already ours
        except OSError as exc:
            raise ValueError(f"descriptor {fd} does not hold the training lock {path}: {exc}") from None
        lock.fd = fd
        return lock


# --- the served version of each project ------------------------------------------------------------


def served_checkpoint(paths: ProjectPaths) -> Optional[Tuple[str, Path]]:
    """``(version, checkpoint path)`` that ``current.json`` names, or None when there is none.

    Raises ValueError when the pointer is malformed or names a missing checkpoint.
    """
    pointer = read_json(paths.pointer)
    if pointer is None:
        if paths.pointer.exists():
            raise ValueError(f"{paths.pointer} is not a JSON object")
        return None
    version, checkpoint = pointer.get("version"), pointer.get("checkpoint")
    if not isinstance(version, str) or not isinstance(checkpoint, str):
        raise ValueError(f"{paths.pointer} needs string 'version' and 'checkpoint' fields")
    path = (paths.root / checkpoint).resolve()
    if not path.is_relative_to(paths.root.resolve()) or not path.is_file():
        raise ValueError(f"{paths.pointer} names {checkpoint!r}, which is not a checkpoint file in {paths.root}")
    return version, path


def promote(paths: ProjectPaths, version: str, metrics: Mapping[str, Any]) -> None:
    """Serve ``version`` for the project from now on (atomic replacement of ``current.json``)."""
    checkpoint = paths.version_dir(version) / "model.safetensors"
    if not checkpoint.is_file():
        raise ValueError(f"version {version} has no checkpoint at {checkpoint}")
    write_json_atomic(paths.pointer, {
        "version": version, "checkpoint": f"{version}/model.safetensors", "promoted_at": now_iso(),
        "metrics": dict(metrics),
    })
    fsync_dir(paths.root)


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


# --- where jobs are recorded ----------------------------------------------------------------------


class JobRecords(abc.ABC):
    """Where each project's job lock, job status and annotation count live."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir

    def paths(self, project: str) -> ProjectPaths:
        return ProjectPaths(self.model_dir, project)

    @abc.abstractmethod
    def lock(self, project: str) -> JobLock:
        """The project's lock (not taken yet)."""

    @abc.abstractmethod
    def read(self, project: str) -> Optional[Dict[str, Any]]:
        """The last job's status, None when there was none."""

    @abc.abstractmethod
    def write(self, project: str, job: Mapping[str, Any], holder: JobLock) -> bool:
        """Write the status if ``holder`` still holds the project's lock; False (nothing written) if not."""

    @abc.abstractmethod
    def settle(self, project: str, exit_code: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """The status, after marking failed a 'queued'/'running' job whose holder is gone."""

    @abc.abstractmethod
    def count_annotations(self, project: str, new: int, due: Callable[[int], bool]) -> bool:
        """Add ``new`` to the project's count; when ``due(count)`` is True the count starts again from 0."""

    def died(self, job: Mapping[str, Any], how: str) -> Dict[str, Any]:
        """``job`` marked failed: its process ``how`` (e.g. "ended with exit code 9") before finishing."""
        tail = _log_tail(self.paths(str(job.get("project"))).log)
        return {**job, "state": FAILED, "finished_at": now_iso(), "updated_at": now_iso(),
                "error": f"the training process {how} during '{job.get('stage')}' without finishing; "
                         f"the served model is unchanged. Last log lines: {tail}"}


class FileJobRecords(JobRecords):
    """One host: ``train.lock`` (flock), ``job.json`` and ``annotations.count`` in ``MODEL_DIR/<project>/``."""

    def lock(self, project: str) -> ProjectLock:
        return ProjectLock(self.paths(project).lock)

    def read(self, project: str) -> Optional[Dict[str, Any]]:
        return read_json(self.paths(project).status)

    def write(self, project: str, job: Mapping[str, Any], holder: JobLock) -> bool:
        write_json_atomic(self.paths(project).status, job)  # only the holder of the flock writes
        return True

    def settle(self, project: str, exit_code: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Under the lock, so a new job's status is never overwritten."""
        job = self.read(project)
        if job is None or job.get("state") not in ACTIVE_STATES:
            return job
        lock = self.lock(project)
        if not lock.try_acquire():
            return job  # it is alive
        try:
            job = self.read(project)
            if job is None or job.get("state") not in ACTIVE_STATES:
                return job
            how = f"with exit code {exit_code}" if exit_code is not None else "(killed, crashed or the server restarted)"
            job = self.died(job, f"ended {how}")
            write_json_atomic(self.paths(project).status, job)
            return job
        finally:
            lock.release()

    def count_annotations(self, project: str, new: int, due: Callable[[int], bool]) -> bool:
        paths = self.paths(project)
        paths.root.mkdir(parents=True, exist_ok=True)
        with open(paths.counter, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # other workers count too
            f.seek(0)
            text = f.read().strip()
            count = (int(text) if text.isascii() and text.isdigit() and len(text) < 19 else 0) + new
            started = due(count)
            f.seek(0)
            f.truncate()
            f.write("0" if started else str(count))
        return started


def job_records(settings: Settings) -> JobRecords:
    """Redis records when REDIS_URL is set, else files."""
    if settings.scale.redis_url:
        from .redis_state import RedisJobRecords  # the Redis client only where it is used

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
        from .config import ENV_VARS

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


def _log_tail(path: Path, lines: int = 3, max_chars: int = 600) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    text = " | ".join(tail)
    return text[-max_chars:] if text else "(empty log)"
