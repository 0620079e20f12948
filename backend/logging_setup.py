"""Structured logs: one JSON object per line on stderr.

    log.info("predict done", extra={"task": 12, "ms": 85.1})
    -> {"ts": "2026-11-23T07:36:32.285Z", "level": "INFO", "logger": "backend.service",
        "message": "predict done", "task": 12, "ms": 85.1}

Fields passed in ``extra`` become top-level keys. Exceptions are logged with their
type and message; tracebacks only at DEBUG level (they never reach HTTP responses).
"""
from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else was passed through ``extra``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, _ = record.exc_info
            entry["exception"] = f"{exc_type.__name__}: {exc}"
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every logger's records, as JSON lines, to stderr at ``level`` (idempotent)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_clickseg", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._clickseg = True
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    # werkzeug's own request lines duplicate ours; keep its warnings only.
    logging.getLogger("werkzeug").setLevel(max(logging.WARNING, root.level))
