"""Webhooks are on disk before Label Studio gets its ``201``, and leave the disk once handled.

    inbox = WebhookInbox(MODEL_DIR / "webhooks.sqlite3")
    entry = inbox.put(action, payload)      # committed (SQLite, synchronous=FULL) before the answer
    ...handle it...; inbox.done(entry)
    inbox.claim_orphans()                   # [(entry, action, payload)] left by a process that died

A worker killed between the answer and the end of the work (``kill -9``, OOM, a redeploy)
leaves its entries behind; the next worker to start claims them (atomically, one claimant per
entry) and handles them. Each entry records the process that holds it, so entries of live
processes are never taken. A webhook whose handling raises is logged and dropped, not retried.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

Entry = int


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WebhookInbox:
    """Durable queue of received webhooks (one SQLite file, shared by the workers of a host)."""

    def __init__(self, path: os.PathLike | str, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._connection: Optional[sqlite3.Connection] = None  # opened (and the file created) on first use
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        """The connection (call under ``_lock``); raises OSError / sqlite3.Error when the file cannot be opened."""
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=self._busy_timeout_s, check_same_thread=False,
                                         isolation_level=None)
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY, action TEXT NOT NULL, "
                "payload TEXT NOT NULL, owner INTEGER NOT NULL, received REAL NOT NULL)")
            self._connection = connection
        return self._connection

    def put(self, action: str, payload: Dict[str, Any]) -> Entry:
        """Store a webhook, held by this process; returns once it is on disk."""
        with self._lock:
            cursor = self._db().execute(
                "INSERT INTO inbox (action, payload, owner, received) VALUES (?, ?, ?, ?)",
                (action, json.dumps(payload), os.getpid(), time.time()))
            return int(cursor.lastrowid)

    def done(self, entry: Entry) -> None:
        with self._lock:
            self._db().execute("DELETE FROM inbox WHERE id = ?", (entry,))

    def claim_orphans(self) -> List[Tuple[Entry, str, Dict[str, Any]]]:
        """Entries of processes that are gone, now held by this one, oldest first."""
        with self._lock:
            if self._connection is None and not self.path.exists():
                return []  # no webhook was ever stored here
            rows = self._db().execute("SELECT id, action, payload, owner FROM inbox ORDER BY id").fetchall()
            claimed = []
            for entry, action, payload, owner in rows:
                if owner == os.getpid() or process_alive(owner):
                    continue
                cursor = self._db().execute("UPDATE inbox SET owner = ? WHERE id = ? AND owner = ?",
                                                  (os.getpid(), entry, owner))
                if cursor.rowcount == 1:  # another starting worker did not claim it first
                    claimed.append((entry, action, json.loads(payload)))
            return claimed

    def __len__(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM inbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
