"""Per-task interactive state in an LRU bounded by bytes, not by entries.

A ``TaskSession`` holds what one task's clicks need again: the encoded image
(``ImageState``: working copy + cached features) and, per prompt group
(image + label), the click history with the current object's probability map and
recall proposals. Its size is re-measured after every request, and the least recently
used sessions are dropped until the total fits ``SESSION_CACHE_BYTES``. The most
recent session is always kept, even when it alone exceeds the budget.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterable, Optional, Tuple

import numpy as np

from .click_selection import ClickHistory, GroupKey

SessionKey = Tuple[str, int, str]  # (project, task id, image URL)


def distinct_nbytes(arrays: Iterable[Optional[np.ndarray]]) -> int:
    """Bytes of the distinct arrays in ``arrays`` (an array shared by two owners counts once)."""
    seen: Dict[int, int] = {}
    for a in arrays:
        if a is not None:
            seen[id(a)] = a.nbytes
    return sum(seen.values())


@dataclass
class TaskSession:
    """State of one task's image; use it only while holding ``lock``."""

    image_state: object  # model.predictor.ImageState
    histories: Dict[GroupKey, ClickHistory] = field(default_factory=dict)
    last_group: Optional[GroupKey] = None  # the (image, label) of the last interactive request
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        state = self.image_state
        # ImageState.nbytes counts its last output map, which is usually also a history's
        # current map: count that array once.
        last_output = getattr(state, "last_output", None)
        own = state.nbytes - (last_output.nbytes if last_output is not None else 0)
        maps = [last_output] + [h.current.prob for h in self.histories.values() if h.current is not None]
        regions = [m for h in self.histories.values() for m in h.region_masks.values()]
        proposals = sum(h.proposals.nbytes for h in self.histories.values() if h.proposals is not None)
        return own + distinct_nbytes(maps) + distinct_nbytes(regions) + proposals


class ByteLRU:
    """Thread-safe LRU map whose total ``size_of(value)`` stays within ``max_bytes``."""

    def __init__(self, max_bytes: int, size_of: Callable[[object], int]):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: "OrderedDict[Hashable, Tuple[object, int]]" = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def total_bytes(self) -> int:
        return self._total

    def get(self, key: Hashable) -> Optional[object]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: object) -> None:
        """Insert or replace ``key`` as most recently used, then evict down to the budget."""
        size = self._size_of(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._total -= old[1]
            self._entries[key] = (value, size)
            self._total += size
            self._evict()

    def remeasure(self, key: Hashable) -> None:
        """Re-read the size of ``key``'s value after it changed in place (no-op if evicted)."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return
        size = self._size_of(entry[0])
        with self._lock:
            current = self._entries.get(key)
            if current is None or current[0] is not entry[0]:
                return
            self._total += size - current[1]
            self._entries[key] = (current[0], size)
            self._entries.move_to_end(key)
            self._evict()

    def pop(self, key: Hashable) -> Optional[object]:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self._total -= entry[1]
            return entry[0]

    def _evict(self) -> None:
        while self._total > self.max_bytes and len(self._entries) > 1:
            _, (_, size) = self._entries.popitem(last=False)
            self._total -= size


class SessionStore:
    """``TaskSession`` per (project, task, image URL), created at most once at a time per key."""

    def __init__(self, max_bytes: int):
        self._cache = ByteLRU(max_bytes, size_of=lambda session: session.nbytes)
        self._creating: Dict[SessionKey, threading.Lock] = {}
        self._creating_lock = threading.Lock()

    @property
    def cache(self) -> ByteLRU:
        return self._cache

    def get_or_create(self, key: SessionKey, create: Callable[[], TaskSession]) -> TaskSession:
        """The cached session for ``key``, or ``create()``'s (run once even under concurrent requests)."""
        session = self._cache.get(key)
        if session is not None:
            return session
        with self._creating_lock:
            key_lock = self._creating.setdefault(key, threading.Lock())
        try:
            with key_lock:
                session = self._cache.get(key)
                if session is None:
                    session = create()
                    self._cache.put(key, session)
                return session
        finally:
            with self._creating_lock:
                self._creating.pop(key, None)

    def remeasure(self, key: SessionKey) -> None:
        self._cache.remeasure(key)
