"""Server settings, all read from environment variables (see the README's configuration table).

Image-access settings (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, LOCAL_FILES_DOCUMENT_ROOT,
ALLOWED_IMAGE_HOSTS, MAX_IMAGE_PIXELS, MAX_IMAGE_BYTES) belong to ``backend.images`` and are
read there by ``ImageAccessSettings.from_env``; ``Settings.from_env`` composes them, and the
fine-tuning settings (``FitSettings``: FIT_*, TRAIN_THREADS, TRAIN_EVERY_N_ANNOTATIONS).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from model.checkpoint import resolve_device
from model.predictor import DEFAULT_CHECKPOINT
from model.proposals import PROPOSAL_MIN_SCORE

from .images import ImageAccessSettings

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEVICES_HINT = "cpu, cuda, cuda:<index> or auto"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# Every variable the settings read: a training job (``backend.fit_worker``) gets exactly these
# values from the server that starts it, whatever its own environment holds.
ENV_VARS = (
    "MODEL_DIR", "CHECKPOINT", "DEVICE", "CFR_STEPS", "CLICK_REFINEMENT", "CLICKED_COMPONENTS_ONLY", "WORKERS", "THREADS", "LOG_LEVEL", "HOST", "PORT",
    "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "SESSION_CACHE_BYTES", "EXEMPLAR_MAX_TASKS", "REQUEST_READ_TIMEOUT",
    "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOCAL_FILES_DOCUMENT_ROOT", "ALLOWED_IMAGE_HOSTS",
    "MAX_IMAGE_PIXELS", "MAX_IMAGE_BYTES",
    "RECALL", "RECALL_MIN_SCORE", "RECALL_MIN_AREA", "RECALL_MAX_PROPOSALS",
    "TRAIN_THREADS", "TRAIN_EVERY_N_ANNOTATIONS", "FIT_STEPS", "FIT_BATCH_SIZE", "FIT_LR", "FIT_FREEZE_BACKBONE",
    "FIT_HOLDOUT_FRACTION", "FIT_EVAL_MAX_OBJECTS", "FIT_EVAL_MAX_CLICKS", "FIT_NICE",
    "REDIS_URL", "EXEMPLAR_STORE", "FIT_QUEUE", "JOB_LEASE_SECONDS", "FIT_QUEUE_TIMEOUT",
)


def _int(env: Mapping[str, str], name: str, default: Optional[int], minimum: int) -> Optional[int]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={value} must lie between {low} and {high}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})")


def _optional(env: Mapping[str, str], name: str) -> Optional[str]:
    value = env.get(name, "")
    return value if value != "" else None


def _device(raw: str) -> str:
    device = raw.strip().lower() or "auto"
    if device in ("cpu", "cuda", "auto") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ValueError(f"DEVICE={raw!r} is not one of {DEVICES_HINT}")


@dataclass(frozen=True)
class FitSettings:
    """Fine-tuning on a project's annotations (``START_TRAINING``); see the README's fit section."""

    steps: int = 100  # FIT_STEPS: optimiser steps per job
    batch_size: int = 4  # FIT_BATCH_SIZE
    lr: float = 3e-4  # FIT_LR: head learning rate (the backbone gets a tenth)
    freeze_backbone: bool = False  # FIT_FREEZE_BACKBONE
    holdout_fraction: float = 0.2  # FIT_HOLDOUT_FRACTION: tasks held out to evaluate before/after
    eval_max_objects: int = 20  # FIT_EVAL_MAX_OBJECTS: held-out objects evaluated at most
    eval_max_clicks: int = 10  # FIT_EVAL_MAX_CLICKS: clicks per object in the evaluation (NoC cap)
    threads: int = 1  # TRAIN_THREADS: torch CPU threads of the training process
    nice: int = 10  # FIT_NICE: niceness added to the training process (serving keeps priority)
    every_n_annotations: int = 0  # TRAIN_EVERY_N_ANNOTATIONS: start a job every N new annotations (0: off)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "FitSettings":
        return cls(
            steps=_int(env, "FIT_STEPS", cls.steps, minimum=1),
            batch_size=_int(env, "FIT_BATCH_SIZE", cls.batch_size, minimum=1),
            lr=_float(env, "FIT_LR", cls.lr, low=1e-8, high=1.0),
            freeze_backbone=_bool(env, "FIT_FREEZE_BACKBONE", cls.freeze_backbone),
            holdout_fraction=_float(env, "FIT_HOLDOUT_FRACTION", cls.holdout_fraction, low=0.01, high=0.9),
            eval_max_objects=_int(env, "FIT_EVAL_MAX_OBJECTS", cls.eval_max_objects, minimum=1),
            eval_max_clicks=_int(env, "FIT_EVAL_MAX_CLICKS", cls.eval_max_clicks, minimum=1),
            threads=_int(env, "TRAIN_THREADS", cls.threads, minimum=1),
            nice=_int(env, "FIT_NICE", cls.nice, minimum=0),
            every_n_annotations=_int(env, "TRAIN_EVERY_N_ANNOTATIONS", cls.every_n_annotations, minimum=0),
        )


EXEMPLAR_STORES = ("sqlite", "redis")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ScaleSettings:
    """Several backend hosts and a training worker sharing Redis (see the README's "Scale out").

    Without ``redis_url`` everything stays on one host: SQLite store, flock, job subprocesses.
    """

    redis_url: Optional[str] = None  # REDIS_URL: job leases, job status and the training queue live there
    exemplar_store: str = "sqlite"  # EXEMPLAR_STORE: "sqlite" (MODEL_DIR file) or "redis" (needs REDIS_URL)
    queue: str = "ls-clickseg-fit"  # FIT_QUEUE: the RQ queue training jobs go to
    lease_seconds: int = 30  # JOB_LEASE_SECONDS: a running job's lease expires this long after its last renewal
    queue_timeout_s: int = 3600  # FIT_QUEUE_TIMEOUT: a queued job no worker took within this fails

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ScaleSettings":
        redis_url = _optional(env, "REDIS_URL")
        if redis_url is not None and not redis_url.startswith(REDIS_SCHEMES):
            raise ValueError(f"REDIS_URL must start with {', '.join(REDIS_SCHEMES)}, got {redis_url[:40]!r}")
        store = (env.get("EXEMPLAR_STORE") or "sqlite").strip().lower()
        if store not in EXEMPLAR_STORES:
            raise ValueError(f"EXEMPLAR_STORE={store!r} is not one of {', '.join(EXEMPLAR_STORES)}")
        if store == "redis" and redis_url is None:
            raise ValueError("EXEMPLAR_STORE=redis needs REDIS_URL (e.g. redis://redis:6379/0)")
        queue = (env.get("FIT_QUEUE") or cls.queue).strip()
        if not _QUEUE_NAME.fullmatch(queue):
            raise ValueError(f"FIT_QUEUE={queue[:80]!r} must be 1-64 letters, digits, '_', '.' or '-'")
        return cls(
            redis_url=redis_url, exemplar_store=store, queue=queue,
            lease_seconds=_int(env, "JOB_LEASE_SECONDS", cls.lease_seconds, minimum=2),
            queue_timeout_s=_int(env, "FIT_QUEUE_TIMEOUT", cls.queue_timeout_s, minimum=1),
        )


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know; ``Settings.from_env()`` is the only constructor used in production."""

    model_dir: Path
    checkpoint: Path
    device: str  # "cpu", "cuda", "cuda:N" or "auto" (cuda when available, resolved in the worker)
    cfr_steps: int
    workers: int
    threads: int
    log_level: str
    host: str
    port: int
    basic_auth_user: Optional[str]
    basic_auth_pass: Optional[str]
    session_cache_bytes: int
    image_access: ImageAccessSettings
    exemplar_max_tasks: int = 2000
    request_read_timeout: int = 15  # REQUEST_READ_TIMEOUT: seconds a client may stay silent mid-request (gunicorn)
    # CLICK_REFINEMENT: L-BFGS iterations of click refinement (0 = off); None = the predictor's default
    click_refinement: Optional[int] = None
    # CLICKED_COMPONENTS_ONLY: masks keep only their connected parts that hold a positive click
    clicked_components_only: bool = True
    recall: bool = True  # RECALL: propose objects like the accepted ones (models with a recall branch)
    recall_min_score: float = PROPOSAL_MIN_SCORE  # RECALL_MIN_SCORE: proposals scoring less are dropped
    recall_min_area: int = 64  # RECALL_MIN_AREA: smallest proposal, in image pixels
    recall_max_proposals: int = 20  # RECALL_MAX_PROPOSALS: proposals per object at most
    fit: FitSettings = field(default_factory=FitSettings)
    scale: ScaleSettings = field(default_factory=ScaleSettings)
    # The variables of ENV_VARS as read (secrets included: never logged), handed to training jobs.
    environment: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def auth_enabled(self) -> bool:
        return self.basic_auth_user is not None or self.basic_auth_pass is not None

    def predictor_options(self) -> Dict[str, Any]:
        """``ClickSegPredictor`` options of every predictor the backend builds (served or evaluated)."""
        return {"device": str(resolve_device(self.device)), "cfr_steps": self.cfr_steps,
                "click_refinement_iterations": self.click_refinement,
                "clicked_components_only": self.clicked_components_only}

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Settings":
        """Settings from ``env`` (default ``os.environ``); a bad value raises ValueError naming the variable."""
        env = os.environ if env is None else env
        model_dir = Path(env.get("MODEL_DIR") or DEFAULT_CHECKPOINT.parent)
        checkpoint = Path(env.get("CHECKPOINT") or DEFAULT_CHECKPOINT)
        if not checkpoint.is_absolute():
            checkpoint = model_dir / checkpoint
        log_level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
        if log_level not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL={log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        user, password = _optional(env, "BASIC_AUTH_USER"), _optional(env, "BASIC_AUTH_PASS")
        if (user is None) != (password is None):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (or both left unset)")
        return cls(
            model_dir=model_dir,
            checkpoint=checkpoint,
            device=_device(env.get("DEVICE", "auto")),
            cfr_steps=_int(env, "CFR_STEPS", 2, minimum=0),
            click_refinement=_int(env, "CLICK_REFINEMENT", None, minimum=0),
            clicked_components_only=_bool(env, "CLICKED_COMPONENTS_ONLY", True),
            workers=_int(env, "WORKERS", 1, minimum=1),
            threads=_int(env, "THREADS", 16, minimum=1),
            log_level=log_level,
            host=(env.get("HOST") or "0.0.0.0").strip(),
            port=_int(env, "PORT", 9090, minimum=1),
            basic_auth_user=user,
            basic_auth_pass=password,
            session_cache_bytes=_int(env, "SESSION_CACHE_BYTES", 1 << 30, minimum=0),
            image_access=ImageAccessSettings.from_env(env),
            exemplar_max_tasks=_int(env, "EXEMPLAR_MAX_TASKS", 2000, minimum=1),
            request_read_timeout=_int(env, "REQUEST_READ_TIMEOUT", 15, minimum=1),
            recall=_bool(env, "RECALL", True),
            recall_min_score=_float(env, "RECALL_MIN_SCORE", PROPOSAL_MIN_SCORE, low=0.0, high=1.0),
            recall_min_area=_int(env, "RECALL_MIN_AREA", 64, minimum=1),
            recall_max_proposals=_int(env, "RECALL_MAX_PROPOSALS", 20, minimum=1),
            fit=FitSettings.from_env(env),
            scale=ScaleSettings.from_env(env),
            environment={name: env[name] for name in ENV_VARS if name in env},
        )
