"""Fine-tuning jobs: bad input, crashes, locks, versioning, the served model per project, webhooks."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from support import (API_KEY, LABEL_CONFIG, FakeLabelStudioApi, annotation, annotation_created_body, brush_annotation,
                     fit_settings, keypoint, make_pat, post, serve, setup_body, small_checkpoint, start_training_body,
                     texture_scene)

from backend.app import create_app
from backend.config import Settings
from backend.fit_worker import JobError, StatusWriter, compare, run_job, split_holdout
from backend.job_state import ProjectPaths, promote, write_json_atomic
from backend.labelstudio_api import LabelStudioApiError, fetch_project
from backend.service import ClickSegModel
from backend.training_jobs import JobManager, ProjectModels
from model.data import ObjectSample

SIZE = 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("weights") / "small.safetensors", SIZE)


@pytest.fixture
def label_studio():
    fake = FakeLabelStudioApi()
    fake.add_project()
    with serve(fake) as url:
        fake.url = url
        yield fake


def add_textured_tasks(fake: FakeLabelStudioApi, count: int, first_seed: int = 0) -> None:
    for seed in range(first_seed, first_seed + count):
        image, mask = texture_scene(seed, SIZE)
        fake.add_task(image, [brush_annotation([mask])])


def run(settings: Settings, project: str = "1") -> dict:
    """run_job in this process; returns the status it wrote."""
    paths = ProjectPaths(settings.model_dir, project)
    paths.root.mkdir(parents=True, exist_ok=True)
    status = StatusWriter(lambda data: write_json_atomic(paths.status, data), {"project": project, "job_id": "test"})
    return run_job(settings, project, status)




# --- bad input -----------------------------------------------------------------------------------


def test_a_project_without_annotations(label_studio, checkpoint, tmp_path):
    for seed in range(3):
        label_studio.add_task(texture_scene(seed, SIZE)[0])
    with pytest.raises(JobError, match="project 1 has no annotations yet .3 tasks, none annotated"):
        run(fit_settings(label_studio.url, tmp_path, checkpoint))


def test_annotations_without_brush_regions(label_studio, checkpoint, tmp_path):
    for seed in range(2):
        label_studio.add_task(texture_scene(seed, SIZE)[0], [annotation([keypoint(40, 40, width=SIZE, height=SIZE)])])
    with pytest.raises(JobError, match=r"none of the 2 annotations of project 1 gave a usable brush mask .2 skipped: "
                                       r"the annotation has no brush regions \(only keypointlabels results\)"):
        run(fit_settings(label_studio.url, tmp_path, checkpoint))


@pytest.mark.slow
def test_unreachable_images_are_skipped_with_their_reason(label_studio, checkpoint, tmp_path, monkeypatch):
    add_textured_tasks(label_studio, 3)
    _, mask = texture_scene(7, SIZE)
    label_studio.add_task(None, [brush_annotation([mask])])  # its image is not served: 404
    status = run(fit_settings(label_studio.url, tmp_path, checkpoint, FIT_STEPS="2"))
    assert status["state"] in ("succeeded", "rejected") and status["data"]["objects"] == 3
    (skipped,) = status["skipped"]
    assert skipped["task"] == 4 and "/data/upload/1/task4.png" in skipped["reason"] and "HTTP 404" in skipped["reason"]


def test_only_unreachable_images(label_studio, checkpoint, tmp_path):
    for seed in range(2):
        label_studio.add_task(None, [brush_annotation([texture_scene(seed, SIZE)[1]])])
    with pytest.raises(JobError, match="none of the 2 annotations .* gave a usable brush mask .*HTTP 404"):
        run(fit_settings(label_studio.url, tmp_path, checkpoint))


def test_label_studio_down(checkpoint, tmp_path):
    with pytest.raises(JobError, match=r"cannot reach Label Studio at http://127.0.0.1:9 .*is LABEL_STUDIO_URL right"):
        run(fit_settings("http://127.0.0.1:9", tmp_path, checkpoint))


def test_token_rejected(label_studio, checkpoint, tmp_path):
    with pytest.raises(JobError, match=r"refused the token\(s\) \(LABEL_STUDIO_API_KEY \(legacy token\): HTTP 401"):
        run(fit_settings(label_studio.url, tmp_path, checkpoint, LABEL_STUDIO_API_KEY="f" * 40))
    with pytest.raises(JobError, match=r"personal access token\): HTTP 401 API key has expired"):
        run(fit_settings(label_studio.url, tmp_path, checkpoint, LABEL_STUDIO_API_KEY=make_pat(expires_in=-60)))


def test_a_personal_access_token_is_exchanged_through_the_sdk(checkpoint, tmp_path):
    pat = make_pat()
    fake = FakeLabelStudioApi(legacy_token=None, pat=pat)
    fake.add_project()
    add_textured_tasks(fake, 2)
    with serve(fake) as url:
        settings = fit_settings(url, tmp_path, checkpoint, LABEL_STUDIO_API_KEY=pat)
        export = fetch_project(settings.image_access, 1)
        with pytest.raises(LabelStudioApiError, match="has no project 5 .HTTP 404"):
            fetch_project(settings.image_access, 5)
    assert len(export.tasks) == 2 and "BrushLabels" in export.label_config
    assert ("POST", "/api/token/refresh/", "") in fake.requests
    assert {scheme for method, path, scheme in fake.requests if path.startswith("/api/p")} == {"Bearer"}


def test_start_training_without_label_studio_settings_says_so(checkpoint, tmp_path):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "CHECKPOINT": str(checkpoint), "LOG_LEVEL": "WARNING"})
    with serve(create_app(settings, ClickSegModel(settings))) as url:
        answer = post(f"{url}/webhook", start_training_body()).json()
        job = requests.get(f"{url}/jobs/1", timeout=30).json()
    assert answer["status"].startswith("training not started: LABEL_STUDIO_URL is not set")
    assert job["state"] == "failed" and "LABEL_STUDIO_URL" in job["error"] and not job["training"]


def test_project_directories_are_bounded(tmp_path, monkeypatch):
    from backend import training_jobs

    monkeypatch.setattr(training_jobs, "MAX_PROJECT_DIRS", 3)
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "LOG_LEVEL": "WARNING", "TRAIN_EVERY_N_ANNOTATIONS": "5"})
    jobs = JobManager(settings)
    for project in ("1", "2", "3"):
        assert not jobs.start(project, "START_TRAINING").started  # no LABEL_STUDIO_URL: a failed status
    assert jobs.projects() == ["1", "2", "3"]
    refused = jobs.start("4", "START_TRAINING")
    assert not refused.started and "already holds 3 project directories" in refused.status
    assert not jobs.count_annotations("5", 2)
    assert jobs.projects() == ["1", "2", "3"]  # nothing created for 4 or 5
    assert "LABEL_STUDIO_URL" in jobs.start("2", "START_TRAINING").status  # known projects still answer


def test_training_files_only_for_projects_the_backend_has_seen(checkpoint, tmp_path):
    """START_TRAINING and annotation counting keep files only for projects seen through /setup or
    described by the webhook as Label Studio sends it (with a label config that has a brush)."""
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "CHECKPOINT": str(checkpoint), "LOG_LEVEL": "ERROR",
                                  "TRAIN_EVERY_N_ANNOTATIONS": "100"})
    no_brush = LABEL_CONFIG.replace("BrushLabels", "PolygonLabels")
    with serve(create_app(settings, ClickSegModel(settings))) as url:
        for project in ({"id": 7}, {"id": 8, "label_config": no_brush}, {"id": 9, "label_config": "<View"}):
            refused = post(f"{url}/webhook", {"action": "START_TRAINING", "project": project})
            assert refused.status_code == 400 and "has not seen" in refused.json()["error"], refused.text
        task = {"id": 3, "project": 11, "data": {"image": "/data/upload/1/a.png"}, "meta": {}, "created_at": "",
                "updated_at": ""}
        counted = annotation_created_body(task, brush_annotation([np.ones((8, 8), bool)]))
        counted["annotation"].update(id=5, task=3)
        invented = {**counted, "project": {"id": 12, "title": "made up"}}
        invented["task"] = {**counted["task"], "project": 12}
        assert post(f"{url}/webhook", invented).status_code == 201
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []  # nothing for 7, 8, 9 or 12
        assert post(f"{url}/webhook", counted).status_code == 201  # Label Studio's shape: counted
        assert post(f"{url}/setup", {**setup_body(), "project": "13.1795419391"}).status_code == 200
        seen = post(f"{url}/webhook", {"action": "START_TRAINING", "project": {"id": 13}})
        assert seen.status_code == 201 and "LABEL_STUDIO_URL" in seen.json()["status"]  # accepted, then fails
        described = post(f"{url}/webhook", start_training_body(14))
        assert described.status_code == 201, described.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["11", "13", "14"]


@pytest.mark.parametrize("body, fragment", [
    ({"action": "START_TRAINING"}, "malformed START_TRAINING webhook: project must be a Label Studio project id"),
    ({"action": "START_TRAINING", "project": {"title": "no id"}}, "malformed START_TRAINING webhook"),
    ({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": 5, "task": {"id": 1}},
     "ANNOTATION_CREATED webhook has no annotation object"),
])
def test_malformed_webhooks_are_400s(checkpoint, tmp_path, body, fragment):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "CHECKPOINT": str(checkpoint), "LOG_LEVEL": "ERROR"})
    with serve(create_app(settings, ClickSegModel(settings))) as url:
        response = post(f"{url}/webhook", body)
        bad_project = requests.get(f"{url}/jobs/not-a-project", timeout=30)
    assert response.status_code == 400 and fragment in response.json()["error"], response.text
    assert bad_project.status_code == 400 and "not a Label Studio project id" in bad_project.json()["error"]
    assert not (tmp_path / "1").exists()


# --- jobs as processes: locks, status, crashes -----------------------------------------------------


@pytest.mark.slow
def test_one_job_per_project_and_a_killed_job_leaves_the_served_model(wait_for, label_studio, checkpoint, tmp_path):
    add_textured_tasks(label_studio, 4)
    settings = fit_settings(label_studio.url, tmp_path, checkpoint, FIT_STEPS="5000", FIT_NICE="5")
    paths = ProjectPaths(tmp_path, "1")
    served_dir = paths.version_dir("p1-v1")
    served_dir.mkdir(parents=True)
    small_checkpoint(served_dir / "model.safetensors", SIZE, version="p1-v1")
    write_json_atomic(served_dir / "metrics.json", {"version": "p1-v1"})
    promote(paths, "p1-v1", {})
    pointer = paths.pointer.read_bytes()

    worker_a, worker_b = JobManager(settings), JobManager(settings)  # two gunicorn workers
    first = worker_a.start("1", trigger="test")
    assert first.started and first.job["state"] == "queued"
    again = worker_b.start("1", trigger="test")
    assert not again.started and again.status.startswith(f"already training (job {first.job['job_id']}")
    job = wait_for(lambda: (j := worker_b.status("1")).get("step") and j, what="training steps")
    assert job["state"] == "running" and job["stage"] == "training" and job["training"]
    assert job["base_version"] == "p1-v1" and job["version"] == "p1-v2"
    assert [p.name for p in tmp_path.joinpath("1").glob(".tmp-p1-*")] == [f".tmp-p1-v2-{job['pid']}"]

    os.kill(job["pid"], signal.SIGKILL)
    dead = wait_for(lambda: (j := worker_b.status("1"))["state"] != "running" and j, what="the death to be noticed")
    assert dead["state"] == "failed" and "ended" in dead["error"] and "the served model is unchanged" in dead["error"]
    assert paths.pointer.read_bytes() == pointer and not (tmp_path / "1" / "p1-v2").exists()

    second = worker_b.start("1", trigger="test")  # the next job cleans the partial files
    assert second.started
    wait_for(lambda: not list(tmp_path.joinpath("1").glob(f".tmp-p1-v2-{job['pid']}")), what="the partial files to go")
    running = wait_for(lambda: (j := worker_a.status("1")).get("state") == "running" and j.get("pid") and j,
                       what="the second job to run")
    os.kill(running["pid"], signal.SIGTERM)  # a polite stop is reported by the job itself
    stopped = wait_for(lambda: (j := worker_a.status("1"))["state"] != "running" and j, what="the stop")
    assert stopped["state"] == "failed" and "stopped by signal SIGTERM" in stopped["error"]
    assert paths.pointer.read_bytes() == pointer and paths.versions() == ["p1-v1"]


@pytest.mark.slow
def test_a_job_that_fails_reports_it_in_its_status_and_log(wait_for, checkpoint, tmp_path):
    jobs = JobManager(fit_settings("http://127.0.0.1:9", tmp_path, checkpoint))
    assert jobs.start("3", trigger="test").started
    job = wait_for(lambda: (j := jobs.status("3"))["state"] not in ("queued", "running") and j, what="the failure")
    assert job["state"] == "failed" and job["error"].startswith("cannot reach Label Studio at http://127.0.0.1:9")
    log_lines = [json.loads(line) for line in Path(job["log"]).read_text().splitlines() if line.startswith("{")]
    assert any(r["level"] == "ERROR" and "cannot reach Label Studio" in r["message"] for r in log_lines)


# --- versions -------------------------------------------------------------------------------------


def test_a_worse_model_is_kept_but_not_served(label_studio, checkpoint, tmp_path, monkeypatch):
    import backend.fit_worker as fit_worker

    add_textured_tasks(label_studio, 3)
    scores = iter([{"noc@85": 2.0, "noc@90": 3.0}, {"noc@85": 2.5, "noc@90": 3.0}])

    def fake_evaluation(path, objects, settings, device):
        return {"version": "x", "objects": len(objects), **next(scores)}

    monkeypatch.setattr(fit_worker, "evaluate_checkpoint", fake_evaluation)
    status = run(fit_settings(label_studio.url, tmp_path, checkpoint, FIT_STEPS="2"))
    assert status["state"] == "rejected" and not status["promoted"]
    assert status["reason"] == "not promoted: NoC@85 got worse (NoC@85 2.00 -> 2.50, NoC@90 3.00 -> 3.00 on 1 held-out objects)"
    paths = ProjectPaths(tmp_path, "1")
    assert paths.versions() == ["p1-v1"] and not paths.pointer.exists()
    (listed,) = JobManager(fit_settings(label_studio.url, tmp_path, checkpoint)).versions("1")
    assert listed["version"] == "p1-v1" and listed["served"] is False and listed["reason"] == status["reason"]


def test_promotion_rule():
    before = {"noc@85": 3.0, "noc@90": 5.0, "objects": 4}
    assert compare(before, {"noc@85": 3.0, "noc@90": 5.0, "objects": 4})[0]  # no worse is enough
    assert compare(before, {"noc@85": 2.0, "noc@90": 4.5, "objects": 4})[0]
    promoted, reason = compare(before, {"noc@85": 2.0, "noc@90": 5.5, "objects": 4})
    assert not promoted and reason.startswith("not promoted: NoC@90 got worse")
    # NoC at the click limit before and after: the mean IoU decides
    limit = {"noc@85": 10.0, "noc@90": 10.0, "objects": 4}
    assert compare({**limit, "miou_curve": [0.1, 0.2]}, {**limit, "miou_curve": [0.4, 0.5]})[0]
    promoted, reason = compare({**limit, "miou_curve": [0.5, 0.6]}, {**limit, "miou_curve": [0.3, 0.4]})
    assert not promoted and reason.endswith("mean IoU 0.550 -> 0.350)")


def _objects(images: int, per_image: int):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    return [ObjectSample(np.zeros((8, 8, 3), np.uint8), mask, f"o{i}-{k}", f"task{i}")
            for i in range(images) for k in range(per_image)]


def test_holdout_keeps_whole_images_apart():
    train, heldout, how = split_holdout(_objects(10, 2), fraction=0.2, max_heldout=20)
    assert len(heldout) == 4 and len(train) == 16 and how == "2 of 10 annotated images held out"
    assert not {o.image_id for o in train} & {o.image_id for o in heldout}
    assert [o.image_id for o in heldout] == sorted((o.image_id for o in heldout), key=[o.image_id for o in heldout].index)
    _, capped, _ = split_holdout(_objects(10, 2), fraction=0.5, max_heldout=3)
    assert len(capped) == 3
    train, heldout, how = split_holdout(_objects(1, 5), fraction=0.2, max_heldout=20)
    assert (len(train), len(heldout)) == (4, 1) and "optimistic" in how
    with pytest.raises(JobError, match="at least 2 annotated objects"):
        split_holdout(_objects(1, 1), fraction=0.2, max_heldout=20)


def test_project_models_follow_the_pointer(tmp_path, caplog):
    paths = ProjectPaths(tmp_path, "4")
    for version in ("p4-v1", "p4-v2"):
        paths.version_dir(version).mkdir(parents=True)
        paths.version_dir(version).joinpath("model.safetensors").write_text(version)
    loads = []
    models = ProjectModels(tmp_path, load=lambda path: loads.append(path.parent.name) or f"predictor {path.read_text()}")
    assert models.get("4") is None  # no pointer: the default model
    promote(paths, "p4-v1", {})
    assert models.get("4") == "predictor p4-v1" and models.get("4") == "predictor p4-v1" and loads == ["p4-v1"]
    promote(paths, "p4-v2", {})
    assert models.get("4") == "predictor p4-v2" and models.version("4") == "p4-v2"
    write_json_atomic(paths.pointer, {"version": "p4-v9", "checkpoint": "../../etc/passwd"})
    assert models.get("4") == "predictor p4-v2"  # a bad pointer is logged, the project keeps its model
    assert "cannot switch project 4" in caplog.text and loads == ["p4-v1", "p4-v2"]
    paths.pointer.unlink()
    assert models.get("4") is None


# --- webhooks and the exemplar store ---------------------------------------------------------------


def test_annotation_webhooks_feed_the_exemplar_store_and_start_a_job_every_n(wait_for, checkpoint, tmp_path):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "CHECKPOINT": str(checkpoint), "LOG_LEVEL": "WARNING",
                                  "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": API_KEY,
                                  "TRAIN_EVERY_N_ANNOTATIONS": "2"})
    model = ClickSegModel(settings)
    model.jobs.command = [sys.executable, "-c", "import time; time.sleep(3)"]  # a stand-in job process
    image, mask = texture_scene(0, SIZE)
    fake = FakeLabelStudioApi()
    fake.add_project()
    tasks = [fake.add_task(image, [brush_annotation([mask])]) for _ in range(3)]
    with serve(create_app(settings, model)) as url:
        statuses = []
        for task in tasks:
            response = post(f"{url}/webhook", annotation_created_body(task, task["annotations"][0]))
            assert response.status_code == 201, response.text
            statuses.append(response.json()["status"])
            wait_for(lambda: model.exemplars.accepted_masks(1, task["id"]), what="the exemplar store")
        job = requests.get(f"{url}/jobs/1", timeout=30).json()
    # "queued" when the store took longer than the webhook's 50 ms wait (the work goes on in the background)
    assert statuses[0] in ("ok", "queued") and statuses[1] in ("ok; training started", "queued")
    assert statuses[2] in ("ok", "queued")
    assert job["trigger"] == "2 new annotations (TRAIN_EVERY_N_ANNOTATIONS=2)"  # started by the second one
    (region,) = model.exemplars.accepted_masks(1, tasks[0]["id"])
    assert np.array_equal(region.mask, mask) and region.label == "Object"
    assert (tmp_path / "1" / "annotations.count").read_text() == "1"


def test_interactive_predict_syncs_the_tasks_accepted_masks(checkpoint, tmp_path):
    fake = FakeLabelStudioApi()
    fake.add_project()
    image, mask = texture_scene(3, SIZE)
    task = fake.add_task(image, [brush_annotation([mask])])
    with serve(fake) as ls_url:
        settings = fit_settings(ls_url, tmp_path, checkpoint)
        model = ClickSegModel(settings)
        with serve(create_app(settings, model)) as url:
            body = {"tasks": [task], "project": "1.1795419391", "label_config": fake.projects[1]["label_config"],
                    "params": {"context": {"result": [keypoint(10, 10, width=SIZE, height=SIZE)]}}}
            response = post(f"{url}/predict", body)
            idle = requests.get(f"{url}/jobs/1", timeout=30).json()
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["model_version"] == "small-untrained-head"
    (region,) = model.exemplars.accepted_masks("1", task["id"])
    assert region.source == f"annotation:{task['annotations'][0]['id']}" and np.array_equal(region.mask, mask)
    assert idle == {"project": "1", "state": "idle", "training": False, "served_version": "small-untrained-head"}


@pytest.mark.parametrize("env, fragment", [
    ({"FIT_STEPS": "0"}, "FIT_STEPS=0 must be at least 1"),
    ({"FIT_LR": "fast"}, "FIT_LR='fast' is not a number"),
    ({"FIT_FREEZE_BACKBONE": "maybe"}, "FIT_FREEZE_BACKBONE='maybe' is not a boolean"),
    ({"FIT_HOLDOUT_FRACTION": "1.5"}, "FIT_HOLDOUT_FRACTION=1.5 must lie between"),
    ({"TRAIN_EVERY_N_ANNOTATIONS": "-1"}, "TRAIN_EVERY_N_ANNOTATIONS=-1 must be at least 0"),
    ({"EXEMPLAR_MAX_TASKS": "0"}, "EXEMPLAR_MAX_TASKS=0 must be at least 1"),
])
def test_fit_settings_name_the_variable(env, fragment):
    with pytest.raises(ValueError, match=fragment):
        Settings.from_env(env)


def test_fit_settings_defaults_and_overrides():
    default = Settings.from_env({}).fit
    assert (default.steps, default.batch_size, default.lr, default.freeze_backbone, default.threads) == (100, 4, 3e-4, False, 1)
    assert default.every_n_annotations == 0
    fit = Settings.from_env({"FIT_STEPS": "7", "FIT_FREEZE_BACKBONE": "yes", "TRAIN_THREADS": "2", "FIT_LR": "3e-5"}).fit
    assert (fit.steps, fit.freeze_backbone, fit.threads, fit.lr) == (7, True, 2, 3e-5)
