"""Session fixtures of the end-to-end tests: a real Label Studio 1.23.2 and our backend, both on loopback.

- ``label_studio``: installed into ``.venv-labelstudio/`` (override: LS_CLICKSEG_LABEL_STUDIO_VENV) on
  first use, started with SQLite in a temporary directory; user and legacy token from
  LABEL_STUDIO_USERNAME / LABEL_STUDIO_PASSWORD / LABEL_STUDIO_USER_TOKEN (test defaults), plus a
  personal access token created through the API after logging in.
- ``backend`` (LABEL_STUDIO_API_KEY = the legacy token) and ``backend_pat`` (= the personal access
  token): ``gunicorn -c backend/gunicorn.conf.py backend.wsgi:app`` on the embedded default model
  (override: LS_CLICKSEG_E2E_CHECKPOINT), each with its own MODEL_DIR.

Logs go to ``artifacts/e2e/`` (screenshots and the latency table too). Every process stops at the
end of the session, also on failure. When Label Studio cannot be installed (no network), the tests
skip with the reason; with LS_CLICKSEG_E2E_REQUIRED=1 (CI) they fail instead.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from e2e_harness import (
    REPO,
    Backend,
    Credentials,
    HarnessUnavailable,
    LabelStudio,
    ensure_label_studio,
    start_backend,
    start_label_studio,
    stop_process,
    unavailable,
)
from e2e_helpers import model_is_trained

LABEL_STUDIO_VENV = Path(os.environ.get("LS_CLICKSEG_LABEL_STUDIO_VENV") or REPO / ".venv-labelstudio")
ARTIFACTS = REPO / "artifacts" / "e2e"
# A fine-tuning job in the tests: a few steps on a few small images, evaluated on one object.
FIT_ENV = {"FIT_STEPS": "2", "FIT_BATCH_SIZE": "1", "FIT_EVAL_MAX_OBJECTS": "1", "FIT_EVAL_MAX_CLICKS": "2",
           "TRAIN_THREADS": "1"}


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """``artifacts/e2e/``, emptied at the start of the session."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def label_studio(artifacts, tmp_path_factory) -> Iterator[LabelStudio]:
    try:
        executable = ensure_label_studio(LABEL_STUDIO_VENV, artifacts / "labelstudio-install.log")
    except HarnessUnavailable as exc:
        unavailable(str(exc))
    data_dir = tmp_path_factory.mktemp("labelstudio-data")
    ls = start_label_studio(executable, data_dir, artifacts / "labelstudio.log", Credentials.from_env())
    try:
        yield ls
    finally:
        stop_process(ls.process)


@pytest.fixture(scope="session")
def e2e_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint served: LS_CLICKSEG_E2E_CHECKPOINT, else the embedded default model."""
    from model.predictor import DEFAULT_CHECKPOINT

    path = Path(os.environ.get("LS_CLICKSEG_E2E_CHECKPOINT") or DEFAULT_CHECKPOINT)
    if not path.is_file():
        pytest.fail(f"no checkpoint to serve at {path}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def model_trained(e2e_checkpoint) -> bool:
    return model_is_trained(e2e_checkpoint)


def _backend(name: str, api_key: str, label_studio: LabelStudio, checkpoint: Path, artifacts: Path,
             tmp_path_factory) -> Iterator[Backend]:
    model_dir = tmp_path_factory.mktemp(f"model-dir-{name}")
    backend = start_backend(name, label_studio.url, api_key, model_dir, checkpoint, artifacts / f"backend-{name}.log",
                            extra_env=FIT_ENV)
    try:
        yield backend
    finally:
        stop_process(backend.process)


@pytest.fixture(scope="session")
def backend(label_studio, e2e_checkpoint, artifacts, tmp_path_factory) -> Iterator[Backend]:
    """Our backend downloading images with the legacy token."""
    yield from _backend("legacy", label_studio.legacy_token, label_studio, e2e_checkpoint, artifacts, tmp_path_factory)


@pytest.fixture(scope="session")
def backend_pat(label_studio, e2e_checkpoint, artifacts, tmp_path_factory) -> Iterator[Backend]:
    """Our backend downloading images with the personal access token."""
    yield from _backend("pat", label_studio.personal_access_token, label_studio, e2e_checkpoint, artifacts,
                        tmp_path_factory)
