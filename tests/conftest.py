import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from support import FakeLabelStudioApi, annotation, brush_annotation, free_port, keypoint, serve, stop_process, texture_scene

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LS_CLICKSEG_SHARED", REPO.parent / "shared"))
REDIS_REQUIRED = os.environ.get("LS_CLICKSEG_REDIS_REQUIRED") == "1"  # .ci/run: the Redis tests must not skip


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared, or skip when this machine has no copy of it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> str:
    """A private ``redis-server`` on loopback for the whole session (no persistence): its base URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (Debian package redis-server)"
        if REDIS_REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--databases", "64", "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


@pytest.fixture
def redis_url(redis_server) -> str:
    """An empty database of the session's Redis for this test."""
    import redis

    url = f"{redis_server}/0"
    redis.Redis.from_url(url).flushall()
    return url


TEXTURE_SIZE, TEXTURED_TASKS = 128, 12  # test_fit_proof's numbers depend on these


@pytest.fixture(scope="module")
def texture_project():
    """A fake Label Studio API on loopback (``.url``): project 1 with TEXTURED_TASKS tasks of one
    texture class at TEXTURE_SIZE px, each with a brush annotation, then a cancelled annotation, a
    keypoint-only annotation and an unannotated task."""
    fake = FakeLabelStudioApi()
    fake.add_project()
    for seed in range(TEXTURED_TASKS):
        image, mask = texture_scene(seed, TEXTURE_SIZE)
        fake.add_task(image, [brush_annotation([mask])])
    image, mask = texture_scene(100, TEXTURE_SIZE)
    fake.add_task(image, [brush_annotation([mask], cancelled=True)])  # skipped: cancelled
    fake.add_task(texture_scene(101, TEXTURE_SIZE)[0],
                  [annotation([keypoint(50, 50, width=TEXTURE_SIZE, height=TEXTURE_SIZE)])])  # no brush
    fake.add_task(texture_scene(102, TEXTURE_SIZE)[0])  # not annotated
    with serve(fake) as url:
        fake.url = url
        yield fake


def _wait_for(condition, timeout: float = 120.0, what: str = "the condition"):
    """The first true value of ``condition()``, polled every 0.2 s; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def wait_for():
    """``wait_for(condition, timeout=120, what=...)``: poll until ``condition()`` is true, return its value."""
    return _wait_for


@pytest.fixture
def backend_processes(tmp_path):
    """``start(env) -> base URL``: a gunicorn backend process on a free loopback port, up and answering
    /health; all of them are stopped at the end of the test (their logs: ``tmp_path/backend-<port>.log``)."""
    started = []

    def start(env: dict, timeout: float = 180.0, unset: tuple = ()) -> str:
        """``env`` over this process's environment, without the variables named in ``unset``."""
        port = free_port()
        log_path = tmp_path / f"backend-{port}.log"
        full_env = {**{k: v for k, v in os.environ.items() if k not in unset}, "HOST": "127.0.0.1", "PORT": str(port),
                    **env}
        with open(log_path, "w") as log:
            server = subprocess.Popen([str(Path(sys.executable).with_name("gunicorn")), "-c",
                                       "backend/gunicorn.conf.py", "backend.wsgi:app"],
                                      cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        started.append(server)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    return base
            except (requests.ConnectionError, requests.Timeout):
                pass
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"gunicorn did not start within {timeout} s: {log_path.read_text()}"
            time.sleep(0.3)

    yield start
    for server in started:
        stop_process(server)


def pytest_collection_modifyitems(config, items):
    """Tests that ask for ``shared_dir`` / a Redis carry the ``shared`` / ``redis`` marker (``-m "not shared"``)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "shared_dir" in names:
            item.add_marker(pytest.mark.shared)
        if "redis_server" in names:
            item.add_marker(pytest.mark.redis)
