"""The exemplar store: payload parsing, create/update/delete semantics, persistence, eviction, concurrency.

Every store test runs on both stores: SQLite (the embedded default) and Redis (several hosts).

Payloads follow the shapes Label Studio 1.23.2 sends (shared/reference/label-studio-1.23.2-calls.jsonl).
"""
from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import threading

import numpy as np
import pytest

from backend import exemplars as ex
from backend.exemplars import (Exemplar, SQLiteExemplarStore, TaskRegions, project_key, regions_from_task,
                               regions_from_webhook, task_key, validate_region_size)
from backend.redis_state import RedisExemplarStore
from backend.rle import mask_to_rle

H, W = 24, 32  # image size used by most tests


def disk(cy: int, cx: int, r: int, h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def brush(region_id: str, mask: np.ndarray, label: str = "Grape") -> dict:
    """A brushlabels result as Label Studio stores it."""
    return {
        "original_width": int(mask.shape[1]), "original_height": int(mask.shape[0]), "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
        "id": region_id, "from_name": "tag", "to_name": "image", "type": "brushlabels", "origin": "manual",
    }


def keypoint(region_id: str) -> dict:
    return {
        "original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"x": 40.0, "y": 50.0, "width": 0.78, "keypointlabels": ["Grape"], "labels": ["Grape"]},
        "id": region_id, "from_name": "tag2", "to_name": "image", "type": "keypointlabels", "origin": "manual",
        "is_positive": True,
    }


def annotation(ann_id: int, results: list, updated_at: str = "2026-11-23T07:36:32.695278Z",
               cancelled: bool = False) -> dict:
    return {
        "id": ann_id, "completed_by": 1, "result": results, "was_cancelled": cancelled, "ground_truth": False,
        "created_at": "2026-11-23T07:36:32.695252Z", "updated_at": updated_at, "lead_time": 2.0,
        "result_count": len(results), "task": 1, "project": 1, "updated_by": 1,
    }


def draft(draft_id: int, results: list, of_annotation: int | None = None,
          updated_at: str = "2026-11-23T07:36:33.298076Z") -> dict:
    return {
        "id": draft_id, "user": "e2e@example.com", "created_username": "e2e@example.com, 1", "result": results,
        "lead_time": 1.0, "was_postponed": False, "created_at": "2026-11-23T07:36:33.298041Z",
        "updated_at": updated_at, "task": 1, "annotation": of_annotation,
    }


def task(annotations: list = (), drafts: list = (), task_id: int = 1) -> dict:
    return {"id": task_id, "annotations": list(annotations), "drafts": list(drafts), "predictions": [],
            "data": {"image": "/data/upload/1/a.png"}, "project": 1,
            "updated_at": "2026-11-23T07:36:32.715788Z"}


def webhook(action: str, ann: dict, task_id: int = 1) -> dict:
    return {"action": action, "annotation": {**ann, "task": task_id},
            "project": {"id": 1, "title": "e2e"}, "task": {"id": task_id, "project": 1}}


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """``make_store(max_tasks=...)`` opens the store of this parameter (again: the same data)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    opened = []

    def make(max_tasks: int = 2000):
        if url is None:
            store = SQLiteExemplarStore(tmp_path / "sub" / "exemplars.sqlite3", max_tasks=max_tasks)
        else:
            store = RedisExemplarStore(url, max_tasks=max_tasks)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store):
    return make_store()


def by_id(regions: list[Exemplar]) -> dict[str, Exemplar]:
    return {r.region_id: r for r in regions}


# --- identifiers and parsing ---------------------------------------------------------------------


def test_project_and_task_keys_normalise_label_studio_forms():
    assert project_key(1) == project_key("1") == project_key("1.1795419391") == project_key({"id": 1}) == "1"
    assert task_key(7) == task_key("7") == "7"
    for bad in (None, "abc", True, -1):
        with pytest.raises(ValueError, match="project"):
            project_key(bad)
    with pytest.raises(ValueError, match="task id"):
        task_key("x")


def test_regions_from_task_reads_brush_regions_of_annotations_and_drafts():
    m1, m2, m3 = disk(5, 5, 3), disk(12, 20, 4), disk(18, 8, 3)
    payload = task(
        annotations=[annotation(1, [brush("a1", m1), keypoint("k1")]),
                     annotation(2, [brush("skip", m3)], cancelled=True)],
        drafts=[draft(5, [brush("d1", m2, "Leaf"), keypoint("k2")])],
    )
    update = regions_from_task(payload, project="1.1795419391")
    assert (update.project, update.task_id) == ("1", "1")
    assert set(update.sources) == {"annotation:1", "draft:5"}  # the cancelled annotation is ignored
    assert [r.region_id for r in update.sources["annotation:1"]] == ["a1"]
    region = update.sources["draft:5"][0]
    assert (region.labels, region.height, region.width, region.to_name) == (("Leaf",), H, W, "image")
    assert np.array_equal(region.mask, m2)
    assert update.complete_kinds == {"annotation", "draft"}


def test_draft_of_an_annotation_replaces_it_unless_the_annotation_is_newer():
    old, new = disk(5, 5, 3), disk(15, 15, 5)
    ann = annotation(1, [brush("r", old)], updated_at="2026-11-23T07:00:00Z")
    newer_draft = draft(9, [brush("r", new)], of_annotation=1, updated_at="2026-11-23T08:00:00Z")
    assert set(regions_from_task(task([ann], [newer_draft])).sources) == {"draft:9"}
    older_draft = draft(9, [brush("r", new)], of_annotation=1, updated_at="2026-11-23T06:00:00Z")
    assert set(regions_from_task(task([ann], [older_draft])).sources) == {"annotation:1", "draft:9"}


def test_malformed_results_are_logged_and_skipped(caplog):
    good = brush("good", disk(5, 5, 3))
    bad_bytes = brush("bad-bytes", disk(5, 5, 3))
    bad_bytes["value"]["rle"] = [0, 18, "... 411 ints"]  # as the recording shortens masks
    no_size = brush("no-size", disk(5, 5, 3))
    del no_size["original_width"]
    polygon = {"type": "polygonlabels", "value": {"points": []}, "id": "p"}
    not_rle = brush("png", disk(5, 5, 3))
    not_rle["value"]["format"] = "png"
    with caplog.at_level(logging.WARNING, logger="backend.exemplars"):
        update = regions_from_task(task([annotation(1, [good, bad_bytes, no_size, polygon, not_rle])]))
    assert [r.region_id for r in update.sources["annotation:1"]] == ["good"]
    assert len(update.problems) == 2
    assert any("bad-bytes" in p and "corrupt RLE" in p for p in update.problems)
    assert any("no-size" in p and "original_width" in p for p in update.problems)
    assert sum("exemplar region skipped" in r.getMessage() for r in caplog.records) == 2


def test_regions_from_webhook_actions():
    ann = annotation(3, [brush("a", disk(5, 5, 3))])
    created = regions_from_webhook(webhook("ANNOTATION_CREATED", ann, task_id=4))
    assert (created.project, len(created.tasks)) == ("1", 1)
    update = created.tasks[0]
    assert (update.task_id, list(update.sources)) == ("4", ["annotation:3"])
    assert update.complete_kinds == {"draft"}  # the submitted draft is gone from Label Studio

    cancelled = regions_from_webhook(webhook("ANNOTATION_UPDATED", annotation(3, ann["result"], cancelled=True)))
    assert cancelled.tasks[0].sources == {"annotation:3": []}

    bulk = regions_from_webhook({"action": "ANNOTATIONS_CREATED", "project": {"id": 1},
                                 "annotation": [{**ann, "task": 1}, {**annotation(4, []), "task": 2}],
                                 "task": [{"id": 1}, {"id": 2}]})
    assert [(u.task_id, list(u.sources)) for u in bulk.tasks] == [("1", ["annotation:3"]), ("2", ["annotation:4"])]

    deleted = regions_from_webhook({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 3}]})
    assert deleted.deleted_sources == ["annotation:3"]
    tasks_deleted = regions_from_webhook({"action": "TASKS_DELETED", "project": {"id": 1}, "tasks": [{"id": 4}]})
    assert tasks_deleted.deleted_tasks == ["4"]

    assert regions_from_webhook({"action": "START_TRAINING", "project": {"id": 1}}) is None
    with pytest.raises(ValueError, match="annotations"):
        regions_from_webhook({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}})
    with pytest.raises(ValueError, match="no annotation object"):
        regions_from_webhook({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 1}})
    with pytest.raises(ValueError, match="project"):
        regions_from_webhook({"action": "ANNOTATION_CREATED", "task": 5, "annotation": ann})


def test_recorded_label_studio_payloads(shared_dir):
    """The recorded /predict task (annotation + drafts) and ANNOTATION_CREATED webhook parse as expected."""
    calls = [json.loads(line) for line in (shared_dir / "reference" / "label-studio-1.23.2-calls.jsonl").open()]
    predict = next(c for c in calls if c.get("phase") == "interactive_after_draft")["body"]
    hook = next(c for c in calls if c.get("phase") == "annotation")["body"]
    real_rle = mask_to_rle(disk(240, 320, 100, h=480, w=640))

    def restore_rle(node):  # the recording shortened the masks to 6 ints and a note
        if isinstance(node, dict):
            if node.get("format") == "rle":
                node["rle"] = real_rle
            for child in node.values():
                restore_rle(child)
        elif isinstance(node, list):
            for child in node:
                restore_rle(child)

    predict, hook = copy.deepcopy(predict), copy.deepcopy(hook)
    restore_rle(predict)
    restore_rle(hook)
    update = regions_from_task(predict["tasks"][0], project=predict["project"])
    # draft 2 edits annotation 1 and is newer, so it stands for it; draft 1 is a new draft.
    assert (update.project, update.task_id) == ("1", "1")
    assert {s: [r.region_id for r in rs] for s, rs in update.sources.items()} == {
        "draft:1": ["draft-1"], "draft:2": ["draft-2"]}
    assert update.sources["draft:1"][0].mask.sum() == disk(240, 320, 100, h=480, w=640).sum()

    changes = regions_from_webhook(hook)
    assert (changes.action, changes.project) == ("ANNOTATION_CREATED", "1")
    assert [(u.task_id, [r.region_id for r in u.sources["annotation:1"]]) for u in changes.tasks] == [("1", ["ann-1"])]


# --- store semantics -----------------------------------------------------------------------------


def test_annotation_update_removes_deleted_regions_and_updates_changed_ones(store):
    m1, m2, m1_redrawn = disk(5, 5, 3), disk(15, 20, 4), disk(6, 7, 4)
    report = store.sync_task(regions_from_task(task([annotation(1, [brush("r1", m1), brush("r2", m2)])])),
                             image_size=(H, W))
    assert report.written == ["annotation:1"] and not report.rejected
    assert set(by_id(store.accepted_masks(1, 1))) == {"r1", "r2"}

    later = annotation(1, [brush("r1", m1_redrawn)], updated_at="2026-11-23T08:00:00Z")
    store.apply_webhook(regions_from_webhook(webhook("ANNOTATION_UPDATED", later)))
    regions = by_id(store.accepted_masks(1, 1))
    assert set(regions) == {"r1"}
    assert np.array_equal(regions["r1"].mask, m1_redrawn)


def test_snapshot_removes_annotations_and_drafts_it_no_longer_lists(store):
    ann1 = annotation(1, [brush("a", disk(5, 5, 3))])
    ann2 = annotation(2, [brush("b", disk(15, 15, 3))])
    d = draft(7, [brush("c", disk(10, 25, 3))])
    store.sync_task(regions_from_task(task([ann1, ann2], [d])), image_size=(H, W))
    assert set(by_id(store.accepted_masks(1, 1))) == {"a", "b", "c"}

    report = store.sync_task(regions_from_task(task([ann1])), image_size=(H, W))  # ann2 deleted, draft submitted
    assert sorted(report.removed) == ["annotation:2", "draft:7"]
    assert set(by_id(store.accepted_masks(1, 1))) == {"a"}

    cancelled = annotation(1, ann1["result"], cancelled=True)
    store.sync_task(regions_from_task(task([cancelled])), image_size=(H, W))
    assert store.accepted_masks(1, 1) == []
    assert store.stats()["tasks"] == 0  # a task with nothing accepted is not kept


def test_resent_snapshot_is_unchanged_and_older_versions_are_ignored(store):
    v1 = annotation(1, [brush("r", disk(5, 5, 3))], updated_at="2026-11-23T07:00:00Z")
    v2 = annotation(1, [brush("r", disk(15, 15, 5))], updated_at="2026-11-23T08:00:00Z")
    store.sync_task(regions_from_task(task([v2])))
    again = store.sync_task(regions_from_task(task([v2])))
    assert (again.written, again.unchanged) == ([], ["annotation:1"])
    stale = store.sync_task(regions_from_task(task([v1])))  # a payload built before the update, processed late
    assert (stale.written, stale.stale) == ([], ["annotation:1"])
    assert np.array_equal(store.accepted_masks(1, 1)[0].mask, disk(15, 15, 5))


def test_drafts_and_annotations_together_with_labels_and_dedup(store):
    shared_region = brush("same", disk(5, 5, 3))
    edited_region = brush("same", disk(6, 6, 4))
    ann = annotation(1, [shared_region, brush("leaf", disk(18, 25, 3), "Leaf")], updated_at="2026-11-23T07:00:00Z")
    d = draft(3, [edited_region, brush("new", disk(15, 10, 3))], updated_at="2026-11-23T08:00:00Z")
    store.sync_task(regions_from_task(task([ann], [d])), image_size=(H, W))
    accepted = by_id(store.accepted_masks("1.1795419391", "1"))
    assert set(accepted) == {"same", "leaf", "new"}  # "same" once: the newest (the draft's)
    assert accepted["same"].source == "draft:3"
    assert np.array_equal(accepted["same"].mask, disk(6, 6, 4))
    assert {r.region_id for r in store.exemplars(1, 1, "Grape")} == {"same", "new"}
    assert [r.region_id for r in store.exemplars(1, 1, "Leaf")] == ["leaf"]
    assert store.exemplars(1, 1, "Car") == []
    assert all(r.updated_at is not None for r in accepted.values())


def test_corrupt_rle_is_skipped_and_the_rest_kept(store, caplog):
    good = brush("good", disk(5, 5, 3))
    truncated = brush("truncated", disk(12, 12, 6))
    truncated["value"]["rle"] = truncated["value"]["rle"][:9]
    with caplog.at_level(logging.WARNING, logger="backend.exemplars"):
        report = store.sync_task(regions_from_task(task([annotation(1, [good, truncated])])), image_size=(H, W))
    assert [r.region_id for r in store.accepted_masks(1, 1)] == ["good"]
    assert len(report.rejected) == 1 and "corrupt RLE" in report.rejected[0]
    assert any("truncated" in r.getMessage() for r in caplog.records)
    # The same corrupt source re-sent is recognised: not decoded or logged again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backend.exemplars"):
        again = store.sync_task(regions_from_task(task([annotation(1, [good, truncated])])), image_size=(H, W))
    assert again.unchanged == ["annotation:1"] and not caplog.records


def test_an_rle_whose_header_disagrees_with_the_declared_size_is_skipped_when_parsed():
    good = brush("good", disk(5, 5, 3))
    wrong_count = brush("wrong-count", disk(5, 5, 3, h=10, w=10))  # decodes, but to 10x10 pixels
    wrong_count["original_width"], wrong_count["original_height"] = W, H
    header_only = brush("header-only", disk(5, 5, 3))
    header_only["value"]["rle"] = header_only["value"]["rle"][:3]
    update = regions_from_task(task([annotation(1, [good, wrong_count, header_only])]))
    assert [r.region_id for r in update.sources["annotation:1"]] == ["good"]
    assert any("wrong-count" in p and f"header declares {10 * 10 * 4} values" in p and f"needs {W * H * 4}" in p
               for p in update.problems)
    assert any("header-only" in p and "at least 7 bytes" in p for p in update.problems)


def test_size_mismatch_is_rejected_with_a_message(store):
    region = regions_from_task(task([annotation(1, [brush("r", disk(5, 5, 3))])])).sources["annotation:1"][0]
    validate_region_size(region, H, W)
    with pytest.raises(ValueError, match=r"'r' of annotation:1 is 32x24 .* but the image is 64x48"):
        validate_region_size(region, 48, 64)

    big = brush("big", disk(10, 10, 5, h=48, w=64))
    report = store.sync_task(regions_from_task(task([annotation(1, [brush("ok", disk(5, 5, 3)), big])])),
                             image_size=(H, W))
    assert [r.region_id for r in store.accepted_masks(1, 1)] == ["ok"]
    assert len(report.rejected) == 1 and "'big'" in report.rejected[0] and "the image is 32x24" in report.rejected[0]

    # Without the image (a webhook), the task's stored size is the reference.
    hook = webhook("ANNOTATION_CREATED", annotation(2, [big, brush("ok2", disk(8, 8, 3))]))
    [report] = store.apply_webhook(regions_from_webhook(hook))
    assert len(report.rejected) == 1 and "stored regions" in report.rejected[0]
    assert {r.region_id for r in store.accepted_masks(1, 1)} == {"ok", "ok2"}

    # A new task seen first through a webhook: the odd size out is rejected.
    hook = webhook("ANNOTATION_CREATED", annotation(3, [brush("x", disk(5, 5, 3)), brush("y", disk(9, 9, 3)), big]),
                   task_id=2)
    [report] = store.apply_webhook(regions_from_webhook(hook))
    assert {r.region_id for r in store.accepted_masks(1, 2)} == {"x", "y"} and len(report.rejected) == 1


def test_image_size_change_drops_regions_of_the_old_size(store):
    store.sync_task(regions_from_task(task([annotation(1, [brush("r", disk(5, 5, 3))])])))
    assert len(store.accepted_masks(1, 1)) == 1
    report = store.sync_task(regions_from_task(task([annotation(1, [brush("r", disk(5, 5, 3))])])),
                             image_size=(2 * H, 2 * W))
    assert store.accepted_masks(1, 1) == [] and len(report.rejected) == 1


def test_webhooks_delete_annotations_and_tasks(store):
    store.sync_task(regions_from_task(task([annotation(1, [brush("a", disk(5, 5, 3))]),
                                            annotation(2, [brush("b", disk(15, 15, 3))])])))
    store.sync_task(regions_from_task(task([annotation(3, [brush("c", disk(5, 5, 3))])], task_id=2)))
    store.apply_webhook(regions_from_webhook(
        {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 1}, {"id": 3}]}))
    assert [r.region_id for r in store.accepted_masks(1, 1)] == ["b"]
    assert store.accepted_masks(1, 2) == []
    assert store.stats()["tasks"] == 1
    store.apply_webhook(regions_from_webhook({"action": "TASKS_DELETED", "project": {"id": 1}, "tasks": [{"id": 1}]}))
    assert store.stats()["tasks"] == store.stats()["regions"] == 0


def test_annotation_webhook_drops_stored_drafts(store):
    d = draft(7, [brush("d", disk(5, 5, 3))])
    store.sync_task(regions_from_task(task([], [d])))
    store.apply_webhook(regions_from_webhook(webhook("ANNOTATION_CREATED", annotation(1, [brush("d", disk(5, 5, 3))]))))
    assert [(r.source, r.region_id) for r in store.accepted_masks(1, 1)] == [("annotation:1", "d")]


def test_store_survives_reopen(make_store):
    first = make_store()
    first.sync_task(regions_from_task(task([annotation(1, [brush("r", disk(5, 5, 3))])])), image_size=(H, W))
    first.close()
    second = make_store()
    [region] = second.exemplars(1, 1, "Grape")
    assert np.array_equal(region.mask, disk(5, 5, 3))
    assert second.stats()["regions"] == 1 and second.stats()["rle_bytes"] == len(region.rle)
    second.close()


def test_eviction_keeps_the_most_recently_updated_tasks(make_store, monkeypatch):
    monkeypatch.setattr(ex, "TOUCH_INTERVAL_S", 0.0)  # every sync refreshes the task's age
    store = make_store(max_tasks=3)

    def sync(task_id):
        return store.sync_task(regions_from_task(task([annotation(task_id, [brush(f"r{task_id}", disk(5, 5, 3))])],
                                                      task_id=task_id)))

    for task_id in (1, 2, 3):
        sync(task_id)
    sync(1)  # task 1 is used again: task 2 is now the oldest
    assert sync(4).evicted == 1
    assert sorted(t for t in range(1, 6) if store.accepted_masks(1, t)) == [1, 3, 4]
    for task_id in range(5, 15):
        sync(task_id)
    assert store.stats()["tasks"] == 3
    assert sorted(t for t in range(1, 15) if store.accepted_masks(1, t)) == [12, 13, 14]
    assert store.stats()["regions"] == 3 and store.stats()["sources"] == 3
    with pytest.raises(ValueError, match="max_tasks"):
        make_store(max_tasks=0)


# --- concurrency ---------------------------------------------------------------------------------

WRITERS, WRITES = 4, 50


def _writer(worker: int, store: ex.ExemplarStore, errors) -> None:
    """Write WRITES sources into the shared task 1 and WRITES tasks of its own, reading in between."""
    try:
        mask = disk(5 + worker, 5, 3)
        for i in range(WRITES):
            ann_id = worker * 1000 + i
            store.apply_webhook(regions_from_webhook(webhook(
                "ANNOTATION_CREATED", annotation(ann_id, [brush(f"w{worker}-{i}", mask)]), task_id=1)))
            own_task = 100 + worker * WRITES + i
            store.sync_task(regions_from_task(task([annotation(ann_id, [brush("own", mask)])], task_id=own_task)),
                            image_size=(H, W))
            if i % 10 == 0:
                store.accepted_masks(1, 1)
    except Exception as exc:  # reported to the parent, which fails the test
        errors.put(f"writer {worker}: {exc!r}")
        raise


def _check_all_writes(store: ex.ExemplarStore) -> None:
    ids = {r.region_id for r in store.accepted_masks(1, 1)}
    assert ids == {f"w{w}-{i}" for w in range(WRITERS) for i in range(WRITES)}
    stats = store.stats()
    assert stats["tasks"] == 1 + WRITERS * WRITES
    assert stats["regions"] == stats["sources"] == 2 * WRITERS * WRITES  # the counts stayed exact


def test_concurrent_writer_processes(make_store):
    """4 forked processes x 50 writes: no 'database is locked', no lost write, no shared connection."""
    store = make_store(max_tasks=10_000)
    store.accepted_masks(1, 1)  # the parent holds an open connection when it forks
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    workers = [context.Process(target=_writer, args=(w, store, errors)) for w in range(WRITERS)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    messages = [errors.get() for _ in range(errors.qsize())]
    assert not messages and [p.exitcode for p in workers] == [0] * WRITERS, messages
    _check_all_writes(store)
    store.close()


def _reports_connection_reuse(store: SQLiteExemplarStore, parent_connection, results) -> None:
    results.put(store._connection() is parent_connection)


def test_forked_process_opens_its_own_connection(tmp_path):
    store = SQLiteExemplarStore(tmp_path / "exemplars.sqlite3")
    parent_connection = store._connection()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_reports_connection_reuse, args=(store, parent_connection, results))
    child.start()
    child.join(timeout=60)
    assert results.get(timeout=10) is False  # SQLite connections must never cross a fork
    assert store._connection() is parent_connection  # the parent keeps its own
    store.close()


def test_concurrent_writer_threads(make_store):
    store = make_store(max_tasks=10_000)
    errors = multiprocessing.get_context("fork").Queue()
    threads = [threading.Thread(target=_writer, args=(w, store, errors)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors.empty()
    _check_all_writes(store)
    store.close()


def test_decoded_mask_cache_shares_read_only_masks_within_its_budget():
    mask_a, mask_b = disk(5, 5, 3), disk(15, 15, 5)
    cache = ex.DecodedMaskCache(max_bytes=mask_a.nbytes)  # room for one mask
    rle_a, rle_b = bytes(mask_to_rle(mask_a)), bytes(mask_to_rle(mask_b))
    first = cache.decode(rle_a, H, W)
    assert np.array_equal(first, mask_a) and not first.flags.writeable
    assert cache.decode(rle_a, H, W) is first
    assert np.array_equal(cache.decode(rle_b, H, W), mask_b)  # evicts mask_a
    assert cache.decode(rle_a, H, W) is not first
    with pytest.raises(ValueError, match="RLE"):
        cache.decode(rle_a[:9], H, W)


def test_task_regions_can_be_built_directly(store):
    """The store takes any TaskRegions, e.g. from a future source: unknown sizes are checked too."""
    region = Exemplar(source="annotation:1", region_id="r", labels=("Grape",), height=H, width=W,
                      rle=bytes(mask_to_rle(disk(5, 5, 3))))
    update = TaskRegions(project="1", task_id="9", sources={"annotation:1": [region]})
    assert store.sync_task(update, image_size=(H, W)).written == ["annotation:1"]
    assert store.exemplars(1, 9, "Grape")[0].label == "Grape"


def test_an_unreachable_redis_is_a_store_error_naming_it_without_the_password():
    with pytest.raises(ex.StoreError, match=r"redis://user:\*\*\*@127.0.0.1:9/0") as caught:
        RedisExemplarStore("redis://user:secret@127.0.0.1:9/0")
    assert "secret" not in str(caught.value)


def test_a_redis_that_goes_away_is_a_store_error(redis_url):
    store = RedisExemplarStore(redis_url)
    store.client.connection_pool.reset()
    store.client.connection_pool.connection_kwargs["port"] = 9  # as if Redis went down
    with pytest.raises(ex.StoreError, match="RedisExemplarStore"):
        store.accepted_masks(1, 1)
