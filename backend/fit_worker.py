"""One fine-tuning job: ``python -m backend.fit_worker --project <id> [--job-id ID] [--lock-fd N | --lease-token T]``.

Started by the server on ``START_TRAINING`` (``backend.training_jobs.JobManager``) as a separate,
niced process with TRAIN_THREADS torch threads, holding the project's training lock; it can
also be run by hand with the server's environment (it then takes the lock itself).

With REDIS_URL, ``python -m backend.fit_worker --queue`` is the training worker: it takes the jobs
that servers queue on RQ (FIT_QUEUE) and runs each in a child process like the one above, which
holds the project's lease and dies with the worker (``run_queued_job``). ``rq worker <FIT_QUEUE>``
runs the same jobs.

1. Fetch the project's annotated tasks from Label Studio (``backend.labelstudio_api``); every
   brush region of every annotation that was not cancelled is one object; images come through
   ``ImageFetcher``, the code ``/predict`` uses. Skipped items are listed with their reason.
2. Hold out a slice of the tasks (FIT_HOLDOUT_FRACTION) and evaluate the served model on it
   (``model.evaluation.evaluate.evaluate_objects``: the standard clicker, NoC@85/90).
3. Fine-tune the served checkpoint on the rest with the ICL trainer (``model.training.train.Trainer``):
   FIT_STEPS steps, FIT_LR, FIT_BATCH_SIZE, augmentations on, FIT_FREEZE_BACKBONE.
4. Evaluate the new model on the same slice; write ``MODEL_DIR/<project>/p<project>-v<n>/``
   (built in a ``.tmp-`` directory, renamed when complete) and promote it (``current.json``)
   only if it is no worse (``compare``); otherwise keep it unserved, with the reason.

The status (``job.json``) is updated all along; every failure ends in state ``failed`` with a
plain ``error``; the served model is never touched before a complete version exists.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from rq import Queue, SimpleWorker

from model.checkpoint import read_header, resolve_device, save_checkpoint
from model.data import ObjectSample
from model.evaluation.evaluate import evaluate_objects
from model.predictor import ClickSegPredictor
from model.training.train import ObjectSource, TrainConfig, Trainer

from .config import Settings
from .errors import BackendError, ImageAccessError
from .exemplars import Exemplar, entry_regions, project_key
from .images import ImageFetcher
from .job_state import (FAILED, PACKAGE_ROOT, REJECTED, RUNNING, SUCCEEDED, JobLock, JobRecords, ProjectLock,
                        ProjectPaths, new_job_id, now_iso, promote, served_checkpoint, write_json_atomic)
from .labelstudio_api import LabelStudioApiError, ProjectExport, fetch_project
from .logging_setup import configure_logging
from .payload import parse_label_config
from .redis_state import RedisJobRecords, connect, redacted
from .rle import rle_to_mask
from .training_jobs import job_records

log = logging.getLogger("backend.fit_worker")

MAX_IMAGE_SIDE = 1280  # the predictor works on images of at most this long side: train at that size
MAX_SKIPPED_LISTED = 100
STOP_AT_IOU = 0.9  # evaluation stops an object at IoU 0.9: NoC@85 and NoC@90 stay exact
SEED = 0


class JobError(Exception):
    """The job cannot go on; the message is the status's ``error``."""


# --- training data -------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The project's objects: ``ObjectSample``s (image uint8 (H, W, 3), mask uint8 (H, W) 0/1)."""

    objects: List[Any] = field(default_factory=list)  # model.data.ObjectSample
    skipped: List[Dict[str, Any]] = field(default_factory=list)  # {"task", "annotation", "region", "reason"}
    counts: Dict[str, int] = field(default_factory=lambda: {
        "tasks_listed": 0, "annotated_tasks": 0, "annotations": 0, "cancelled_annotations": 0,
        "brush_regions": 0, "images": 0, "objects": 0})

    def skip(self, reason: str, task: Any = None, annotation: Any = None, region: Any = None) -> None:
        log.warning("skipped: %s", reason, extra={"task": task, "annotation": annotation, "region": region})
        self.skipped.append({"task": task, "annotation": annotation, "region": region, "reason": reason})


def _brush_regions(annotation: Mapping[str, Any], problems: List[str]) -> Tuple[List[Exemplar], List[str]]:
    """(brush regions, as the exemplar store reads them, types of the other results) of one annotation."""
    source = f"annotation:{annotation.get('id')}"
    results = annotation.get("result")
    others = [str(r.get("type")) for r in results if isinstance(r, Mapping) and r.get("type") != "brushlabels"] \
        if isinstance(results, list) else []
    return entry_regions(annotation, source, None, problems), others


def _image_url(task: Mapping[str, Any], image_fields: Mapping[str, str], to_name: Any) -> Optional[str]:
    data = task.get("data") if isinstance(task.get("data"), Mapping) else {}
    if to_name in image_fields:
        value = data.get(image_fields[to_name])
    elif len(data) == 1:
        value = next(iter(data.values()))
    else:
        value = data.get("image")
    return value if isinstance(value, str) and value.strip() else None


def _downscale(image: np.ndarray, max_side: int) -> Tuple[np.ndarray, Optional[Tuple[int, int]]]:
    """The image with its long side at most ``max_side`` and the new (width, height), None if unchanged."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image, None
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=2.0)), size


def objects_from_tasks(export: ProjectExport, fetcher: ImageFetcher, max_side: int = MAX_IMAGE_SIDE,
                       on_task: Optional[Callable[[int, int], None]] = None) -> TrainingData:
    """Every brush region of every non-cancelled annotation of ``export.tasks`` as one object.

    Objects of one task share one image array (the evaluation then encodes it once).
    """
    found = TrainingData()
    found.counts["tasks_listed"] = export.tasks_seen
    try:
        image_fields = parse_label_config(export.label_config).image_fields if export.label_config else {}
    except BackendError as exc:
        log.warning("the project's label config cannot be read (%s); image fields are guessed", exc.message)
        image_fields = {}
    for index, task in enumerate(export.tasks):
        if on_task:
            on_task(index, len(export.tasks))
        task_id = task.get("id")
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, Mapping)]
        if not annotations:
            continue
        found.counts["annotated_tasks"] += 1
        regions: List[Tuple[Any, Exemplar]] = []
        for annotation in annotations:
            found.counts["annotations"] += 1
            annotation_id = annotation.get("id")
            if annotation.get("was_cancelled"):
                found.counts["cancelled_annotations"] += 1
                found.skip("the annotation was cancelled (skipped by the annotator)", task_id, annotation_id)
                continue
            problems: List[str] = []
            brushes, others = _brush_regions(annotation, problems)
            for problem in problems:
                found.skip(problem, task_id, annotation_id)
            if not brushes:
                what = f"only {', '.join(sorted(set(others)))} results" if others else "an empty result"
                found.skip(f"the annotation has no brush regions ({what})", task_id, annotation_id)
                continue
            regions.extend((annotation_id, brush) for brush in brushes)
        found.counts["brush_regions"] += len(regions)
        by_image: Dict[Optional[str], List[Tuple[Any, Exemplar]]] = OrderedDict()
        for annotation_id, brush in regions:
            by_image.setdefault(_image_url(task, image_fields, brush.to_name), []).append((annotation_id, brush))
        for url, image_regions in by_image.items():
            _add_image_objects(found, fetcher, export.project, task_id, url, image_regions, max_side, ObjectSample)
    found.counts["objects"] = len(found.objects)
    return found


def _add_image_objects(found: TrainingData, fetcher: ImageFetcher, project: int, task_id: Any, url: Optional[str],
                       regions: Sequence[Tuple[Any, Exemplar]], max_side: int, sample_type) -> None:
    if url is None:
        found.skip(f"the task data has no image URL for {len(regions)} brush region(s)", task_id)
        return
    try:
        image = fetcher.fetch(url, task_id=task_id, project_id=project)
    except ImageAccessError as exc:
        found.skip(f"{len(regions)} brush region(s) skipped: {exc.message}", task_id)
        return
    found.counts["images"] += 1
    height, width = image.shape[:2]
    small, new_size = _downscale(image, max_side)
    for annotation_id, brush in regions:
        region_id = brush.region_id
        where = dict(task=task_id, annotation=annotation_id, region=region_id)
        mask_w, mask_h = brush.width, brush.height
        if (mask_w, mask_h) != (width, height):
            found.skip(f"the brush mask is {mask_w}x{mask_h} (original_width x original_height) but the image "
                       f"is {width}x{height}", **where)
            continue
        try:
            mask = rle_to_mask(list(brush.rle), height, width)
        except (ValueError, TypeError) as exc:
            found.skip(f"the brush RLE cannot be decoded ({exc})", **where)
            continue
        if new_size is not None:
            mask = np.asarray(Image.fromarray(mask).resize(new_size, Image.NEAREST))
        if not mask.any():
            found.skip("the brush mask is empty", **where)
            continue
        found.objects.append(sample_type(small, mask.astype(np.uint8), f"task{task_id}/annotation{annotation_id}/{region_id}",
                                         f"task{task_id}"))


def split_holdout(objects: Sequence[Any], fraction: float, max_heldout: int, seed: int = SEED
                  ) -> Tuple[List[Any], List[Any], str]:
    """(train, held-out, how) with whole images held out when there are two or more.

    Held-out objects are grouped by image (so each image is encoded once) and capped at ``max_heldout``.
    """
    by_image: Dict[str, List[Any]] = OrderedDict()
    for obj in objects:
        by_image.setdefault(obj.image_id, []).append(obj)
    if len(objects) < 2:
        raise JobError(f"fine-tuning needs at least 2 annotated objects (one is held out to check the new model), "
                       f"got {len(objects)}")
    ids = sorted(by_image)
    rng = random.Random(seed)
    rng.shuffle(ids)
    if len(ids) >= 2:
        count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
        heldout = [o for i in ids[:count] for o in by_image[i]]
        train = [o for i in ids[count:] for o in by_image[i]]
        how = f"{count} of {len(ids)} annotated images held out"
    else:
        single = list(by_image[ids[0]])
        rng.shuffle(single)
        count = min(len(single) - 1, max(1, round(fraction * len(single))))
        heldout, train = single[:count], single[count:]
        how = (f"{count} of {len(single)} objects held out; with one annotated image they share it with the "
               "training objects, so the check is optimistic")
    return train, heldout[:max_heldout], how


# --- status ---------------------------------------------------------------------------------------


class StatusWriter:
    """The job's status: merged updates, written through ``write`` (progress at most once a second)."""

    def __init__(self, write: Callable[[Mapping[str, Any]], Any], initial: Mapping[str, Any]):
        self._write = write
        self.data: Dict[str, Any] = dict(initial)
        self._written = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated_at"] = now_iso()
        if force or "state" in fields or "stage" in fields or time.monotonic() - self._written >= 1.0:
            self._write(self.data)
            self._written = time.monotonic()


# --- evaluation and training ----------------------------------------------------------------------


def evaluate_checkpoint(path: Path, objects: Sequence[Any], settings: Settings, device: str) -> Dict[str, Any]:
    """NoC@85/90, NoF and mIoU of the checkpoint on ``objects`` with the standard clicker."""
    started = time.perf_counter()
    predictor = ClickSegPredictor.from_checkpoint(path, **{**settings.predictor_options(), "device": device})
    summary = evaluate_objects(predictor, objects, max_clicks=settings.fit.eval_max_clicks,
                               stop_at_iou=STOP_AT_IOU).summary()
    curve = summary["miou_curve"]
    return {
        "version": predictor.model_version, "objects": summary["num_objects"], "max_clicks": summary["max_clicks"],
        "noc@85": summary["noc@85"], "noc@90": summary["noc@90"], "nof@85": summary["nof@85"],
        "nof@90": summary["nof@90"], "miou@1": curve[0], "miou_curve": curve,
        "seconds": round(time.perf_counter() - started, 2),
    }


MIOU_TOLERANCE = 0.01  # with NoC unchanged, a mean IoU this much lower counts as worse


def compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> Tuple[bool, str]:
    """(promote, reason): promote when neither NoC@85 nor NoC@90 got worse on the held-out objects
    and, where both NoCs are unchanged (e.g. both at the click limit), the mean IoU over the
    clicks did not drop by more than MIOU_TOLERANCE."""
    change = (f"NoC@85 {before['noc@85']:.2f} -> {after['noc@85']:.2f}, "
              f"NoC@90 {before['noc@90']:.2f} -> {after['noc@90']:.2f} on {after['objects']} held-out objects")
    worse = [name for name in ("noc@85", "noc@90") if after[name] > before[name] + 1e-9]
    if worse:
        return False, f"not promoted: {' and '.join(n.replace('noc', 'NoC') for n in worse)} got worse ({change})"
    unchanged = all(abs(after[name] - before[name]) <= 1e-9 for name in ("noc@85", "noc@90"))
    if unchanged and "miou_curve" in before and "miou_curve" in after:
        miou_before, miou_after = float(np.mean(before["miou_curve"])), float(np.mean(after["miou_curve"]))
        change += f", mean IoU {miou_before:.3f} -> {miou_after:.3f}"
        if miou_after < miou_before - MIOU_TOLERANCE:
            return False, f"not promoted: NoC unchanged and the mean IoU dropped ({change})"
    return True, f"promoted: no worse than the served model ({change})"


def fit_settings_dict(settings: Settings) -> Dict[str, Any]:
    return dataclasses.asdict(settings.fit)


def run_job(settings: Settings, project: str, status: StatusWriter, setup_token: Optional[str] = None) -> Dict[str, Any]:
    """The whole job (see the module docstring); returns the final status. Raises on failure."""
    fit = settings.fit
    paths = ProjectPaths(settings.model_dir, project)
    device = str(resolve_device(settings.device))
    timings: Dict[str, float] = {}
    clock = time.perf_counter()

    status.update(state=RUNNING, stage="fetching annotations", progress=0.0, started_at=now_iso(), pid=os.getpid(),
                  fit=fit_settings_dict(settings), device=device)
    try:
        export = fetch_project(settings.image_access, int(project), setup_token)
    except LabelStudioApiError as exc:
        raise JobError(str(exc)) from None
    if not export.tasks:
        raise JobError(f"project {project} has no annotations yet ({export.tasks_seen} tasks, none annotated): "
                       "annotate some tasks with brush masks, then start training again")
    status.update(stage="loading images")
    fetcher = ImageFetcher(settings.image_access)
    if setup_token:
        fetcher.set_setup_access_token(setup_token)
    data = objects_from_tasks(export, fetcher, on_task=lambda i, n: status.update(progress=round(0.1 * i / n, 3)))
    status.update(data=data.counts, skipped=data.skipped[:MAX_SKIPPED_LISTED], skipped_total=len(data.skipped))
    if not data.objects:
        reasons = "; ".join(sorted({s["reason"] for s in data.skipped})[:5]) or "no brush regions"
        raise JobError(f"none of the {data.counts['annotations']} annotations of project {project} gave a usable brush "
                       f"mask ({len(data.skipped)} skipped: {reasons})")
    train, heldout, how = split_holdout(data.objects, fit.holdout_fraction, fit.eval_max_objects)
    counts = {**data.counts, "train_objects": len(train), "heldout_objects": len(heldout), "heldout": how}
    timings["data_s"] = round(time.perf_counter() - clock, 2)

    try:
        pointed = served_checkpoint(paths)
    except ValueError as exc:
        log.warning("the project's current.json is unusable (%s): fine-tuning the default checkpoint", exc)
        pointed = None
    base_checkpoint = pointed[1] if pointed else settings.checkpoint
    try:
        arch, _, base_meta = read_header(base_checkpoint)
    except (OSError, ValueError) as exc:
        raise JobError(f"the served checkpoint cannot be read, so there is nothing to fine-tune: {exc}") from None
    status.update(stage="evaluating the served model", progress=0.1, data=counts, base_checkpoint=str(base_checkpoint))
    clock = time.perf_counter()
    before = evaluate_checkpoint(base_checkpoint, heldout, settings, device)
    timings["evaluate_before_s"] = round(time.perf_counter() - clock, 2)
    status.update(base_version=before["version"], evaluation={"before": before}, progress=0.15)

    version = paths.next_version()
    build = paths.root / f".tmp-{version}-{os.getpid()}"
    build.mkdir(parents=True)
    config = TrainConfig(
        arch=arch, init=str(base_checkpoint), out_dir=str(build / "train"), steps=fit.steps,
        batch_size=fit.batch_size, lr=fit.lr, warmup_steps=max(1, fit.steps // 10),
        freeze_backbone=fit.freeze_backbone, device=device, threads=fit.threads, seed=SEED,
        checkpoint_every=fit.steps, log_every=max(1, fit.steps // 20),
    )

    def on_progress(stats: Mapping[str, Any]) -> None:
        step = int(stats["step"])
        status.update(step=step, steps=fit.steps, loss=round(float(stats["loss"]), 5),
                      train_iou=round(float(stats["iou"]), 4), seconds_per_step=round(float(stats["sec_per_step"]), 3),
                      progress=round(0.15 + 0.75 * step / fit.steps, 3))

    status.update(stage="training", step=0, steps=fit.steps, version=version)
    clock = time.perf_counter()
    trainer = Trainer(config, sources=[(ObjectSource(train, f"project {project}"), 1.0)], on_progress=on_progress)
    trainer.run()
    timings["train_s"] = round(time.perf_counter() - clock, 2)

    status.update(stage="evaluating the new model", progress=0.9)
    meta = {
        "version": version, "project": project, "base_version": before["version"],
        "base_checkpoint": str(base_checkpoint), "steps": int(base_meta.get("steps", 0) or 0) + trainer.step,
        "fit_steps": trainer.step, "fit": fit_settings_dict(settings), "data": counts,
        "training_data": [f"label-studio project {project}: {len(train)} objects"], "trained_at": now_iso(),
    }
    checkpoint = build / "model.safetensors"
    trainer.net.eval()
    save_checkpoint(trainer.net, checkpoint, meta=meta, half=True)
    clock = time.perf_counter()
    after = evaluate_checkpoint(checkpoint, heldout, settings, device)  # the saved (half precision) weights
    timings["evaluate_after_s"] = round(time.perf_counter() - clock, 2)
    promoted, reason = compare(before, after)
    evaluation = {"before": before, "after": after}
    save_checkpoint(trainer.net, checkpoint, meta={**meta, "metrics": evaluation}, half=True)

    status.update(stage="saving", evaluation=evaluation, progress=0.98)
    train_log = build / "train" / "log.jsonl"
    if train_log.is_file():
        shutil.copyfile(train_log, build / "train_log.jsonl")
    shutil.rmtree(build / "train", ignore_errors=True)
    metrics = {
        "version": version, "project": project, "created_at": now_iso(), "job_id": status.data.get("job_id"),
        "trigger": status.data.get("trigger"), "base_version": before["version"],
        "base_checkpoint": str(base_checkpoint), "fit": fit_settings_dict(settings), "device": device,
        "data": counts, "skipped_total": len(data.skipped), "evaluation": evaluation, "promoted": promoted,
        "reason": reason, "final_loss": status.data.get("loss"), "timings": timings,
    }
    write_json_atomic(build / "metrics.json", metrics)
    os.rename(build, paths.version_dir(version))  # complete versions appear at once
    if promoted:
        promote(paths, version, {"evaluation": evaluation})
    log.info("fine-tuning finished: %s", reason, extra={"project": project, "model_version": version,
                                                         "promoted": promoted, **timings})
    status.update(state=SUCCEEDED if promoted else REJECTED, stage="done", progress=1.0, promoted=promoted,
                  reason=reason, served_version=version if promoted else (pointed[0] if pointed else before["version"]),
                  timings=timings, finished_at=now_iso())
    return status.data


# --- the process ---------------------------------------------------------------------------------

_lease_lost: List[str] = []  # why the lease was lost, set by the keep-alive thread before it stops the job


def _stop(signum, frame):
    if _lease_lost:
        raise SystemExit(f"stopped: {_lease_lost[0]}")
    raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")


def _lose_lease(reason: str) -> None:
    _lease_lost.append(reason)
    os.kill(os.getpid(), signal.SIGTERM)


def _take_lock(args: argparse.Namespace, records: JobRecords, project: str) -> Tuple[Optional[JobLock], str]:
    """(the lock this job holds, or None, why not)."""
    if args.lock_fd is not None:
        return ProjectLock.adopt(args.lock_fd, records.paths(project).lock), ""
    if args.lease_token is not None:
        if not isinstance(records, RedisJobRecords):
            return None, "--lease-token needs REDIS_URL"
        lease = records.adopt(project, args.lease_token)
        if lease is None:
            return None, (f"the lease of project {project} is no longer this job's (it expired while the job "
                          "waited in the queue, or another job runs): not run")
        lease.keep_alive(_lose_lease)
        return lease, ""
    lock = records.lock(project)
    if not lock.try_acquire():
        return None, f"project {project} is already training"
    return lock, ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.fit_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--project", help="Label Studio project id (one job)")
    parser.add_argument("--queue", action="store_true", help="be a training worker: run queued jobs (REDIS_URL)")
    parser.add_argument("--burst", action="store_true", help="with --queue: stop when the queue is empty")
    parser.add_argument("--job-id", default=None, help="id of the job (default: made up from the time)")
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="descriptor of the project's training lock, held by the starting server")
    parser.add_argument("--lease-token", default=None, help="token of the project's lease (queued jobs)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    if args.queue:
        if args.project:
            parser.error("--queue runs queued jobs: it takes no --project")
        if not settings.scale.redis_url:
            parser.error("--queue needs REDIS_URL (the queue and the job leases live in Redis)")
        return run_worker(settings, burst=args.burst)
    if not args.project:
        parser.error("--project is required (or --queue)")
    try:
        project = project_key(args.project)
    except ValueError as exc:
        parser.error(str(exc))
    records = job_records(settings)
    paths = records.paths(project)
    paths.root.mkdir(parents=True, exist_ok=True)
    lock, refusal = _take_lock(args, records, project)
    if lock is None:
        print(refusal, file=sys.stderr)
        return 2
    paths.clean_partial_files()  # what an interrupted job left; only the lock's holder may
    if settings.fit.nice:
        os.nice(settings.fit.nice)  # serving keeps the CPU first
    torch.set_num_threads(settings.fit.threads)
    signal.signal(signal.SIGTERM, _stop)
    job_id = args.job_id or new_job_id()
    handed_over = args.lock_fd is not None or args.lease_token is not None
    previous = (records.read(project) or {}) if handed_over else {}  # the server's 'queued' status
    status = StatusWriter(lambda data: records.write(project, data, lock), {
        "project": project, "job_id": job_id, "trigger": previous.get("trigger", "command line"),
        "queued_at": previous.get("queued_at", now_iso()), "log": str(paths.log), "progress": 0.0,
        "host": socket.gethostname(), **({"queue": previous["queue"]} if "queue" in previous else {}),
    })
    started = time.perf_counter()
    try:
        run_job(settings, project, status, setup_token=os.environ.get("LS_SETUP_ACCESS_TOKEN") or None)
        code = 0
    except JobError as exc:
        code = _fail(status, str(exc))
    except SystemExit as exc:
        code = _fail(status, f"{exc.code}; the served model is unchanged")
    except Exception as exc:  # noqa: BLE001 - every failure must reach the status
        log.error("fine-tuning failed", exc_info=exc, extra={"project": project})
        code = _fail(status, f"unexpected error ({type(exc).__name__}: {exc}); the served model is unchanged, "
                             f"see {paths.log}")
    finally:
        for partial in paths.root.glob(f".tmp-p{project}-v*-{os.getpid()}"):
            shutil.rmtree(partial, ignore_errors=True)
        status.update(force=True, total_seconds=round(time.perf_counter() - started, 2))
        lock.release()
    return code


def _fail(status: StatusWriter, error: str) -> int:
    log.error("fine-tuning failed: %s", error, extra={"project": status.data.get("project")})
    status.update(state=FAILED, error=error, finished_at=now_iso())
    return 1


# --- the training worker (REDIS_URL) ---------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # prctl option: the signal a child gets when its parent dies


def _die_with_parent() -> None:
    """In the job's child process: be killed when the worker dies (so a killed worker stops its job)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_queued_job(project: str, job_id: str, lease_token: str, setup_token: Optional[str] = None) -> int:
    """The RQ job: run ``python -m backend.fit_worker`` for the project, with the lease the server took.

    The child reports its own status and holds the lease; it is killed if this worker dies.
    Raises when the job did not succeed, so RQ lists it as failed too.
    """
    settings = Settings.from_env()
    paths = ProjectPaths(settings.model_dir, project_key(project))
    paths.root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    threads = str(settings.fit.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if setup_token:
        env["LS_SETUP_ACCESS_TOKEN"] = setup_token
    with open(paths.log, "w") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "backend.fit_worker", "--project", paths.project, "--job-id", job_id,
             "--lease-token", lease_token],
            env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    log.info("training job started", extra={"project": paths.project, "job": job_id, "pid": child.pid})
    code = child.wait()
    if code != 0:
        raise RuntimeError(f"training job {job_id} of project {paths.project} ended with exit code {code}; "
                           f"its status says why (GET /jobs/{paths.project})")
    return code


class TrainingWorker(SimpleWorker):
    """RQ's ``SimpleWorker`` whose command listener wakes every ``COMMAND_POLL_SECONDS``.

    RQ listens for worker commands on a pub/sub thread, ``run_in_thread(sleep_time=60)`` in RQ 3.0.
    At shutdown it unsubscribes, then stops and joins that thread. When the thread handles the
    UNSUBSCRIBE reply first, it waits out ``sleep_time`` for a subscription that never comes, and
    redis-py's ``stop()`` joins it without a limit: SIGTERM then took up to 60 s, past Docker's
    10 s grace. With a short ``sleep_time`` the exit waits at most about a second.
    """

    COMMAND_POLL_SECONDS = 1.0

    def subscribe(self) -> None:  # RQ's own, but for sleep_time
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=self.COMMAND_POLL_SECONDS, daemon=True,
            exception_handler=getattr(self, "_pubsub_exception_handler", None))


def run_worker(settings: Settings, burst: bool = False) -> int:
    """Take queued jobs one after another until stopped (or, with ``burst``, until the queue is empty)."""
    client = connect(settings.scale.redis_url)
    worker = TrainingWorker([Queue(settings.scale.queue, connection=client)], connection=client)
    log.info("training worker waiting for jobs", extra={"queue": settings.scale.queue,
                                                        "redis": redacted(settings.scale.redis_url)})
    worker.work(burst=burst, logging_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
