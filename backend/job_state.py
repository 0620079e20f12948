"""What a fine-tuning job leaves for every process to read: the files under
``MODEL_DIR/<project>/``, the one-job-per-project lock, the promoted version, and where a job's
status is recorded (``JobRecords``; ``backend.redis_state.RedisJobRecords`` is the Redis one).

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .exemplars import MAX_ID_DIGITS

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, REJECTED, IDLE = "queued", "running", "succeeded", "failed", "rejected", "idle"
ACTIVE_STATES = (QUEUED, RUNNING)
TMP_PREFIX = ".tmp-"
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


def _log_tail(path: Path, lines: int = 3, max_chars: int = 600) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    text = " | ".join(tail)
    return text[-max_chars:] if text else "(empty log)"
