"""State that several backend hosts share through Redis (``REDIS_URL``): exemplars, job leases, job status.

Keys (all under ``KEY_PREFIX``; ``<p>`` a project id, ``<t>`` a task id, both digits):

    ex:task:<p>:<t>       hash: ``size`` "h,w", ``touched`` (Unix time), and per source
                          ``src:<source>`` the JSON of its version, digest and regions (RLE base64)
    ex:ages               sorted set "<p>:<t>" -> touched: the least recently updated go first
    ex:src:<p>:<source>   set of the task ids holding that source (deleting an annotation)
    ex:stats              hash: sources, regions, rle_bytes (kept exact inside each transaction)
    job:<p>:status        the JSON status of the project's last training job
    job:<p>:lease         the token of the job that may run; expires unless its holder renews it
    job:<p>:count         annotations since the last job (TRAIN_EVERY_N_ANNOTATIONS)

Writes are optimistic transactions (WATCH / MULTI / EXEC) on the keys they read, so writers on
several hosts never lose an update; RLE is decoded and checked before the transaction.
"""
from __future__ import annotations

import base64
import functools
import json
import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import redis
from rq import Queue

from . import exemplars as exemplar_module
from .errors import BackendError
from .exemplars import (Exemplar, ExemplarStore, Size, StoredSource, StoreError, SyncReport, TaskRegions, checked_size,
                        nothing_to_write, plan_sync, project_key, resolve_sync, store_errors, task_key)
from .job_state import ACTIVE_STATES, FAILED, QUEUED, JobLock, JobRecords, now_iso

log = logging.getLogger(__name__)

KEY_PREFIX = "ls-clickseg"
MAX_ATTEMPTS = 100  # optimistic transactions retried at most this often before the error is raised
SOURCE_FIELD = b"src:"


def connect(url: str) -> redis.Redis:
    """A client for ``url`` (bytes in and out); connections are made on first use, again after a fork."""
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)


def redacted(url: str) -> str:
    """``url`` without its password, for logs and /health."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit(parts._replace(netloc=netloc))


def transaction(client: redis.Redis, keys: List[str], body: Callable[[Any], Any]) -> Any:
    """Run ``body(pipe)`` with ``keys`` watched until its MULTI/EXEC goes through; returns its result.

    ``body`` reads through ``pipe`` (immediate mode), then calls ``pipe.multi()`` and queues its writes,
    or returns without ``multi()`` when there is nothing to write.
    """
    for attempt in range(MAX_ATTEMPTS):
        with client.pipeline() as pipe:
            try:
                pipe.watch(*keys)
                result = body(pipe)
                if pipe.explicit_transaction:
                    pipe.execute()
                return result
            except redis.WatchError:
                time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))  # another writer won: read again
    raise redis.WatchError(f"{MAX_ATTEMPTS} concurrent writers in a row changed {keys}")


# --- the exemplar store ----------------------------------------------------------------------------


@dataclass
class _StoredTask:
    """One task as read from its hash."""

    size: Optional[Size]
    touched: Optional[float]
    sources: Dict[str, Dict[str, Any]]  # source -> {"version", "digest", "updated_at", "regions": [...]}

    @property
    def stored(self) -> Dict[str, StoredSource]:
        return {source: StoredSource(data["version"], bytes.fromhex(data["digest"]))
                for source, data in self.sources.items()}

    def totals(self) -> Tuple[int, int, int]:
        """(sources, regions, rle bytes)."""
        regions = [r for data in self.sources.values() for r in data["regions"]]
        return len(self.sources), len(regions), sum(r["rle_bytes"] for r in regions)


def _read_task(pipe: Any, key: str) -> _StoredTask:
    fields = pipe.hgetall(key)
    if not fields:
        return _StoredTask(None, None, {})
    height, width = (int(v) for v in fields[b"size"].split(b","))
    sources = {name[len(SOURCE_FIELD):].decode(): json.loads(value)
               for name, value in fields.items() if name.startswith(SOURCE_FIELD)}
    return _StoredTask((height, width), float(fields[b"touched"]), sources)


def _region_json(region: Exemplar) -> Dict[str, Any]:
    return {"region_id": region.region_id, "labels": list(region.labels), "height": region.height,
            "width": region.width, "rle": base64.b64encode(region.rle).decode(), "rle_bytes": len(region.rle),
            "from_name": region.from_name, "to_name": region.to_name}


class RedisExemplarStore(ExemplarStore):
    """The exemplar store of several backend hosts (``EXEMPLAR_STORE=redis``), same semantics as SQLite's.

    Keeps at most ``max_tasks`` tasks, evicting the least recently updated. Safe under concurrent
    writers on any number of hosts, processes and threads (see the module docstring).
    """

    backend_errors = (redis.RedisError,)

    def __init__(self, url: str, max_tasks: int = 2000, prefix: str = KEY_PREFIX) -> None:
        if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1:
            raise ValueError(f"max_tasks must be a positive integer, got {max_tasks!r}")
        self.url = url
        self.max_tasks = max_tasks
        self.prefix = prefix
        try:
            self.client = connect(url)
            self.client.ping()  # a wrong URL or a Redis that is down is reported at once
        except (ValueError, redis.RedisError) as exc:
            raise StoreError(f"cannot reach the exemplar store at {redacted(url)}: {exc}") from exc
        self._ages = f"{prefix}:ex:ages"
        self._stats = f"{prefix}:ex:stats"

    def _task(self, project: str, task_id: str) -> str:
        return f"{self.prefix}:ex:task:{project}:{task_id}"

    def _source_index(self, project: str, source: str) -> str:
        return f"{self.prefix}:ex:src:{project}:{source}"

    # reads

    @store_errors
    def accepted_masks(self, project: Any, task_id: Any) -> List[Exemplar]:
        task = _read_task(self.client, self._task(project_key(project), task_key(task_id)))
        rows = []
        for source, data in task.sources.items():
            for position, region in enumerate(data["regions"]):
                rows.append(((-(data["version"] if data["version"] is not None else -1), -data["updated_at"],
                              source, position), source, data, region))
        newest: Dict[str, Exemplar] = {}
        for _, source, data, region in sorted(rows, key=lambda row: row[0]):
            if region["region_id"] not in newest:  # the same region in a draft and in its annotation: the newest
                newest[region["region_id"]] = Exemplar(
                    source, region["region_id"], tuple(region["labels"]), region["height"], region["width"],
                    base64.b64decode(region["rle"]), region["from_name"], region["to_name"], data["version"],
                    data["updated_at"])
        return list(newest.values())

    @store_errors
    def stats(self) -> Dict[str, Any]:
        counts = {k.decode(): int(v) for k, v in self.client.hgetall(self._stats).items()}
        return {"backend": "redis", "url": redacted(self.url), "tasks": self.client.zcard(self._ages),
                "sources": counts.get("sources", 0), "regions": counts.get("regions", 0),
                "rle_bytes": counts.get("rle_bytes", 0), "max_tasks": self.max_tasks}

    # writes

    def _write_task(self, pipe: Any, project: str, task_id: str, old: _StoredTask, new: _StoredTask) -> None:
        """Queue the replacement of ``old`` by ``new`` (``new.sources`` empty: the task goes)."""
        key, member = self._task(project, task_id), f"{project}:{task_id}"
        pipe.delete(key)
        for source in set(old.sources) - set(new.sources):
            pipe.srem(self._source_index(project, source), task_id)
        if new.sources:
            fields = {"size": f"{new.size[0]},{new.size[1]}", "touched": repr(new.touched)}
            fields.update({f"src:{source}": json.dumps(data) for source, data in new.sources.items()})
            pipe.hset(key, mapping=fields)
            pipe.zadd(self._ages, {member: new.touched})
            for source in new.sources:
                pipe.sadd(self._source_index(project, source), task_id)
        else:
            pipe.zrem(self._ages, member)
        for name, before, after in zip(("sources", "regions", "rle_bytes"), old.totals(), new.totals()):
            if after != before:
                pipe.hincrby(self._stats, name, after - before)

    @store_errors
    def sync_task(self, update: TaskRegions, image_size: Optional[Size] = None) -> SyncReport:
        image_size = checked_size(image_size)
        project, task_id = project_key(update.project), task_key(update.task_id)
        key = self._task(project, task_id)
        plans: Dict[Any, Any] = {}  # (stored size, stored digests) -> plan: RLE is checked once per state

        def body(pipe: Any) -> Tuple[SyncReport, bool]:
            old = _read_task(pipe, key)
            stored = old.stored
            state = (old.size, tuple(sorted((s, v.version, v.digest) for s, v in stored.items())))
            plan = plans.get(state) or plans.setdefault(state, plan_sync(update, old.size, stored, image_size))
            if nothing_to_write(update, plan, old.touched, stored):
                return SyncReport(unchanged=plan.unchanged, stale=plan.stale, rejected=plan.rejected), False
            changes = resolve_sync(update, plan, old.touched, stored)
            report = changes.report
            if changes.nothing_accepted:
                return report, False
            now = time.time()
            sources = {source: dict(data) for source, data in old.sources.items()}
            if plan.resize:  # the image changed size: regions of the old size go
                for data in sources.values():
                    data["regions"] = [r for r in data["regions"] if (r["height"], r["width"]) == plan.size]
            for write in changes.writes:
                sources[write.source] = {"version": write.version, "digest": write.digest.hex(), "updated_at": now,
                                         "regions": [_region_json(r) for r in write.regions]}
                report.written.append(write.source)
            for source in changes.removals:
                sources.pop(source, None)
                report.removed.append(source)
            if not any(data["regions"] for data in sources.values()):
                sources = {}  # no accepted region left: the task goes
            size = plan.size if plan.size is not None else old.size
            touched = now if (old.touched is None or changes.writes or changes.removals or size != old.size
                              or now - old.touched >= exemplar_module.TOUCH_INTERVAL_S) else old.touched
            pipe.multi()
            self._write_task(pipe, project, task_id, old, _StoredTask(size, touched, sources))
            return report, bool(sources) and not changes.exists

        report, created = transaction(self.client, [key], body)
        if created:
            report.evicted = self._evict(keep=f"{project}:{task_id}")
        return report

    def _evict(self, keep: str) -> int:
        excess = self.client.zcard(self._ages) - self.max_tasks
        if excess <= 0:
            return 0
        evicted = 0
        for member, score in self.client.zrange(self._ages, 0, excess, withscores=True):
            if evicted >= excess:
                break
            member = member.decode()
            if member == keep:
                continue
            project, task_id = member.split(":", 1)

            def body(pipe: Any, member: str = member, score: float = score, project: str = project,
                     task_id: str = task_id) -> int:
                if pipe.zscore(self._ages, member) != score:
                    return 0  # used again (or evicted by another host) since it was picked
                old = _read_task(pipe, self._task(project, task_id))
                pipe.multi()
                self._write_task(pipe, project, task_id, old, _StoredTask(None, None, {}))
                return 1

            evicted += transaction(self.client, [self._ages, self._task(project, task_id)], body)
        if evicted:
            log.info("exemplar store evicted %d task(s) to keep at most %d", evicted, self.max_tasks)
        return evicted

    def _remove(self, project: str, task_id: str, source: Optional[str]) -> int:
        """Remove one source of the task (None: the whole task); returns regions removed."""
        def body(pipe: Any) -> int:
            old = _read_task(pipe, self._task(project, task_id))
            if source is not None and source not in old.sources:
                return 0
            sources = {} if source is None else {s: d for s, d in old.sources.items() if s != source}
            if not any(data["regions"] for data in sources.values()):
                sources = {}
            removed = old.totals()[1] - _StoredTask(old.size, old.touched, sources).totals()[1]
            pipe.multi()
            self._write_task(pipe, project, task_id, old, _StoredTask(old.size, old.touched, sources))
            return removed

        return transaction(self.client, [self._task(project, task_id)], body)

    @store_errors
    def remove_source(self, project: Any, source: str, task_id: Any = None) -> int:
        project = project_key(project)
        if task_id is not None:
            task_ids = [task_key(task_id)]
        else:
            task_ids = sorted(t.decode() for t in self.client.smembers(self._source_index(project, source)))
        return sum(self._remove(project, tid, source) for tid in task_ids)

    @store_errors
    def remove_task(self, project: Any, task_id: Any) -> int:
        return self._remove(project_key(project), task_key(task_id), None)

    def close(self) -> None:
        self.client.close()



# --- training jobs -------------------------------------------------------------------------------

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_WRITE_IF_HELD = ("if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[2], ARGV[2]) return 1 end"
                  " return 0")


def redis_unavailable_is_503(method):
    """A Redis that cannot be reached answers HTTP 503 with what to check, not a traceback."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise BackendError(f"the job records in Redis ({redacted(self.url)}) cannot be reached: {exc}; "
                               "check REDIS_URL and that Redis runs", status=503) from exc

    return guarded


class RedisLease(JobLock):
    """A project's right to run a job: a Redis key holding the job's token, with an expiry.

    The starting server takes it for FIT_QUEUE_TIMEOUT (the job waits in the queue); the job
    process adopts it with the token and renews it every third of JOB_LEASE_SECONDS. When the
    holder dies, nobody renews it: it expires and the next job can start.
    """

    def __init__(self, client: redis.Redis, url: str, key: str, ttl_s: float, token: Optional[str] = None):
        self.client, self.url, self.key, self.ttl_ms = client, url, key, int(ttl_s * 1000)
        self.token = token
        self._stop = threading.Event()

    @redis_unavailable_is_503
    def try_acquire(self) -> bool:
        token = secrets.token_hex(16)
        if self.client.set(self.key, token, nx=True, px=self.ttl_ms):
            self.token = token
            return True
        return False

    def renew(self) -> bool:
        """Extend the lease by its TTL; False when it is no longer this token's."""
        return bool(self.client.eval(_RENEW, 1, self.key, self.token or "", self.ttl_ms))

    def keep_alive(self, on_lost: Callable[[str], None]) -> threading.Thread:
        """Renew every third of the TTL in a daemon thread; ``on_lost(reason)`` once if it is lost."""
        def loop() -> None:
            while not self._stop.wait(self.ttl_ms / 3000):
                try:
                    held = self.renew()
                except redis.RedisError as exc:  # Redis away for a moment: nobody else can take it either
                    log.warning("cannot renew the training lease: %s", exc, extra={"lease": self.key})
                    continue
                if not held:
                    on_lost(f"the job's lease {self.key} expired or was taken by another job")
                    return

        thread = threading.Thread(target=loop, daemon=True, name="lease-keep-alive")
        thread.start()
        return thread

    def release(self) -> None:
        self._stop.set()
        if self.token is not None:
            try:
                self.client.eval(_RELEASE, 1, self.key, self.token)
            except redis.RedisError as exc:  # it expires by itself
                log.warning("cannot release the training lease: %s", exc, extra={"lease": self.key})
            self.token = None

    def close(self) -> None:
        self._stop.set()  # handed over: the job renews it from here on


class RedisJobRecords(JobRecords):
    """Several hosts: the lock is a ``RedisLease``, the status and the annotation count Redis keys,
    and jobs go to the RQ queue FIT_QUEUE."""

    def __init__(self, model_dir: Any, scale: Any, prefix: str = KEY_PREFIX):
        super().__init__(model_dir)
        self.scale = scale
        self.url = scale.redis_url
        self.prefix = prefix
        self.client = connect(scale.redis_url)

    def _key(self, project: str, name: str) -> str:
        return f"{self.prefix}:job:{project}:{name}"

    def lock(self, project: str) -> RedisLease:
        """The lease as the starting server takes it: for as long as the job may wait in the queue."""
        return RedisLease(self.client, self.url, self._key(project, "lease"), self.scale.queue_timeout_s)

    def adopt(self, project: str, token: str) -> Optional[RedisLease]:
        """The job process's lease, renewed for JOB_LEASE_SECONDS; None if ``token`` no longer holds it."""
        lease = RedisLease(self.client, self.url, self._key(project, "lease"), self.scale.lease_seconds, token=token)
        return lease if lease.renew() else None

    @redis_unavailable_is_503
    def read(self, project: str) -> Optional[Dict[str, Any]]:
        raw = self.client.get(self._key(project, "status"))
        return json.loads(raw) if raw else None

    @redis_unavailable_is_503
    def write(self, project: str, job: Mapping[str, Any], holder: JobLock) -> bool:
        token = getattr(holder, "token", None) or ""
        return bool(self.client.eval(_WRITE_IF_HELD, 2, self._key(project, "lease"), self._key(project, "status"),
                                     token, json.dumps(job, default=str)))

    @redis_unavailable_is_503
    def settle(self, project: str, exit_code: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """A job 'queued' or 'running' whose lease expired is marked failed (atomically: a new job's
        lease or status appearing meanwhile cancels it)."""
        status, lease = self._key(project, "status"), self._key(project, "lease")

        def body(pipe: Any) -> Optional[Dict[str, Any]]:
            raw = pipe.get(status)
            job = json.loads(raw) if raw else None
            if job is None or job.get("state") not in ACTIVE_STATES or pipe.exists(lease):
                return job
            if job["state"] == QUEUED:
                job = {**job, "state": FAILED, "finished_at": now_iso(), "updated_at": now_iso(),
                       "error": f"no training worker took the job within FIT_QUEUE_TIMEOUT={self.scale.queue_timeout_s} s: "
                                f"start `python -m backend.fit_worker --queue` on a machine that shares MODEL_DIR "
                                f"and REDIS_URL (queue {self.scale.queue!r}); the served model is unchanged"}
            else:
                job = self.died(job, f"stopped renewing its lease (killed, crashed, or its machine went away; "
                                     f"JOB_LEASE_SECONDS={self.scale.lease_seconds})")
            pipe.multi()
            pipe.set(status, json.dumps(job, default=str))
            return job

        return transaction(self.client, [status, lease], body)

    @redis_unavailable_is_503
    def count_annotations(self, project: str, new: int, due: Callable[[int], bool]) -> bool:
        key = self._key(project, "count")
        count = self.client.incrby(key, new)
        if due(count):
            self.client.decrby(key, count)  # what other hosts counted meanwhile stays
            return True
        return False

    @redis_unavailable_is_503
    def enqueue(self, project: str, job_id: str, lease: RedisLease, setup_token: Optional[str]) -> None:
        """Queue the job for a training worker (``backend.fit_worker.run_queued_job``)."""
        Queue(self.scale.queue, connection=self.client).enqueue_call(
            "backend.fit_worker.run_queued_job", args=(project, job_id, lease.token),
            kwargs={"setup_token": setup_token}, timeout=-1, job_id=job_id, result_ttl=7 * 86400,
            failure_ttl=7 * 86400, description=f"fine-tune project {project} (job {job_id})")
