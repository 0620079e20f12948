"""Scale-out (issue 18): several backend processes share one Redis and one MODEL_DIR, and a separate
training worker runs the jobs they queue. Everything runs against a private redis-server on loopback.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from support import (stop_process, API_KEY, FakeLabelStudioApi, annotation, brush_result, decode_region, fit_env, interactive_task,
                     pixel_keypoint, png_bytes, predict_body, serve, small_checkpoint, start_training_body)

from backend.app import create_app
from backend.config import Settings
from backend.job_state import ProjectPaths, promote, write_json_atomic
from backend.redis_state import RedisExemplarStore, RedisJobRecords, connect
from backend.service import ClickSegModel
from backend.training_jobs import JobManager
from model.evaluation.benchmark import RECALL_SCENE_OBJECTS, synthetic_scene

REPO = Path(__file__).resolve().parents[1]
SIZE = 128




def start_worker(env: dict, log_path: Path) -> subprocess.Popen:
    """``python -m backend.fit_worker --queue``: the training worker, a process of its own."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "backend.fit_worker", "--queue"], cwd=REPO,
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def scale_env(redis_url: str, **extra: str) -> dict:
    return {"REDIS_URL": redis_url, "EXEMPLAR_STORE": "redis", "JOB_LEASE_SECONDS": "2", **extra}


# --- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, fragment", [
    ({"EXEMPLAR_STORE": "redis"}, "EXEMPLAR_STORE=redis needs REDIS_URL"),
    ({"EXEMPLAR_STORE": "postgres"}, "EXEMPLAR_STORE='postgres' is not one of sqlite, redis"),
    ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL must start with redis://, rediss://, unix://"),
    ({"REDIS_URL": "redis://r", "FIT_QUEUE": "a queue"}, "FIT_QUEUE='a queue' must be"),
    ({"REDIS_URL": "redis://r", "JOB_LEASE_SECONDS": "1"}, "JOB_LEASE_SECONDS=1 must be at least 2"),
])
def test_scale_settings_name_the_variable(env, fragment):
    with pytest.raises(ValueError, match=fragment):
        Settings.from_env(env)


def test_without_redis_url_nothing_changes(tmp_path):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path)})
    assert settings.scale.redis_url is None and settings.scale.exemplar_store == "sqlite"
    assert type(JobManager(settings).records).__name__ == "FileJobRecords"


# --- job records in Redis --------------------------------------------------------------------------


def test_every_host_sees_one_job_per_project_and_the_same_status(redis_url, tmp_path):
    settings = Settings.from_env({**scale_env(redis_url), "MODEL_DIR": str(tmp_path),
                                  "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": API_KEY})
    host_a, host_b = JobManager(settings), JobManager(settings)
    first = host_a.start("1", trigger="START_TRAINING")
    assert first.started and first.status.startswith("training queued (job ")
    again = host_b.start("1", trigger="START_TRAINING")
    assert not again.started and again.status.startswith(f"already training (job {first.job['job_id']}")
    assert host_a.status("1") == host_b.status("1")
    assert host_b.status("1")["state"] == "queued" and host_b.status("1")["queue"] == "ls-clickseg-fit"
    assert host_b.start("2", trigger="START_TRAINING").started  # other projects are free
    queued = connect(redis_url).lrange("rq:queue:ls-clickseg-fit", 0, -1)
    assert len(queued) == 2 and first.job["job_id"].encode() in queued


@pytest.mark.slow
def test_a_job_no_worker_takes_fails_and_a_late_worker_does_not_run_it(wait_for, redis_url, tmp_path):
    env = {**scale_env(redis_url, FIT_QUEUE_TIMEOUT="1"), "MODEL_DIR": str(tmp_path),
           "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": API_KEY, "LOG_LEVEL": "WARNING"}
    jobs = JobManager(Settings.from_env(env))
    assert jobs.start("1", trigger="START_TRAINING").started
    failed = wait_for(lambda: (j := jobs.status("1"))["state"] == "failed" and j, timeout=10, what="the expiry")
    assert failed["error"].startswith("no training worker took the job within FIT_QUEUE_TIMEOUT=1 s")
    late = subprocess.run([sys.executable, "-m", "backend.fit_worker", "--queue", "--burst"], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert late.returncode == 0, late.stderr
    assert "no longer this job's" in (tmp_path / "1" / "job.log").read_text()
    assert jobs.status("1") == {**failed, "training": False}  # the late child wrote nothing
    assert jobs.start("1", trigger="START_TRAINING").started  # and the project is free


def test_annotation_counts_are_shared(redis_url, tmp_path):
    settings = Settings.from_env({**scale_env(redis_url), "MODEL_DIR": str(tmp_path),
                                  "TRAIN_EVERY_N_ANNOTATIONS": "3", "LABEL_STUDIO_URL": "http://127.0.0.1:9",
                                  "LABEL_STUDIO_API_KEY": API_KEY})
    host_a, host_b = JobManager(settings), JobManager(settings)
    assert not host_a.count_annotations("1", 2)
    assert host_b.count_annotations("1", 1)  # 3 between the two hosts
    assert host_a.status("1")["trigger"] == "3 new annotations (TRAIN_EVERY_N_ANNOTATIONS=3)"
    assert not host_a.count_annotations("1", 5)  # already training: the count goes on
    assert connect(redis_url).get("ls-clickseg:job:1:count") == b"5"


# --- two backend processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_an_annotation_sent_to_one_backend_is_recalled_by_a_click_on_the_other(wait_for, redis_url, tmp_path,
                                                                               backend_processes):
    """Host A gets the reviewer's ANNOTATION_UPDATED (blobs 1 and 3); the annotator's editor, on host B,
    still holds the older version (blob 1). B's click on blob 2 uses A's newer version from Redis: blob 3
    is an accepted object, never proposed again. A task without that webhook is the control."""
    image, labels = synthetic_scene(320, 240, objects=RECALL_SCENE_OBJECTS)
    height, width = labels.shape
    fake = FakeLabelStudioApi()
    fake.add_project()
    with serve(fake) as ls_url:
        for task_id in (1, 2):
            fake.files[f"/data/upload/1/scene{task_id}.png"] = (png_bytes(image), "image/png")
        env = {**scale_env(redis_url), "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": API_KEY,
               "MODEL_DIR": str(tmp_path / "models"), "WORKERS": "1", "THREADS": "2", "LOG_LEVEL": "WARNING"}
        host_a, host_b = backend_processes(env), backend_processes(env)

        def brush(blob: int) -> dict:
            return brush_result(labels == blob, f"blob{blob}")

        older = {**annotation([brush(1)], annotation_id=5), "updated_at": "2026-12-02T09:00:00.000000Z"}
        newer = {**annotation([brush(1), brush(3)], annotation_id=5), "updated_at": "2026-12-02T10:00:00.000000Z"}
        webhook = {"action": "ANNOTATION_UPDATED", "annotation": newer, "project": {"id": 1},
                   "task": {"id": 1, "project": 1, "data": {"image": "/data/upload/1/scene1.png"}}}
        assert requests.post(f"{host_a}/webhook", json=webhook, timeout=60).status_code == 201
        store = RedisExemplarStore(redis_url)
        wait_for(lambda: len(store.accepted_masks(1, 1)) == 2, what="host A's webhook in Redis")

        ys, xs = np.nonzero(labels == 2)
        click = pixel_keypoint(int(np.median(xs)), int(np.median(ys)), width=width, height=height)

        def proposals(task_id: int, annotation_id: int) -> list:
            task = interactive_task(f"/data/upload/1/scene{task_id}.png", task_id=task_id,
                                    annotations=[{**older, "id": annotation_id, "task": task_id}])
            response = requests.post(f"{host_b}/predict", json=predict_body([task], {"result": [click]}), timeout=300)
            assert response.status_code == 200, response.text
            return [decode_region(region) for region in response.json()["results"][0]["result"][1:]]

        recalled, control = proposals(1, 5), proposals(2, 6)
    blob3 = labels == 3

    def covers_blob3(masks: list) -> bool:
        return any((m & blob3).sum() / blob3.sum() > 0.5 for m in masks)

    assert covers_blob3(control) and len(control) == RECALL_SCENE_OBJECTS - 2  # blob 3 looks like blob 1
    assert recalled and not covers_blob3(recalled)  # on host B, blob 3 is A's accepted region
    regions = {(r.source, r.region_id, r.version) for r in store.accepted_masks(1, 1)}
    assert {(s, r) for s, r, _ in regions} == {("annotation:5", "blob1"), ("annotation:5", "blob3")}  # B kept A's


@pytest.mark.slow
def test_start_training_on_one_backend_runs_on_the_worker_and_both_serve_the_new_version(wait_for, redis_url, tmp_path, texture_project, backend_processes):
    checkpoint = small_checkpoint(tmp_path / "small.safetensors", SIZE)
    env = {**fit_env(texture_project.url, tmp_path / "models", checkpoint, FIT_HOLDOUT_FRACTION="0.25"),
           **scale_env(redis_url), "WORKERS": "1", "THREADS": "2", "LOG_LEVEL": "INFO"}
    host_a, host_b = backend_processes(env), backend_processes(env)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        first = requests.post(f"{host_a}/webhook", json=start_training_body(), timeout=30)
        assert first.status_code == 201 and first.json()["status"].startswith(("training queued", "queued")), first.text
        job = wait_for(lambda: (j := requests.get(f"{host_b}/jobs/1", timeout=30).json())["state"] in ("queued", "running") and j,
                       timeout=30, what="the job on host B")
        second = requests.post(f"{host_b}/webhook", json=start_training_body(), timeout=30)
        assert second.json()["status"].startswith(("already training", "queued")), second.text
        done = wait_for(lambda: (j := requests.get(f"{host_b}/jobs/1", timeout=30).json())["state"]
                        not in ("queued", "running", "idle") and j, timeout=420, what="the job to end")
        from_a = requests.get(f"{host_a}/jobs/1", timeout=30).json()
        task = interactive_task("/data/upload/1/task1.png", task_id=1)
        click = pixel_keypoint(SIZE // 2, SIZE // 2, width=SIZE, height=SIZE)
        versions = {host: requests.post(f"{host}/predict", json=predict_body([task], {"result": [click]}),
                                        timeout=120).json()["results"][0]["model_version"] for host in (host_a, host_b)}
    finally:
        stop_process(worker)
    assert done["state"] == "succeeded" and done["promoted"], (done, (tmp_path / "worker.log").read_text()[-3000:])
    assert done["job_id"] == job["job_id"] and from_a == done  # the same status from both hosts
    assert done["queue"] == "ls-clickseg-fit" and done["host"]
    assert versions == {host_a: "p1-v1", host_b: "p1-v1"}
    assert (tmp_path / "models" / "1" / "p1-v1" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_worker_killed_mid_job_frees_the_project_and_leaves_the_served_model(wait_for, redis_url, tmp_path, texture_project):
    checkpoint = small_checkpoint(tmp_path / "small.safetensors", SIZE)
    model_dir = tmp_path / "models"
    paths = ProjectPaths(model_dir, "1")
    paths.version_dir("p1-v1").mkdir(parents=True)
    small_checkpoint(paths.version_dir("p1-v1") / "model.safetensors", SIZE, version="p1-v1")
    write_json_atomic(paths.version_dir("p1-v1") / "metrics.json", {"version": "p1-v1"})
    promote(paths, "p1-v1", {})
    pointer = paths.pointer.read_bytes()
    env = {**fit_env(texture_project.url, model_dir, checkpoint, FIT_STEPS="100000"), **scale_env(redis_url)}
    settings = Settings.from_env(env)
    model = ClickSegModel(settings)
    worker = start_worker(env, tmp_path / "worker.log")
    with serve(create_app(settings, model)) as url:
        assert model.jobs.start("1", trigger="START_TRAINING").started
        running = wait_for(lambda: (j := requests.get(f"{url}/jobs/1", timeout=30).json()).get("step") and j,
                           timeout=180, what="training steps")
        assert running["state"] == "running" and running["stage"] == "training" and running["version"] == "p1-v2"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(30)
        wait_for(lambda: not _alive(running["pid"]), timeout=30, what="the job's process to die with its worker")
        failed = wait_for(lambda: (j := requests.get(f"{url}/jobs/1", timeout=30).json())["state"] != "running" and j,
                          timeout=30, what="the lease to expire")
        again = model.jobs.start("1", trigger="START_TRAINING")
    assert failed["state"] == "failed" and "stopped renewing its lease" in failed["error"], failed
    assert "the served model is unchanged" in failed["error"] and failed["served_version"] == "p1-v1"
    assert paths.pointer.read_bytes() == pointer and paths.versions() == ["p1-v1"]
    assert again.started  # the project is free for the next job


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that nobody reaped yet is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_the_job_records_are_plain_json(redis_url, tmp_path):
    records = RedisJobRecords(tmp_path, Settings.from_env(scale_env(redis_url)).scale)
    lock = records.lock("7")
    assert lock.try_acquire() and not records.lock("7").try_acquire()
    assert records.write("7", {"project": "7", "state": "queued"}, lock)
    assert json.loads(connect(redis_url).get("ls-clickseg:job:7:status")) == {"project": "7", "state": "queued"}
    stranger = records.lock("7")
    assert not records.write("7", {"project": "7", "state": "running"}, stranger)  # only the holder writes
    lock.release()
    assert records.lock("7").try_acquire()


def test_the_compose_scale_profile():
    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    scaled = {name for name, service in services.items() if service.get("profiles") == ["scale"]}
    assert scaled == {"redis", "backend-1", "backend-2", "balancer", "fit-worker"}
    for name in ("backend-1", "backend-2", "fit-worker"):
        env = services[name]["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0" and env["EXEMPLAR_STORE"] == "redis"
        assert "models:/models" in services[name]["volumes"]  # one MODEL_DIR for all
    assert services["fit-worker"]["command"] == ["python", "-m", "backend.fit_worker", "--queue"]
    assert "REDIS_URL" not in services["backend"]["environment"]  # the single-host default is unchanged
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    assert "server backend-1:9090" in nginx and "server backend-2:9090" in nginx
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in services["balancer"]["volumes"]


@pytest.mark.slow
def test_the_load_check_runs_annotators_over_two_backends(redis_url, tmp_path):
    """A short run of ``python -m backend.load_check`` on a small model: every click answered, no error."""
    checkpoint = small_checkpoint(tmp_path / "small.safetensors", SIZE)
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "-m", "backend.load_check", "--backends", "2", "--annotators", "3",
                           "--seconds", "8", "--size", "160x120", "--max-clicks", "2", "--checkpoint", str(checkpoint),
                           "--redis-url", redis_url, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["clicks"] >= 3 and report["errors"] == 0 and report["webhook_errors"] == 0
    assert all(p50 > 0 for p50 in report["per_backend_p50_ms"])  # both backends answered clicks
    assert "| backends | annotators |" in done.stdout and report["p99_ms"] >= report["p50_ms"] > 0


def test_a_redis_that_cannot_be_reached_is_a_503_that_says_so(tmp_path):
    env = {"REDIS_URL": "redis://:secret@127.0.0.1:9/0", "MODEL_DIR": str(tmp_path), "LOG_LEVEL": "WARNING",
           "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": API_KEY}
    settings = Settings.from_env(env)
    app = create_app(settings, ClickSegModel(settings)).test_client()
    jobs = app.get("/jobs/1")
    assert jobs.status_code == 503 and "redis://:***@127.0.0.1:9/0" in jobs.get_json()["error"]
    assert "secret" not in jobs.get_data(as_text=True) and "check REDIS_URL" in jobs.get_json()["error"]
    with pytest.raises(Exception, match="cannot be reached") as caught:
        JobManager(settings).start("1", trigger="START_TRAINING")
    assert getattr(caught.value, "status", None) == 503


def test_the_worker_stops_its_command_listener_promptly_even_after_it_saw_the_unsubscribe(redis_url):
    # The race that made a SIGTERM exit wait 60 s: the listener handles the UNSUBSCRIBE reply
    # before the worker's teardown stops it, then sleeps for a subscription that never comes.
    import time

    from rq import Queue

    from backend.fit_worker import TrainingWorker

    client = connect(redis_url)
    worker = TrainingWorker([Queue("listener-race", connection=client)], connection=client)
    worker.subscribe()
    worker.pubsub.unsubscribe()
    time.sleep(0.3)  # the listener takes the reply first
    start = time.monotonic()
    worker.pubsub_thread.stop()
    worker.pubsub_thread.join(timeout=30)
    elapsed = time.monotonic() - start
    worker.pubsub.close()
    assert not worker.pubsub_thread.is_alive() and elapsed < 3, f"the listener took {elapsed:.1f} s to stop"
