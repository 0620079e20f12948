import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LS_CLICKSEG_SHARED", REPO.parent / "shared"))
REDIS_REQUIRED = os.environ.get("LS_CLICKSEG_REDIS_REQUIRED") == "1"  # .ci/run: the Redis tests must not skip


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared, or skip when this machine has no copy of it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def backend_processes(tmp_path):
    """``start(env) -> base URL``: a gunicorn backend process on a free loopback port, up and answering
    /health; all of them are stopped at the end of the test (their logs: ``tmp_path/backend-<port>.log``)."""
    import requests

    started = []

    def start(env: dict, timeout: float = 180.0) -> str:
        port = free_port()
        log_path = tmp_path / f"backend-{port}.log"
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **env}
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
        server.terminate()
    for server in started:
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def pytest_collection_modifyitems(config, items):
    """Tests that ask for ``shared_dir`` / a Redis carry the ``shared`` / ``redis`` marker (``-m "not shared"``)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "shared_dir" in names:
            item.add_marker(pytest.mark.shared)
        if "redis_server" in names:
            item.add_marker(pytest.mark.redis)
