"""Per-task state: an LRU bounded by bytes, and session creation that runs once per key."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from backend.click_selection import ClickHistory, TrackedObject
from backend.sessions import ByteLRU, SessionStore, TaskSession


class Blob:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def test_lru_evicts_least_recently_used_until_the_bytes_fit():
    lru = ByteLRU(100, size_of=lambda v: v.nbytes)
    for key in "abc":
        lru.put(key, Blob(40))  # c's arrival evicts a (120 > 100)
    assert "a" not in lru and "b" in lru and "c" in lru
    assert lru.total_bytes == 80
    lru.get("b")  # b is now the most recent: d evicts c
    lru.put("d", Blob(40))
    assert set(k for k in "abcd" if k in lru) == {"b", "d"}
    assert lru.total_bytes == 80


def test_lru_keeps_the_newest_entry_even_when_it_alone_exceeds_the_budget():
    lru = ByteLRU(100, size_of=lambda v: v.nbytes)
    lru.put("small", Blob(10))
    lru.put("huge", Blob(500))
    assert "huge" in lru and "small" not in lru and len(lru) == 1


def test_lru_remeasure_follows_in_place_growth():
    lru = ByteLRU(100, size_of=lambda v: v.nbytes)
    a, b = Blob(30), Blob(30)
    lru.put("a", a)
    lru.put("b", b)
    a.nbytes = 90  # a grew while in use: re-measuring it makes it most recent and evicts b
    lru.remeasure("a")
    assert "a" in lru and "b" not in lru and lru.total_bytes == 90
    lru.remeasure("gone")  # no-op for evicted keys
    assert lru.pop("a") is a and lru.total_bytes == 0


def test_lru_rejects_a_negative_budget():
    with pytest.raises(ValueError, match="max_bytes"):
        ByteLRU(-1, size_of=len)


class FakeState:
    def __init__(self, nbytes: int, last_output=None):
        self._own = nbytes
        self.last_output = last_output

    @property
    def nbytes(self) -> int:
        return self._own + (self.last_output.nbytes if self.last_output is not None else 0)


def test_session_counts_a_probability_map_shared_with_the_image_state_once():
    prob = np.zeros((10, 10), np.float32)  # 400 bytes
    session = TaskSession(image_state=FakeState(1000, last_output=prob))
    history = ClickHistory(current=TrackedObject(0, "id", [], prob=prob))
    session.histories[("image", "Object")] = history
    assert session.nbytes == 1400
    history.current.prob = np.zeros((10, 10), np.float32)  # now a distinct array
    assert session.nbytes == 1800


def test_session_store_creates_each_session_once_under_concurrency():
    store = SessionStore(max_bytes=10_000)
    calls = []

    def create():
        calls.append(1)
        time.sleep(0.05)
        return TaskSession(image_state=FakeState(100))

    results = []
    threads = [threading.Thread(target=lambda: results.append(store.get_or_create(("p", 1, "u"), create)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(r is results[0] for r in results)


def test_session_store_stays_within_its_byte_budget():
    store = SessionStore(max_bytes=250)
    for task in range(10):
        store.get_or_create(("p", task, "u"), lambda: TaskSession(image_state=FakeState(100)))
    assert store.cache.total_bytes <= 250 and len(store.cache) == 2


@pytest.mark.slow
def test_the_memory_benchmark_keeps_the_session_cache_within_its_budget(monkeypatch):
    """`backend.benchmark --memory-tasks`: one line per 50 tasks; the cache never exceeds SESSION_CACHE_BYTES."""
    from backend.benchmark import memory_run

    monkeypatch.setenv("SESSION_CACHE_BYTES", str(4 << 20))
    lines = memory_run((160, 120), tasks=12, every=5)
    assert lines[0].startswith("tasks") and [int(line.split()[0]) for line in lines[1:]] == [5, 10, 12]
    for line in lines[1:]:
        cache_mib, budget = float(line.split()[3]), line.split()[4]
        assert budget == "(4)" and cache_mib <= 4
        assert 0 < int(line.split()[-1]) < 12  # older sessions were evicted


@pytest.mark.slow
def test_the_hostile_payload_benchmark_prints_each_case_within_200_mib():
    """`backend.benchmark --hostile`: every case answered (2xx or 4xx), none above 200 MiB of extra peak."""
    from backend.benchmark import hostile_run

    lines = hostile_run((160, 120))
    assert lines[0].startswith("request") and len(lines) == 7
    for line in lines[1:]:
        status, peak_mib = int(line.split()[-3]), float(line.split()[-1])
        assert 200 <= status < 500 and peak_mib < 200, line
    decoded = next(line for line in lines if "(decoded)" in line)
    assert float(decoded.split()[-1]) > 0.05  # the measure sees a real decode (160 x 120 RGBA)
