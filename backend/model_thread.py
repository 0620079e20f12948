"""One thread per process for every model call.

torch's CPU kernels use OpenMP, which keeps a team of worker threads for each thread that calls
into it. Request threads (gunicorn ``THREADS``) and the recall warm-up each calling the model
would leave several teams on the same cores; libgomp then stops spinning and every click paid
≈ 40 % more (measured: 25 → 37 ms per forward at 640×480 once a second thread had run one op).
Running every call on one thread keeps a single team; calls were serialised anyway.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


class ModelThread:
    """Runs callables one at a time on this process's model thread (re-created after a fork)."""

    def __init__(self, name: str = "model"):
        self._name = name
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pid: Optional[int] = None
        self._lock = threading.Lock()
        self._on_it = threading.local()  # .active is True on this instance's model thread

    def _current(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
                self._pid = os.getpid()
            return self._executor

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> "Future[T]":
        def on_model_thread() -> T:
            self._on_it.active = True
            return fn(*args, **kwargs)

        return self._current().submit(on_model_thread)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the model thread; its result, or its exception re-raised.

        Called on the model thread itself (a model call that makes another), it runs in place
        instead of waiting for itself.
        """
        if getattr(self._on_it, "active", False):
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()
