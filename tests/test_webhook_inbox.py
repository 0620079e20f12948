"""Webhooks are on disk before the 201, leave it once handled, and survive a worker that dies."""
from __future__ import annotations

import subprocess
import sys
import threading

from backend.app import create_app
from backend.config import Settings
from backend.webhook_inbox import WebhookInbox, process_alive


class RecordingService:
    """Stands in for ClickSegModel: records fit() calls; ``gate`` holds them until set."""

    model_version = "recording"

    def __init__(self):
        self.calls = []
        self.gate = threading.Event()
        self.gate.set()

    def check_webhook(self, event, data):
        pass

    def fit(self, event, data, **kwargs):
        self.gate.wait(10)
        self.calls.append((event, data))
        return {"status": "ok"}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not process_alive(process.pid)
    return process.pid


def settings_in(tmp_path) -> Settings:
    return Settings.from_env({"MODEL_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"})


def wait_until(condition, seconds=10.0) -> bool:
    event = threading.Event()
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        event.wait(0.02)
    return condition()


def test_a_webhook_is_on_disk_while_it_is_handled_and_gone_after(tmp_path):
    service = RecordingService()
    service.gate.clear()  # the work has not run when the answer goes out
    client = create_app(settings_in(tmp_path), service).test_client()
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert response.status_code == 201 and response.get_json()["status"] == "queued"
    inbox = WebhookInbox(tmp_path / "webhooks.sqlite3")
    assert len(inbox) == 1  # acknowledged and durable, not yet handled
    service.gate.set()
    assert wait_until(lambda: len(inbox) == 0)
    assert service.calls == [("ANNOTATION_CREATED", {"action": "ANNOTATION_CREATED", "project": {"id": 1}})]


def test_webhooks_of_a_worker_that_died_are_handled_by_the_next_one(tmp_path):
    inbox = WebhookInbox(tmp_path / "webhooks.sqlite3")
    first = inbox.put("ANNOTATION_CREATED", {"action": "ANNOTATION_CREATED", "n": 1})
    inbox.put("START_TRAINING", {"action": "START_TRAINING", "n": 2})
    with inbox._lock:  # as a worker killed with kill -9 leaves them: held by a process that is gone
        inbox._connection.execute("UPDATE inbox SET owner = ?", (dead_pid(),))
    live = inbox.put("ANNOTATION_UPDATED", {"n": 3})  # held by this (live) process: never taken
    service = RecordingService()
    create_app(settings_in(tmp_path), service)
    assert wait_until(lambda: len(service.calls) == 2)
    assert [data["n"] for _, data in service.calls] == [1, 2]  # in the order they came
    assert wait_until(lambda: len(inbox) == 1)
    assert inbox.claim_orphans() == [] and first != live


def test_an_orphan_is_claimed_once(tmp_path):
    inbox = WebhookInbox(tmp_path / "webhooks.sqlite3")
    inbox.put("ANNOTATION_CREATED", {"n": 1})
    with inbox._lock:
        inbox._connection.execute("UPDATE inbox SET owner = ?", (dead_pid(),))
    other = WebhookInbox(tmp_path / "webhooks.sqlite3")
    assert [payload for _, _, payload in inbox.claim_orphans()] == [{"n": 1}]
    assert other.claim_orphans() == []  # now held by a live process (this one)
