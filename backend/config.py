"""Server settings, all read from environment variables (see the README's configuration table).

Image-access settings (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, LOCAL_FILES_DOCUMENT_ROOT,
ALLOWED_IMAGE_HOSTS, MAX_IMAGE_PIXELS, MAX_IMAGE_BYTES) belong to ``backend.images`` and are
read there by ``ImageAccessSettings.from_env``; ``Settings.from_env`` composes them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from model.predictor import DEFAULT_CHECKPOINT

from .images import ImageAccessSettings

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEVICES_HINT = "cpu, cuda, cuda:<index> or auto"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
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


def _optional(env: Mapping[str, str], name: str) -> Optional[str]:
    value = env.get(name, "")
    return value if value != "" else None


def _device(raw: str) -> str:
    device = raw.strip().lower() or "auto"
    if device in ("cpu", "cuda", "auto") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ValueError(f"DEVICE={raw!r} is not one of {DEVICES_HINT}")


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

    @property
    def auth_enabled(self) -> bool:
        return self.basic_auth_user is not None or self.basic_auth_pass is not None

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
            workers=_int(env, "WORKERS", 1, minimum=1),
            threads=_int(env, "THREADS", 4, minimum=1),
            log_level=log_level,
            host=(env.get("HOST") or "0.0.0.0").strip(),
            port=_int(env, "PORT", 9090, minimum=1),
            basic_auth_user=user,
            basic_auth_pass=password,
            session_cache_bytes=_int(env, "SESSION_CACHE_BYTES", 1 << 30, minimum=0),
            image_access=ImageAccessSettings.from_env(env),
        )
