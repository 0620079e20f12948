"""Processes of the end-to-end tests: a real Label Studio 1.23.2 and our backend under gunicorn,
both on 127.0.0.1, plus a small client for Label Studio's API (no tests here).

    venv = ensure_label_studio(REPO / ".venv-labelstudio")      # installs label-studio==1.23.2 once
    ls = start_label_studio(venv, data_dir, log_path, Credentials.from_env())
    backend = start_backend("legacy", ls.url, ls.legacy_token, model_dir, checkpoint, log_path)
    ...
    stop_process(backend.process); stop_process(ls.process)

Label Studio runs in its own virtual environment (it pins Django, DRF, the SDK and more, which
must not leak into ours) with SQLite in a temporary data directory, off the network and allowed
to reach a loopback backend (see ``label_studio_environment``).
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import requests

REPO = Path(__file__).resolve().parents[2]
LABEL_STUDIO_VERSION = "1.23.2"
INSTALL_TIMEOUT_S = 1800
LABEL_STUDIO_START_TIMEOUT_S = 420  # the first start applies every migration: ~20 s idle, minutes on a busy 2-core box
BACKEND_START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 20

# Our environment must not configure Label Studio by accident: it reads LABEL_STUDIO_<X>,
# HEARTEX_<X> and plain <X> for many names (HOST becomes its public hostname, PORT its port).
_DROPPED_FOR_LABEL_STUDIO = ("HOST", "PORT", "LOG_LEVEL", "DEBUG", "PYTHONPATH", "VIRTUAL_ENV", "SECRET_KEY",
                             "USERNAME", "PASSWORD", "USER_TOKEN")
_DROPPED_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "DATABASE_", "SENTRY_", "POSTGRE", "REDIS")
# Our backend reads these; the tests set the ones they need.
_BACKEND_VARIABLES = ("MODEL_DIR", "CHECKPOINT", "DEVICE", "CFR_STEPS", "WORKERS", "THREADS", "LOG_LEVEL", "HOST",
                      "PORT", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "SESSION_CACHE_BYTES", "LABEL_STUDIO_URL",
                      "LABEL_STUDIO_API_KEY", "LOCAL_FILES_DOCUMENT_ROOT", "ALLOWED_IMAGE_HOSTS", "MAX_IMAGE_PIXELS",
                      "MAX_IMAGE_BYTES", "EXEMPLAR_MAX_TASKS", "TRAIN_THREADS", "TRAIN_EVERY_N_ANNOTATIONS")


REQUIRED = os.environ.get("LS_CLICKSEG_E2E_REQUIRED", "").strip().lower() in ("1", "true", "yes")


class HarnessUnavailable(RuntimeError):
    """Label Studio (or a browser) cannot be provided on this machine: the tests skip with this reason."""


def unavailable(reason: str) -> None:
    """Skip the test (or, with LS_CLICKSEG_E2E_REQUIRED=1, as in CI, fail it): the harness cannot run here."""
    import pytest

    if REQUIRED:
        pytest.fail(f"{reason} (LS_CLICKSEG_E2E_REQUIRED=1: the end-to-end tests must run)", pytrace=False)
    pytest.skip(reason)


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def start_process(command: List[str], env: Mapping[str, str], log_path: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start ``command`` in its own process group, stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group started by ``start_process``, SIGKILL it after ``timeout``."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever the group still holds (forked workers)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait(timeout)


def wait_until_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float, what: str) -> Dict[str, Any]:
    """Poll ``GET url`` until it answers 200 with JSON; fail early when the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready; "
                               f"log {log_path}:\n{log_tail(log_path)}")
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return response.json()
            last = f"HTTP {response.status_code}"
        except (requests.RequestException, ValueError) as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s ({last}); log {log_path}:\n{log_tail(log_path)}")


# --- Label Studio installation ---------------------------------------------------------------------


def installed_label_studio_version(venv: Path) -> Optional[str]:
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    result = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
                            capture_output=True, text=True, timeout=60)
    return result.stdout.strip() if result.returncode == 0 else None


def ensure_label_studio(venv: Path, log_path: Path) -> Path:
    """The ``label-studio`` executable of ``venv``, after installing label-studio==1.23.2 there if needed.

    Raises HarnessUnavailable (with pip's last lines) when it cannot be installed, e.g. offline.
    """
    executable = venv / "bin" / "label-studio"
    if installed_label_studio_version(venv) == LABEL_STUDIO_VERSION and executable.is_file():
        return executable
    log_path.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--retries", "1",
         "--timeout", "30", f"label-studio=={LABEL_STUDIO_VERSION}"],
    ]
    with open(log_path, "ab") as log:
        for command in steps:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            try:
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise HarnessUnavailable(f"installing label-studio=={LABEL_STUDIO_VERSION} into {venv} took more than "
                                         f"{INSTALL_TIMEOUT_S} s; see {log_path}") from None
            if result.returncode != 0:
                raise HarnessUnavailable(f"cannot install label-studio=={LABEL_STUDIO_VERSION} into {venv} "
                                         f"(`{' '.join(command[-3:])}` exited {result.returncode}; no network to the "
                                         f"package registry?). Last lines of {log_path}:\n{log_tail(log_path, 8)}")
    if installed_label_studio_version(venv) != LABEL_STUDIO_VERSION:
        raise HarnessUnavailable(f"{venv} does not hold label-studio {LABEL_STUDIO_VERSION} after installing it; "
                                 f"see {log_path}")
    return executable


# --- Label Studio -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """The Label Studio user the harness creates (LABEL_STUDIO_USERNAME / _PASSWORD / _USER_TOKEN)."""

    username: str
    password: str
    legacy_token: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Credentials":
        credentials = cls(
            username=env.get("LABEL_STUDIO_USERNAME") or "e2e@example.com",
            password=env.get("LABEL_STUDIO_PASSWORD") or "e2e-Password-1234",
            legacy_token=env.get("LABEL_STUDIO_USER_TOKEN") or "e2e0123456789abcdef0123456789abcdef01234",
        )
        if len(credentials.legacy_token) <= 5:  # Label Studio silently ignores shorter tokens
            raise ValueError("LABEL_STUDIO_USER_TOKEN must be longer than 5 characters")
        return credentials


def label_studio_environment(data_dir: Path, credentials: Credentials, venv: Path) -> Dict[str, str]:
    """The environment of a Label Studio that stays off the network and may call a loopback backend."""
    env = {key: value for key, value in os.environ.items()
           if key not in _DROPPED_FOR_LABEL_STUDIO and not key.startswith(_DROPPED_PREFIXES)}
    env.update({
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),  # SQLite database, uploads, exports
        "LABEL_STUDIO_USERNAME": credentials.username,
        "LABEL_STUDIO_PASSWORD": credentials.password,
        "LABEL_STUDIO_USER_TOKEN": credentials.legacy_token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # read when the organisation is created (first start)
        "ML_BLOCK_LOCAL_IP": "false",  # otherwise a 127.0.0.1 backend is refused with 403
        "SSRF_PROTECTION_ENABLED": "false",  # otherwise the webhook Label Studio creates for the backend is skipped
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _jwt_expiry(token: str) -> float:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return float(claims["exp"])


@dataclass
class LabelStudio:
    """A running Label Studio and its user's two kinds of API key.

    ``api`` authenticates with the personal access token by default (exchanged for short-lived
    access tokens, cached), so it keeps working while legacy tokens are switched off.
    """

    url: str
    credentials: Credentials
    personal_access_token: str
    process: subprocess.Popen
    log_path: Path
    _access: Tuple[str, float] = ("", 0.0)
    _http: requests.Session = field(default_factory=requests.Session)

    @property
    def legacy_token(self) -> str:
        return self.credentials.legacy_token

    def access_token(self) -> str:
        token, refresh_after = self._access
        if time.time() >= refresh_after:
            response = self._http.post(f"{self.url}/api/token/refresh/", json={"refresh": self.personal_access_token},
                                       timeout=30)
            assert response.status_code == 200, f"refreshing the personal access token: {response.status_code} {response.text}"
            token = response.json()["access"]
            self._access = (token, _jwt_expiry(token) - 30)
        return token

    def auth_header(self, auth: Optional[str]) -> Dict[str, str]:
        if auth == "pat":
            return {"Authorization": f"Bearer {self.access_token()}"}
        if auth == "legacy":
            return {"Authorization": f"Token {self.legacy_token}"}
        if auth is None:
            return {}
        raise ValueError(f"auth must be 'pat', 'legacy' or None, got {auth!r}")

    def api(self, method: str, path: str, auth: Optional[str] = "pat", expect: Optional[Iterable[int]] = (200, 201),
            timeout: float = 120, **kwargs: Any) -> requests.Response:
        """``method path`` on Label Studio; asserts the status is in ``expect`` (None: any)."""
        headers = {**self.auth_header(auth), **kwargs.pop("headers", {})}
        response = self._http.request(method, f"{self.url}{path}", headers=headers, timeout=timeout, **kwargs)
        if expect is not None:
            assert response.status_code in tuple(expect), \
                f"{method} {path}: HTTP {response.status_code} {response.text[:2000]}"
        return response

    def set_legacy_tokens(self, enabled: bool) -> None:
        """Organization > Settings > Access Token Settings: legacy tokens on or off."""
        body = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": enabled}
        settings = self.api("POST", "/api/jwt/settings", json=body).json()
        assert settings.get("legacy_api_tokens_enabled") is enabled, settings


def browser_login(http: requests.Session, url: str, credentials: Credentials) -> None:
    """Log ``http`` in through Label Studio's login form (a session cookie, as a browser gets)."""
    http.get(f"{url}/user/login/", timeout=60).raise_for_status()
    response = http.post(f"{url}/user/login/", timeout=60, allow_redirects=False,
                         data={"email": credentials.username, "password": credentials.password,
                               "csrfmiddlewaretoken": http.cookies["csrftoken"]},
                         headers={"Referer": f"{url}/user/login/"})
    assert response.status_code == 302 and "login" not in response.headers.get("Location", ""), \
        f"logging in as {credentials.username} failed: HTTP {response.status_code} {response.text[:500]}"


def create_personal_access_token(url: str, credentials: Credentials) -> str:
    """Log in and ``POST /api/token/`` (Account & Settings > Personal Access Token > Create)."""
    http = requests.Session()
    browser_login(http, url, credentials)
    response = http.post(f"{url}/api/token/", timeout=60,
                         headers={"X-CSRFToken": http.cookies["csrftoken"], "Referer": url})
    assert response.status_code == 201, f"POST /api/token/: HTTP {response.status_code} {response.text[:500]}"
    return response.json()["token"]


def start_label_studio(executable: Path, data_dir: Path, log_path: Path, credentials: Credentials) -> LabelStudio:
    """Start Label Studio on a free loopback port and return it ready, with a personal access token.

    The caller must ``stop_process(ls.process)``; on a failure here the process is stopped already.
    """
    port = free_port()
    env = label_studio_environment(data_dir, credentials, executable.parent.parent)
    process = start_process([str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1",
                             "--port", str(port)], env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", process, log_path, LABEL_STUDIO_START_TIMEOUT_S, "Label Studio")
        whoami = requests.get(f"{url}/api/current-user/whoami", timeout=30,
                              headers={"Authorization": f"Token {credentials.legacy_token}"})
        assert whoami.status_code == 200 and whoami.json()["email"] == credentials.username, \
            f"the legacy token of {credentials.username} is refused: HTTP {whoami.status_code} {whoami.text[:300]}"
        label_studio = LabelStudio(url, credentials, create_personal_access_token(url, credentials), process, log_path)
        label_studio.set_legacy_tokens(True)  # already on when the organisation was created with the variable
    except BaseException:
        stop_process(process)
        raise
    return label_studio


# --- our backend --------------------------------------------------------------------------------------


def _control_socket_flag() -> List[str]:
    """gunicorn >= 25 opens a control socket at one fixed path per user: off, so backends can run side by side."""
    from gunicorn.config import KNOWN_SETTINGS

    known = any("--no-control-socket" in (setting.cli or ()) for setting in KNOWN_SETTINGS)
    return ["--no-control-socket"] if known else []


@dataclass
class Backend:
    name: str
    url: str
    model_dir: Path
    model_version: str
    process: subprocess.Popen
    log_path: Path

    def log_records(self) -> List[Dict[str, Any]]:
        """The JSON lines of the backend's log (other lines skipped)."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def requests_to(self, path: str) -> List[Dict[str, Any]]:
        """The backend's request log lines for ``path`` (method, status, ms)."""
        return [r for r in self.log_records() if r.get("message") == "request" and r.get("path") == path]


def start_backend(name: str, label_studio_url: str, api_key: str, model_dir: Path, checkpoint: Path, log_path: Path,
                  extra_env: Optional[Mapping[str, str]] = None) -> Backend:
    """Our backend under gunicorn on a free loopback port, the way ``scripts/serve.sh`` runs it."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in _BACKEND_VARIABLES}
    env.update({
        "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "1", "THREADS": "4", "DEVICE": "cpu", "LOG_LEVEL": "INFO",
        "MODEL_DIR": str(model_dir), "CHECKPOINT": str(checkpoint),
        "LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": api_key,
        **(extra_env or {}),
    })
    gunicorn = Path(sys.executable).with_name("gunicorn")
    process = start_process([str(gunicorn), "-c", "backend/gunicorn.conf.py", *_control_socket_flag(),
                             "backend.wsgi:app"], env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_until_healthy(f"{url}/health", process, log_path, BACKEND_START_TIMEOUT_S, f"backend {name!r}")
    except BaseException:
        stop_process(process)
        raise
    return Backend(name, url, model_dir, health["model_version"], process, log_path)
