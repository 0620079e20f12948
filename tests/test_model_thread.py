"""Every model call of a process runs on one thread (one OpenMP team for torch)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend.model_thread import ModelThread


def test_calls_from_many_threads_run_on_one_thread_and_raise_their_errors():
    model_thread = ModelThread()
    with ThreadPoolExecutor(4) as callers:
        names = set(callers.map(lambda _: model_thread.run(lambda: threading.current_thread().name), range(16)))
    assert len(names) == 1 and names.pop().startswith("model_")
    with pytest.raises(ValueError, match="bad clicks"):
        model_thread.run(lambda: (_ for _ in ()).throw(ValueError("bad clicks")))
    # a model call that makes another runs it in place instead of waiting for itself
    assert model_thread.run(lambda: model_thread.run(lambda: 7)) == 7
    # ... but another instance's model thread is another thread
    other = ModelThread()
    assert model_thread.run(lambda: other.run(lambda: threading.get_ident())) != model_thread.run(threading.get_ident)
