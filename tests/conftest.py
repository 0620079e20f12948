import os
import shutil
import socket
import subprocess
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


def pytest_collection_modifyitems(config, items):
    """Tests that ask for ``shared_dir`` / a Redis carry the ``shared`` / ``redis`` marker (``-m "not shared"``)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "shared_dir" in names:
            item.add_marker(pytest.mark.shared)
        if "redis_server" in names:
            item.add_marker(pytest.mark.redis)
