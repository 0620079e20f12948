"""A project's annotated tasks from the Label Studio API, with ``label-studio-sdk`` 2.x.

    export = fetch_project(access_settings, project_id=1)   # ProjectExport(label_config, tasks)

Calls: ``GET /api/projects/<id>/`` (label config; fails early on a bad token or project), then
``GET /api/tasks/?project=<id>&fields=all&page=<n>&page_size=100`` until a page is empty or
answers 404 (the SDK's pager), and, for a task whose annotations come without their results,
``GET /api/tasks/<id>/annotations/``.

Credentials are tried in order: LABEL_STUDIO_API_KEY, then the token Label Studio sent to
``/setup``. The SDK's client handles both kinds: a legacy token is sent as ``Token <key>``; a
personal access token (a JWT refresh token) is exchanged at ``/api/token/refresh/`` for an
access token sent as ``Bearer``, refreshed when it expires (the SDK refuses an expired PAT at
construction). Every failure raises ``LabelStudioApiError`` with a message for the admin.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import httpx

from .images import ImageAccessSettings, looks_like_jwt

log = logging.getLogger(__name__)

PAGE_SIZE = 100
REQUEST_OPTIONS = {"max_retries": 1, "timeout": 60}

_TOKEN_HELP = (
    "Set LABEL_STUDIO_API_KEY to a token of a user who can open the project: a Personal Access Token "
    "(Account & Settings > Personal Access Token) or a legacy token (Label Studio 1.23 disables legacy tokens "
    "unless an admin enables them in Organization > Settings > Access Token Settings)."
)


class LabelStudioApiError(Exception):
    """Label Studio could not be reached or refused the request; the message says what to change."""


@dataclass
class ProjectExport:
    """What training needs of one project: its label config and its tasks with annotations (dicts)."""

    project: int
    title: str
    label_config: str
    tasks: List[Dict[str, Any]] = field(default_factory=list)
    tasks_seen: int = 0  # all tasks listed, annotated or not


def _credentials(settings: ImageAccessSettings, setup_token: Optional[str]) -> List[Tuple[str, str]]:
    found: List[Tuple[str, str]] = []
    for key, source in ((settings.api_key, "LABEL_STUDIO_API_KEY"), (setup_token, "the /setup access_token")):
        key = (key or "").strip()
        if key and key not in (k for k, _ in found):
            found.append((key, source))
    return found


def _detail(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        body = body.get("detail") or body
    text = str(body if body is not None else exc)
    return text if len(text) <= 300 else text[:300] + "..."


def _client(base_url: str, key: str):
    from label_studio_sdk.client import LabelStudio  # about 1 s to import; only fine-tuning talks to the API

    return LabelStudio(base_url=base_url, api_key=key, timeout=REQUEST_OPTIONS["timeout"])


def fetch_project(settings: ImageAccessSettings, project_id: int, setup_token: Optional[str] = None) -> ProjectExport:
    """The project's label config and every task that has annotations (annotations as dicts)."""
    from label_studio_sdk.core.api_error import ApiError  # with the client (see _client)

    base_url = settings.label_studio_url
    if not base_url:
        raise LabelStudioApiError("LABEL_STUDIO_URL is not set: the backend needs it to read the project's annotations")
    credentials = _credentials(settings, setup_token)
    if not credentials:
        raise LabelStudioApiError(f"no Label Studio token to read project {project_id} with. {_TOKEN_HELP}")
    refusals = []
    for key, source in credentials:
        kind = "personal access token" if looks_like_jwt(key) else "legacy token"
        try:
            client = _client(base_url, key)
            project = client.projects.get(id=project_id, request_options=REQUEST_OPTIONS)
        except ApiError as exc:
            if exc.status_code in (401, 403):
                refusals.append(f"{source} ({kind}): HTTP {exc.status_code} {_detail(exc)}")
                continue
            raise _api_error(exc, base_url, f"project {project_id}") from None
        except (httpx.HTTPError, ValueError) as exc:
            raise _transport_error(exc, base_url) from None
        return _fetch_tasks(client, project_id, project, base_url)
    raise LabelStudioApiError(
        f"Label Studio at {base_url} refused the token(s) ({'; '.join(refusals)}). {_TOKEN_HELP} "
        f"A 403 also means the token's user cannot open project {project_id}."
    )


def _fetch_tasks(client, project_id: int, project, base_url: str) -> ProjectExport:
    from label_studio_sdk.core.api_error import ApiError  # with the client (see _client)

    export = ProjectExport(project=project_id, title=str(getattr(project, "title", "") or ""),
                           label_config=str(getattr(project, "label_config", "") or ""))
    try:
        for task in client.tasks.list(project=project_id, fields="all", page_size=PAGE_SIZE,
                                      request_options=REQUEST_OPTIONS):
            export.tasks_seen += 1
            data = task.dict() if hasattr(task, "dict") else dict(task)
            annotations = data.get("annotations") or []
            if not annotations and not data.get("total_annotations"):
                continue
            if not all(isinstance(a, dict) and "result" in a for a in annotations):
                annotations = [a.dict() if hasattr(a, "dict") else a for a in
                               client.annotations.list(id=data["id"], request_options=REQUEST_OPTIONS)]
            export.tasks.append({"id": data.get("id"), "data": data.get("data") or {}, "annotations": annotations,
                                 "project": project_id})
    except ApiError as exc:
        raise _api_error(exc, base_url, f"the tasks of project {project_id}") from None
    except (httpx.HTTPError, ValueError) as exc:
        raise _transport_error(exc, base_url) from None
    log.info("fetched annotated tasks", extra={"project": project_id, "tasks": export.tasks_seen,
                                               "annotated_tasks": len(export.tasks)})
    return export


def _api_error(exc, base_url: str, what: str) -> LabelStudioApiError:
    if exc.status_code == 404:
        return LabelStudioApiError(f"Label Studio at {base_url} has no {what} (HTTP 404), or the token's user cannot see it")
    if exc.status_code in (401, 403):
        return LabelStudioApiError(f"Label Studio at {base_url} refused access to {what} (HTTP {exc.status_code} "
                                   f"{_detail(exc)}). {_TOKEN_HELP}")
    return LabelStudioApiError(f"Label Studio at {base_url} answered HTTP {exc.status_code} for {what}: {_detail(exc)}")


def _transport_error(exc: Exception, base_url: str) -> LabelStudioApiError:
    if isinstance(exc, httpx.TimeoutException):
        return LabelStudioApiError(f"Label Studio at {base_url} did not answer in time ({type(exc).__name__})")
    if isinstance(exc, httpx.HTTPError):
        return LabelStudioApiError(f"cannot reach Label Studio at {base_url} ({type(exc).__name__}: {exc}); "
                                   "is LABEL_STUDIO_URL right (as this backend reaches it) and Label Studio running?")
    return LabelStudioApiError(f"Label Studio at {base_url} gave an answer that is not the expected JSON ({exc})")
