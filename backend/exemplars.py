"""The exemplar store: the accepted brush masks of each (project, task), per label.

Exemplar recall (issue 5) needs, for the task being annotated, every region that someone has
already accepted: its mask is the exemplar of its label, and all of them together tell which
clicks fall on finished objects. Label Studio shows them to the backend in two ways:

- interactive ``/predict`` calls carry the task with ``annotations`` (every user's) and
  ``drafts`` (the requesting user's only; drafts trigger no webhook), read by
  ``regions_from_task``;
- ``ANNOTATION_CREATED`` / ``ANNOTATIONS_CREATED`` / ``ANNOTATION_UPDATED`` /
  ``ANNOTATIONS_DELETED`` / ``TASKS_DELETED`` webhooks, read by ``regions_from_webhook``.

Regions are kept per *source*: ``"annotation:<id>"`` or ``"draft:<id>"``. Syncing a source
replaces everything stored for it, so a region deleted or redrawn in a later version of an
annotation disappears or changes here too. A task payload is a full snapshot: stored
annotations and drafts that it no longer lists are removed.

Only ``brushlabels`` results with ``value.format == "rle"`` count. Masks stay in Label Studio's
RLE (``backend.rle``) and are decoded on read (``Exemplar.mask``). A region with corrupt RLE,
or whose size differs from the image (``validate_region_size``), is logged and skipped; the
rest of the task is kept and nothing raises.

``ExemplarStore`` is the interface; every store decides what to write with ``plan_sync`` (before
its write transaction) and ``resolve_sync`` (inside it). ``SQLiteExemplarStore`` is the embedded
default, a file in ``MODEL_DIR`` shared by all gunicorn workers; ``backend.redis_store`` holds
the one that several backend hosts share.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import short_repr
from .rle import CHANNELS, rle_to_mask, rle_value_count

log = logging.getLogger(__name__)

ANNOTATION = "annotation"  # source kind of a submitted annotation: "annotation:<id>"
DRAFT = "draft"  # source kind of a draft: "draft:<id>"
SOURCE_KINDS = (ANNOTATION, DRAFT)
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
WEBHOOK_EVENTS = ANNOTATION_EVENTS + ("ANNOTATIONS_DELETED", "TASKS_DELETED")

Size = Tuple[int, int]  # (height, width)
TOUCH_INTERVAL_S = 60.0  # an unchanged task's age is refreshed at most this often (saves writes per click)


# --- identifiers ---------------------------------------------------------------------------------


MAX_ID_DIGITS = 18  # project and task ids: Label Studio's are database integers
MAX_ID_CHARS = 200  # region ids
MAX_REGION_PIXELS = 50_000_000  # as MAX_IMAGE_PIXELS's default: a larger brush region is never decoded
_ID = re.compile(r"[0-9]{1,%d}" % MAX_ID_DIGITS)


def project_key(project: Any) -> str:
    """The project id as stored: 1, "1", "1.1795419391" (``/predict``'s id.timestamp) and {"id": 1} -> "1"."""
    if isinstance(project, Mapping):
        project = project.get("id")
    if isinstance(project, str):
        project = project.split(".", 1)[0]
        if _ID.fullmatch(project):
            return str(int(project))
    elif isinstance(project, int) and not isinstance(project, bool) and 0 <= project < 10 ** MAX_ID_DIGITS:
        return str(project)
    raise ValueError(f"project must be a Label Studio project id (int, 'id' or 'id.timestamp'), got {short_repr(project)}")


def task_key(task_id: Any) -> str:
    """The task id as stored: 7 or "7" -> "7"."""
    if isinstance(task_id, str) and _ID.fullmatch(task_id):
        return str(int(task_id))
    if isinstance(task_id, int) and not isinstance(task_id, bool) and 0 <= task_id < 10 ** MAX_ID_DIGITS:
        return str(task_id)
    raise ValueError(f"task id must be a non-negative integer of at most {MAX_ID_DIGITS} digits, got {short_repr(task_id)}")



def source_key(kind: str, entry_id: Any) -> str:
    """``"annotation:12"`` / ``"draft:3"``: the source a set of regions comes from."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {kind!r}")
    if (isinstance(entry_id, bool) or not isinstance(entry_id, (int, str)) or str(entry_id) == ""
            or len(str(entry_id)) > MAX_ID_CHARS):
        raise ValueError(f"{kind} id must be an integer or a non-empty string, got {short_repr(entry_id)}")
    return f"{kind}:{entry_id}"


def source_kind(source: str) -> str:
    return source.split(":", 1)[0]


def _timestamp(value: Any) -> Optional[float]:
    """Unix time of a Label Studio ISO timestamp ("2026-11-23T07:36:32.695278Z"), None if absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- regions -------------------------------------------------------------------------------------


class DecodedMaskCache:
    """Decoded masks by RLE content, least recently used first out, within ``max_bytes``.

    Every click reads the task's accepted masks again; decoding a 2048x1365 mask costs a few
    milliseconds, looking it up here microseconds. Cached masks are read-only.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._masks: "OrderedDict[Tuple[bytes, int, int], np.ndarray]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def decode(self, rle: bytes, height: int, width: int) -> np.ndarray:
        """``rle_to_mask`` of ``rle``, (height, width) bool, read-only. ValueError if corrupt."""
        key = (hashlib.blake2b(rle, digest_size=16).digest(), height, width)
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
                return mask
        mask = rle_to_mask(np.frombuffer(rle, dtype=np.uint8), height, width)
        mask.setflags(write=False)
        if mask.nbytes <= self.max_bytes:
            with self._lock:
                if key not in self._masks:
                    self._masks[key] = mask
                    self._bytes += mask.nbytes
                while self._bytes > self.max_bytes:
                    _, evicted = self._masks.popitem(last=False)
                    self._bytes -= evicted.nbytes
        return mask


MASK_CACHE = DecodedMaskCache(max_bytes=64 * 2**20)  # per process: about 23 masks of 2048x1365


@dataclass(frozen=True)
class Exemplar:
    """One accepted brush region, its mask kept as Label Studio RLE.

    ``version`` is the Label Studio ``updated_at`` (Unix time) of the annotation or draft it comes
    from, when known; ``updated_at`` is when the store wrote it (None before it is stored).
    """

    source: str  # "annotation:<id>" or "draft:<id>"
    region_id: str  # the result's "id" in Label Studio
    labels: Tuple[str, ...]  # value.brushlabels (usually one)
    height: int  # original_height
    width: int  # original_width
    rle: bytes  # value.rle as bytes
    from_name: str = ""
    to_name: str = ""
    version: Optional[float] = None
    updated_at: Optional[float] = None

    @property
    def label(self) -> str:
        """The first label ("" for an unlabelled region)."""
        return self.labels[0] if self.labels else ""

    @property
    def mask(self) -> np.ndarray:
        """The decoded mask, (height, width) bool and read-only (shared through ``MASK_CACHE``).

        Raises ValueError if the RLE is corrupt (the store only keeps RLE that decodes).
        """
        return MASK_CACHE.decode(self.rle, self.height, self.width)


def validate_region_size(region: Exemplar, height: int, width: int, reference: str = "the image") -> None:
    """Raise ValueError, with a message to log, when ``region`` is not (height, width).

    ``reference`` names where that size comes from, for the message.
    """
    if (region.height, region.width) != (int(height), int(width)):
        raise ValueError(
            f"brush region {region.region_id!r} of {region.source} is {region.width}x{region.height}"
            f" (original_width x original_height) but {reference} is {int(width)}x{int(height)}; region rejected"
        )


def check_region(region: Exemplar, height: int, width: int, reference: str = "the image") -> None:
    """Raise ValueError if ``region`` is not (height, width) or its RLE does not decode."""
    validate_region_size(region, height, width, reference)
    try:
        MASK_CACHE.decode(region.rle, int(height), int(width))  # also warms the cache for the next reads
    except ValueError as exc:
        raise ValueError(
            f"brush region {region.region_id!r} of {region.source} has corrupt RLE ({exc}); region skipped"
        ) from None


@dataclass
class TaskRegions:
    """What one payload says about the accepted regions of one task.

    ``sources`` maps each source the payload shows to its current brush regions (an empty list
    when it holds none, e.g. a cancelled annotation). Stored sources whose kind is in
    ``complete_kinds`` but that are missing from ``sources`` are removed by ``sync_task``.
    """

    project: str
    task_id: str
    sources: Dict[str, List[Exemplar]] = field(default_factory=dict)
    versions: Dict[str, Optional[float]] = field(default_factory=dict)  # source -> Label Studio updated_at
    complete_kinds: frozenset = frozenset()
    problems: List[str] = field(default_factory=list)  # malformed results that were skipped (already logged)

    def on_image(self, image: str, label: Optional[str] = None) -> List["Exemplar"]:
        """The regions on the Image tag ``image`` with ``label`` (None: any), in payload order.

        The one reading of a task's regions: click selection, recall and the store all use it.
        """
        return [region for regions in self.sources.values() for region in regions
                if region.to_name == image and (label is None or label in region.labels)]


@dataclass
class WebhookChanges:
    """What a webhook changes: regions of some tasks, deleted annotations, deleted tasks."""

    action: str
    project: str
    tasks: List[TaskRegions] = field(default_factory=list)
    deleted_sources: List[str] = field(default_factory=list)  # "annotation:<id>"
    deleted_tasks: List[str] = field(default_factory=list)


def _brush_region(result: Any, source: str, version: Optional[float], index: int) -> Optional[Exemplar]:
    """The Exemplar of one result, None if it is not an RLE brush region; ValueError if malformed."""
    if not isinstance(result, Mapping) or result.get("type") != "brushlabels":
        return None
    value = result.get("value")
    if not isinstance(value, Mapping) or value.get("format") != "rle":
        return None
    region_id = result.get("id") or f"#{index}"
    if not isinstance(region_id, (str, int)) or isinstance(region_id, bool) or len(str(region_id)) > MAX_ID_CHARS:
        raise ValueError(f"brush region #{index} of {source} has an unusable id; region skipped")
    region_id = str(region_id)
    where = f"brush region {region_id!r} of {source}"
    width, height = result.get("original_width"), result.get("original_height")
    for name, size in (("original_width", width), ("original_height", height)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{where} has no valid {name} ({str(size)[:40]!r}); region skipped")
    if width * height > MAX_REGION_PIXELS:
        raise ValueError(f"{where} declares {width} x {height} pixels, more than {MAX_REGION_PIXELS}; region skipped")
    rle = value.get("rle")
    try:
        rle_bytes = bytes(rle) if isinstance(rle, list) else None
    except (TypeError, ValueError):  # not integers 0..255
        rle_bytes = None
    if rle_bytes is None:
        raise ValueError(f"{where} has corrupt RLE (value.rle must be a list of integers 0..255); region skipped")
    try:
        declared = rle_value_count(rle_bytes)
    except ValueError as exc:
        raise ValueError(f"{where} has corrupt RLE ({exc}); region skipped") from None
    if declared != width * height * CHANNELS:  # checked here, so no decode is ever sized by a wrong header
        raise ValueError(f"{where} has an RLE whose header declares {declared} values, but original_width x "
                         f"original_height = {width} x {height} needs {width * height * CHANNELS}; region skipped")
    labels = value.get("brushlabels") or []
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{where} has invalid value.brushlabels {labels!r}; region skipped")
    return Exemplar(
        source=source, region_id=region_id, labels=tuple(labels), height=height, width=width, rle=rle_bytes,
        from_name=str(result.get("from_name") or ""), to_name=str(result.get("to_name") or ""), version=version,
    )


def entry_regions(entry: Mapping[str, Any], source: str, version: Optional[float],
                  problems: List[str]) -> List[Exemplar]:
    """The brush regions of one annotation or draft, by region id (the last one wins on a repeated id)."""
    results = entry.get("result")
    if results is None:
        return []
    if not isinstance(results, list):
        problems.append(f"{source} has a result that is not a list; its regions are skipped")
        return []
    regions: Dict[str, Exemplar] = {}
    for index, result in enumerate(results):
        try:
            region = _brush_region(result, source, version, index)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if region is not None:
            regions[region.region_id] = region
    return list(regions.values())


def _log_problems(problems: Sequence[str], project: str, task_id: str) -> None:
    for problem in problems:
        log.warning("exemplar region skipped: %s", problem, extra={"project": project, "task": task_id})


def regions_from_task(task: Mapping[str, Any], project: Any = None) -> TaskRegions:
    """The accepted brush regions of a task as ``/predict`` sends it (a full snapshot).

    Reads ``task["annotations"]`` (all users; ``was_cancelled`` ones are ignored) and
    ``task["drafts"]`` (the requesting user's). A draft of an existing annotation
    (``draft["annotation"]``) is that annotation being edited, so it replaces the annotation's
    regions unless the annotation is newer. ``project`` defaults to ``task["project"]``.
    Malformed regions are logged and listed in ``problems``; a task without an id raises ValueError.
    """
    if not isinstance(task, Mapping):
        raise ValueError(f"task must be an object, got {type(task).__name__}")
    update = TaskRegions(
        project=project_key(task.get("project") if project is None else project),
        task_id=task_key(task.get("id")),
        complete_kinds=frozenset(SOURCE_KINDS),
    )
    annotations = _entries(task.get("annotations"), "annotations", update.problems)
    drafts = _entries(task.get("drafts"), "drafts", update.problems)
    annotation_versions = {entry.get("id"): _timestamp(entry.get("updated_at")) for entry in annotations
                           if _is_entry_id(entry.get("id"))}
    edited = set()  # annotations whose newer draft is what the user sees
    for entry in drafts:
        target, draft_version = entry.get("annotation"), _timestamp(entry.get("updated_at"))
        if _is_entry_id(target) and target in annotation_versions:
            annotation_version = annotation_versions[target]
            if draft_version is None or annotation_version is None or draft_version >= annotation_version:
                edited.add(target)
    for kind, entries in ((ANNOTATION, annotations), (DRAFT, drafts)):
        for entry in entries:
            if kind == ANNOTATION and (entry.get("was_cancelled") or (_is_entry_id(entry.get("id"))
                                                                      and entry.get("id") in edited)):
                continue
            try:
                source = source_key(kind, entry.get("id"))
            except ValueError as exc:
                update.problems.append(f"a task {kind} has no usable id ({exc}); its regions are skipped")
                continue
            version = _timestamp(entry.get("updated_at"))
            update.sources[source] = entry_regions(entry, source, version, update.problems)
            update.versions[source] = version
    _log_problems(update.problems, update.project, update.task_id)
    return update


def _is_entry_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _entries(value: Any, name: str, problems: List[str]) -> List[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"task {name} is not a list; ignored")
        return []
    return [entry for entry in value if isinstance(entry, Mapping)]


def _annotation_update(annotation: Mapping[str, Any], project: str, task_id: Any) -> TaskRegions:
    """The regions of one annotation from a webhook (it replaces that source; drafts are dropped)."""
    update = TaskRegions(
        project=project,
        task_id=task_key(task_id),
        # Submitting turns a draft into the annotation and Label Studio deletes the draft; the
        # webhook does not say which one, so drafts are dropped until the next /predict lists them.
        complete_kinds=frozenset({DRAFT}),
    )
    source = source_key(ANNOTATION, annotation.get("id"))
    version = _timestamp(annotation.get("updated_at"))
    cancelled = bool(annotation.get("was_cancelled"))
    update.sources[source] = [] if cancelled else entry_regions(annotation, source, version, update.problems)
    update.versions[source] = version
    _log_problems(update.problems, update.project, update.task_id)
    return update


def regions_from_webhook(payload: Mapping[str, Any]) -> Optional[WebhookChanges]:
    """The exemplar changes a Label Studio webhook carries; None for actions that do not concern them.

    ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: ``{"annotation": {...}, "task": {...}}``;
    ``ANNOTATIONS_CREATED``: the same with lists; ``ANNOTATIONS_DELETED``: ``{"annotations": [{"id"}]}``;
    ``TASKS_DELETED``: ``{"tasks": [{"id"}]}``. A payload missing what its action needs raises ValueError.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"webhook payload must be an object, got {type(payload).__name__}")
    action = payload.get("action")
    if action not in WEBHOOK_EVENTS:
        return None
    project_value = payload.get("project")
    if project_value is None and action in ANNOTATION_EVENTS:
        task = payload.get("task")
        task = task[0] if isinstance(task, list) and task else task
        project_value = task.get("project") if isinstance(task, Mapping) else None
    changes = WebhookChanges(action=action, project=project_key(project_value))
    if action in ANNOTATION_EVENTS:
        annotations = payload.get("annotation")
        annotations = annotations if isinstance(annotations, list) else [annotations]
        tasks = payload.get("task")
        tasks = tasks if isinstance(tasks, list) else [tasks]
        task_ids = [t.get("id") for t in tasks if isinstance(t, Mapping)]
        for annotation in annotations:
            if not isinstance(annotation, Mapping):
                raise ValueError(f"{action} webhook has no annotation object")
            task_id = annotation.get("task")
            if isinstance(task_id, Mapping):
                task_id = task_id.get("id")
            if task_id is None and len(task_ids) == 1:
                task_id = task_ids[0]
            changes.tasks.append(_annotation_update(annotation, changes.project, task_id))
    else:
        key, kind = ("annotations", ANNOTATION) if action == "ANNOTATIONS_DELETED" else ("tasks", None)
        items = payload.get(key)
        if not isinstance(items, list):
            raise ValueError(f"{action} webhook must list the deleted {key} under {key!r}")
        for item in items:
            entry_id = item.get("id") if isinstance(item, Mapping) else None
            if kind is None:
                changes.deleted_tasks.append(task_key(entry_id))
            else:
                changes.deleted_sources.append(source_key(kind, entry_id))
    return changes


# --- sync planning (shared by every store) -------------------------------------------------------


@dataclass(frozen=True)
class StoredSource:
    version: Optional[float]
    digest: bytes


@dataclass
class SourceWrite:
    source: str
    version: Optional[float]
    digest: bytes
    regions: List[Exemplar]  # the valid ones


@dataclass
class SyncPlan:
    """What ``sync_task`` writes, computed from the stored state before the write transaction."""

    size: Optional[Size]  # the reference (height, width) the regions were checked against
    resize: bool  # the image size changed: regions of another size must go
    writes: List[SourceWrite] = field(default_factory=list)
    rejected: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    stale: List[str] = field(default_factory=list)


@dataclass
class SyncReport:
    """What one ``sync_task`` did."""

    written: List[str] = field(default_factory=list)  # sources replaced
    removed: List[str] = field(default_factory=list)  # sources removed (deleted, cancelled, no longer listed)
    unchanged: List[str] = field(default_factory=list)
    stale: List[str] = field(default_factory=list)  # older than the stored version: ignored
    rejected: List[str] = field(default_factory=list)  # messages of regions skipped (corrupt RLE, wrong size)
    evicted: int = 0  # tasks evicted to respect max_tasks


def source_digest(regions: Sequence[Exemplar]) -> bytes:
    """16-byte digest of a source's regions as received (a re-sent source is recognised without decoding)."""
    digest = hashlib.blake2b(digest_size=16)
    for region in sorted(regions, key=lambda r: r.region_id):
        header = json.dumps([region.region_id, region.labels, region.from_name, region.to_name,
                             region.height, region.width, len(region.rle)])
        digest.update(header.encode())
        digest.update(region.rle)
    return digest.digest()


def checked_size(image_size: Optional[Sequence[int]]) -> Optional[Size]:
    """``image_size`` as a (height, width) of ints; ValueError unless both are positive."""
    if image_size is None:
        return None
    size = (int(image_size[0]), int(image_size[1]))
    if min(size) < 1:
        raise ValueError(f"image_size must be a positive (height, width), got {size}")
    return size


def _most_common_size(update: TaskRegions) -> Optional[Size]:
    sizes = Counter((r.height, r.width) for regions in update.sources.values() for r in regions)
    return sizes.most_common(1)[0][0] if sizes else None


def _is_stale(version: Optional[float], stored: Optional[float]) -> bool:
    return version is not None and stored is not None and version < stored


def plan_sync(update: TaskRegions, stored_size: Optional[Size], stored: Mapping[str, StoredSource],
              image_size: Optional[Size] = None) -> SyncPlan:
    """Check the sources of ``update`` that differ from ``stored`` and keep their valid regions.

    The reference size is ``image_size`` when the caller knows the image, else the size stored
    for the task, else the most common size among the incoming regions. Regions of another
    size or with corrupt RLE are logged and left out. Removals are decided at write time.
    """
    if image_size is not None:
        size, reference = image_size, "the image"
    elif stored_size is not None:
        size, reference = stored_size, "the task's stored regions"
    else:
        size, reference = _most_common_size(update), "most of the task's regions"
    resize = image_size is not None and stored_size is not None and tuple(image_size) != tuple(stored_size)
    plan = SyncPlan(size=size, resize=resize)
    for source, regions in update.sources.items():
        version = update.versions.get(source)
        digest = source_digest(regions)
        old = stored.get(source)
        if old is not None and not resize:
            if _is_stale(version, old.version):
                plan.stale.append(source)
                continue
            if old.digest == digest:
                plan.unchanged.append(source)
                continue
        valid = []
        for region in regions:
            try:
                check_region(region, *size, reference)
            except ValueError as exc:
                plan.rejected.append(str(exc))
                continue
            valid.append(region)
        plan.writes.append(SourceWrite(source, version, digest, valid))
    _log_problems(plan.rejected, update.project, update.task_id)
    return plan


@dataclass
class SyncChanges:
    """What a store writes for one ``sync_task``, decided against the state read in its transaction."""

    report: SyncReport
    writes: List[SourceWrite]  # sources to replace
    removals: List[str]  # stored sources the update no longer lists (of its complete kinds)
    exists: bool  # the task is stored already
    nothing_accepted: bool  # a new task without any region: store nothing (it would only evict useful ones)


def resolve_sync(update: TaskRegions, plan: SyncPlan, touched_at: Optional[float],
                 stored: Mapping[str, StoredSource]) -> SyncChanges:
    """The writes and removals of ``plan`` against ``stored`` as read inside the write transaction
    (another worker may have written since the plan was made: stale or equal sources are skipped)."""
    report = SyncReport(unchanged=list(plan.unchanged), stale=list(plan.stale), rejected=list(plan.rejected))
    writes = []
    for write in plan.writes:
        old = stored.get(write.source)
        if old is not None and not plan.resize:
            if _is_stale(write.version, old.version):
                report.stale.append(write.source)
                continue
            if old.digest == write.digest:
                report.unchanged.append(write.source)
                continue
        writes.append(write)
    removals = [source for source in stored
                if source_kind(source) in update.complete_kinds and source not in update.sources]
    exists = touched_at is not None
    nothing_accepted = not exists and not any(write.regions for write in writes)
    return SyncChanges(report, writes, removals, exists, nothing_accepted)


def nothing_to_write(update: TaskRegions, plan: SyncPlan, touched_at: Optional[float],
                     stored: Mapping[str, StoredSource]) -> bool:
    """True for the common re-sent snapshot: no change, no removal, task age fresh enough."""
    if plan.writes or plan.resize:
        return False
    if any(source_kind(s) in update.complete_kinds and s not in update.sources for s in stored):
        return False
    return touched_at is None or time.time() - touched_at < TOUCH_INTERVAL_S


# --- the interface -------------------------------------------------------------------------------


class StoreError(Exception):
    """The store's database cannot be read or written (locked too long, unreachable, full)."""


def store_errors(method):
    """Report the store's own database errors (its ``backend_errors``) as ``StoreError``."""
    @functools.wraps(method)
    def translated(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except self.backend_errors as exc:
            raise StoreError(f"{type(self).__name__}: {exc}") from exc

    return translated


class ExemplarStore(abc.ABC):
    """Accepted brush regions per (project, task), shared by all workers of the backend.

    Bad input raises ValueError; a database that fails raises ``StoreError``.
    """

    backend_errors: Tuple[type, ...] = ()  # what the database raises, turned into StoreError

    @abc.abstractmethod
    def sync_task(self, update: TaskRegions, image_size: Optional[Size] = None) -> SyncReport:
        """Replace the stored regions of every source in ``update`` (removing those of its
        ``complete_kinds`` it no longer lists). ``image_size`` (height, width) is the task's image
        when the caller has it. Bad regions are logged and reported, never raised."""

    @abc.abstractmethod
    def accepted_masks(self, project: Any, task_id: Any) -> List[Exemplar]:
        """Every accepted region of the task, all labels, one per region id (the newest version)."""

    @abc.abstractmethod
    def remove_source(self, project: Any, source: str, task_id: Any = None) -> int:
        """Forget a source (in every task of the project when ``task_id`` is None); returns regions removed."""

    @abc.abstractmethod
    def remove_task(self, project: Any, task_id: Any) -> int:
        """Forget a task; returns regions removed."""

    @abc.abstractmethod
    def stats(self) -> Dict[str, Any]:
        """Counts for logs and /health: tasks, sources, regions, rle_bytes, max_tasks."""

    def close(self) -> None:
        """Release what the calling thread holds."""

    def exemplars(self, project: Any, task_id: Any, label: str) -> List[Exemplar]:
        """The accepted regions of the task that carry ``label``."""
        return [region for region in self.accepted_masks(project, task_id) if label in region.labels]

    def apply_webhook(self, changes: WebhookChanges) -> List[SyncReport]:
        """Apply what ``regions_from_webhook`` read; returns one report per synced task."""
        reports = [self.sync_task(update) for update in changes.tasks]
        for source in changes.deleted_sources:
            self.remove_source(changes.project, source)
        for task_id in changes.deleted_tasks:
            self.remove_task(changes.project, task_id)
        return reports


# --- SQLite --------------------------------------------------------------------------------------

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE tasks (
    project TEXT NOT NULL, task_id TEXT NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (project, task_id)
) WITHOUT ROWID;
CREATE INDEX tasks_by_age ON tasks (updated_at);
CREATE TABLE sources (
    project TEXT NOT NULL, task_id TEXT NOT NULL, source TEXT NOT NULL,
    version REAL, digest BLOB NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (project, task_id, source)
) WITHOUT ROWID;
CREATE INDEX sources_by_name ON sources (project, source);
CREATE TABLE regions (
    project TEXT NOT NULL, task_id TEXT NOT NULL, source TEXT NOT NULL, position INTEGER NOT NULL,
    region_id TEXT NOT NULL, labels TEXT NOT NULL, from_name TEXT NOT NULL, to_name TEXT NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL, rle BLOB NOT NULL,
    version REAL, updated_at REAL NOT NULL,
    PRIMARY KEY (project, task_id, source, region_id)
);
"""
_TABLES = ("regions", "sources", "tasks")

# Connections opened before a fork: the child must neither use nor close them (closing could
# disturb the parent's locks), so they are parked here for the life of the process.
_INHERITED_CONNECTIONS: List[sqlite3.Connection] = []


class SQLiteExemplarStore(ExemplarStore):
    """The embedded store: one SQLite file (e.g. ``MODEL_DIR/exemplars.sqlite3``).

    Safe with several gunicorn workers and threads: WAL journal, a busy timeout, one connection
    per thread and process (a connection inherited through fork is never reused), writes in
    short ``BEGIN IMMEDIATE`` transactions (RLE checks run before the lock is taken). Keeps at
    most ``max_tasks`` tasks, evicting the least recently updated. The file must be on a local
    disk (WAL does not work over network file systems).
    """

    backend_errors = (sqlite3.Error,)

    def __init__(self, path: os.PathLike | str, max_tasks: int = 2000, busy_timeout_s: float = 30.0) -> None:
        if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1:
            raise ValueError(f"max_tasks must be a positive integer, got {max_tasks!r}")
        if not busy_timeout_s > 0:
            raise ValueError(f"busy_timeout_s must be positive, got {busy_timeout_s!r}")
        self.path = Path(path)
        self.max_tasks = max_tasks
        self.busy_timeout_s = float(busy_timeout_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        connection = self._connect()
        try:
            self._init_schema(connection)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prepare the exemplar store {self.path}: {exc}") from exc
        finally:
            connection.close()  # nothing stays open in a process that may fork workers

    # connections

    def _connect(self) -> sqlite3.Connection:
        """A new autocommit connection (transactions are explicit) in WAL mode."""
        try:
            connection = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None)
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")  # a power cut may lose the last commits, never corrupt
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the exemplar store {self.path}: {exc}") from exc
        return connection

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, reopened in a process forked after it was made."""
        connection, pid = getattr(self._local, "connection", None), getattr(self._local, "pid", None)
        if connection is not None and pid == os.getpid():
            return connection
        if connection is not None:
            _INHERITED_CONNECTIONS.append(connection)
        connection = self._connect()
        self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def _init_schema(self, connection: sqlite3.Connection) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                if version != 0:
                    log.warning("exemplar store %s has schema %s, expected %s: starting it afresh",
                                self.path, version, SCHEMA_VERSION)
                for table in _TABLES:
                    connection.execute(f"DROP TABLE IF EXISTS {table}")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            connection.close()
        self._local.connection = None

    # reads

    @staticmethod
    def _read_task(connection: sqlite3.Connection, project: str, task_id: str
                   ) -> Tuple[Optional[Size], Optional[float], Dict[str, StoredSource]]:
        row = connection.execute("SELECT height, width, updated_at FROM tasks WHERE project = ? AND task_id = ?",
                                 (project, task_id)).fetchone()
        if row is None:
            return None, None, {}
        stored = {
            source: StoredSource(version, digest)
            for source, version, digest in connection.execute(
                "SELECT source, version, digest FROM sources WHERE project = ? AND task_id = ?", (project, task_id))
        }
        return (row[0], row[1]), row[2], stored

    @store_errors
    def accepted_masks(self, project: Any, task_id: Any) -> List[Exemplar]:
        rows = self._connection().execute(
            "SELECT source, region_id, labels, height, width, rle, from_name, to_name, version, updated_at"
            " FROM regions WHERE project = ? AND task_id = ?"
            " ORDER BY COALESCE(version, -1) DESC, updated_at DESC, source, position",
            (project_key(project), task_key(task_id)),
        ).fetchall()
        newest: Dict[str, Exemplar] = {}
        for source, region_id, labels, height, width, rle, from_name, to_name, version, updated_at in rows:
            if region_id not in newest:  # the same region in a draft and in its annotation: keep the newest
                newest[region_id] = Exemplar(source, region_id, tuple(json.loads(labels)), height, width, bytes(rle),
                                             from_name, to_name, version, updated_at)
        return list(newest.values())

    @store_errors
    def stats(self) -> Dict[str, Any]:
        connection = self._connection()
        tasks = connection.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
        sources = connection.execute("SELECT COUNT(*) FROM sources").fetchone()[0]
        regions, rle_bytes = connection.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(rle)), 0) FROM regions").fetchone()
        return {"backend": "sqlite", "path": str(self.path), "tasks": tasks, "sources": sources,
                "regions": regions, "rle_bytes": rle_bytes, "max_tasks": self.max_tasks}

    # writes

    @store_errors
    def sync_task(self, update: TaskRegions, image_size: Optional[Size] = None) -> SyncReport:
        image_size = checked_size(image_size)
        project, task_id = project_key(update.project), task_key(update.task_id)
        # Decode the RLE of changed sources before taking the write lock, and write if the task's
        # size is still the one they were checked against (another worker may change it: rare).
        size, touched_at, stored = self._read_task(self._connection(), project, task_id)
        for _ in range(3):
            plan = plan_sync(update, size, stored, image_size)
            if nothing_to_write(update, plan, touched_at, stored):
                return SyncReport(unchanged=plan.unchanged, stale=plan.stale, rejected=plan.rejected)
            with self._write() as connection:
                current_size, touched_at, stored = self._read_task(connection, project, task_id)
                if current_size == size:
                    return self._apply(connection, update, project, task_id, plan, touched_at, stored)
            size = current_size
        with self._write() as connection:  # still racing: check inside the lock
            size, touched_at, stored = self._read_task(connection, project, task_id)
            plan = plan_sync(update, size, stored, image_size)
            return self._apply(connection, update, project, task_id, plan, touched_at, stored)

    def _apply(self, connection: sqlite3.Connection, update: TaskRegions, project: str, task_id: str,
               plan: SyncPlan, touched_at: Optional[float], stored: Mapping[str, StoredSource]) -> SyncReport:
        changes = resolve_sync(update, plan, touched_at, stored)
        report, writes, removals, exists = changes.report, changes.writes, changes.removals, changes.exists
        if changes.nothing_accepted:
            return report
        now = time.time()
        key = (project, task_id)
        if plan.size is not None:
            connection.execute(
                "INSERT INTO tasks (project, task_id, height, width, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (project, task_id) DO UPDATE SET height = excluded.height, width = excluded.width,"
                " updated_at = excluded.updated_at"
                " WHERE tasks.updated_at < excluded.updated_at - ? OR tasks.height != excluded.height"
                " OR tasks.width != excluded.width OR ?",
                (*key, *plan.size, now, TOUCH_INTERVAL_S, bool(writes or removals)),
            )
        if plan.resize:
            connection.execute("DELETE FROM regions WHERE project = ? AND task_id = ? AND (height != ? OR width != ?)",
                               (*key, *plan.size))
        for write in writes:
            connection.execute("DELETE FROM regions WHERE project = ? AND task_id = ? AND source = ?",
                               (*key, write.source))
            connection.executemany(
                "INSERT INTO regions (project, task_id, source, position, region_id, labels, from_name, to_name,"
                " height, width, rle, version, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*key, write.source, position, r.region_id, json.dumps(list(r.labels)), r.from_name, r.to_name,
                  r.height, r.width, r.rle, write.version, now) for position, r in enumerate(write.regions)],
            )
            connection.execute(
                "INSERT OR REPLACE INTO sources (project, task_id, source, version, digest, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)", (*key, write.source, write.version, write.digest, now))
            report.written.append(write.source)
        for source in removals:
            self._delete_source(connection, project, source, task_id)
            report.removed.append(source)
        if not connection.execute("SELECT 1 FROM regions WHERE project = ? AND task_id = ? LIMIT 1", key).fetchone():
            self._delete_task(connection, project, task_id)  # no accepted region left
        elif not exists:
            report.evicted = self._evict(connection, keep=key)
        return report

    def _evict(self, connection: sqlite3.Connection, keep: Tuple[str, str]) -> int:
        count = connection.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
        if count <= self.max_tasks:
            return 0
        victims = connection.execute(
            "SELECT project, task_id FROM tasks WHERE NOT (project = ? AND task_id = ?) ORDER BY updated_at LIMIT ?",
            (*keep, count - self.max_tasks),
        ).fetchall()
        for project, task_id in victims:
            self._delete_task(connection, project, task_id)
        if victims:
            log.info("exemplar store evicted %d task(s) to keep at most %d", len(victims), self.max_tasks)
        return len(victims)

    @staticmethod
    def _delete_task(connection: sqlite3.Connection, project: str, task_id: str) -> int:
        removed = connection.execute("DELETE FROM regions WHERE project = ? AND task_id = ?",
                                     (project, task_id)).rowcount
        connection.execute("DELETE FROM sources WHERE project = ? AND task_id = ?", (project, task_id))
        connection.execute("DELETE FROM tasks WHERE project = ? AND task_id = ?", (project, task_id))
        return removed

    @staticmethod
    def _delete_source(connection: sqlite3.Connection, project: str, source: str, task_id: str) -> int:
        removed = connection.execute("DELETE FROM regions WHERE project = ? AND task_id = ? AND source = ?",
                                     (project, task_id, source)).rowcount
        connection.execute("DELETE FROM sources WHERE project = ? AND task_id = ? AND source = ?",
                           (project, task_id, source))
        return removed

    @store_errors
    def remove_source(self, project: Any, source: str, task_id: Any = None) -> int:
        project = project_key(project)
        task_id = None if task_id is None else task_key(task_id)
        with self._write() as connection:
            task_ids = [task_id] if task_id is not None else [row[0] for row in connection.execute(
                "SELECT task_id FROM sources WHERE project = ? AND source = ?", (project, source))]
            removed = 0
            for tid in task_ids:
                removed += self._delete_source(connection, project, source, tid)
                if not connection.execute("SELECT 1 FROM regions WHERE project = ? AND task_id = ? LIMIT 1",
                                          (project, tid)).fetchone():
                    self._delete_task(connection, project, tid)
        return removed

    @store_errors
    def remove_task(self, project: Any, task_id: Any) -> int:
        with self._write() as connection:
            return self._delete_task(connection, project_key(project), task_key(task_id))
