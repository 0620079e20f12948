"""Flask app speaking Label Studio's ML-backend protocol.

    GET  /health, /   -> {"status": "UP", "model_class", "model_version"}
    POST /setup       -> {"model_version"}
    POST /predict     -> {"results": [{"result", "score", "model_version"}, ...]}
    POST /webhook     -> 201 {"action", "status"} once the payload is on disk (backend.webhook_inbox);
                         work runs in a background thread, training in a separate process
                         (START_TRAINING -> "training started (job ...)")
    GET  /versions    -> {"versions": [...], "default", "projects": {<project>: {"served", "versions"}}}
    GET  /jobs/<project> -> the project's last training job: state, progress, step, loss, evaluation

Every error is JSON ``{"error": message}`` with a 4xx/5xx status; stack traces go to the
log only. With BASIC_AUTH_USER/BASIC_AUTH_PASS set, every route needs those credentials.
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Dict, Optional

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .config import Settings
from .errors import BackendError
from .logging_setup import configure_logging
from .payload import as_object, bad_request
from .service import ClickSegModel
from .webhook_inbox import WebhookInbox

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024 * 1024  # tasks carry every annotation's and draft's brush RLE
MAX_JSON_DEPTH = 64  # Label Studio's payloads nest about 8 levels
WEBHOOK_WAIT_SECONDS = 0.05  # a webhook answer waits this long for a quick fit() result, then says "queued"
EXTENSION_KEY = "clickseg"


def _json_body() -> Any:
    """The request's JSON, at most ``MAX_JSON_DEPTH`` levels deep; a 400 names what is wrong."""
    try:
        raw = request.get_data(cache=True)
    except HTTPException:
        raise
    except Exception as exc:  # a broken transfer (an invalid chunk size, a dropped connection)
        raise bad_request(f"the request body could not be read: {type(exc).__name__}") from None
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise bad_request(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _credentials_match(settings: Settings) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
    pass_ok = hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    return user_ok & pass_ok


def _log_fit_failure(future) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("webhook handling failed", exc_info=exc)


def _reason_phrase(message: str) -> str:
    """Label Studio shows only the status line of a failed backend call, so it carries the message."""
    text = " ".join(message.split()).encode("ascii", "replace").decode("ascii")
    return text[:400] or "error"


def inbox_name(settings: Settings) -> str:
    """The webhook inbox file: one per host (its entries name processes by pid, which only the host
    that runs them can check). With REDIS_URL, several hosts share MODEL_DIR: the host name tells them apart."""
    if not settings.scale.redis_url:
        return "webhooks.sqlite3"
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())[:64] or "host"
    return f"webhooks-{host}.sqlite3"


def create_app(settings: Optional[Settings] = None, service: Optional[ClickSegModel] = None) -> Flask:
    """The WSGI app; ``service`` defaults to ``ClickSegModel(settings)`` (model loaded lazily)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    service = service or ClickSegModel(settings)
    webhook_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook")
    inbox = WebhookInbox(settings.model_dir / inbox_name(settings))  # opened on the first webhook

    def handle_webhook(entry: Optional[int], action: str, body: Dict[str, Any]) -> Dict[str, str]:
        try:
            return service.fit(action, body)
        finally:
            if entry is not None:
                inbox.done(entry)  # handled, or failed (logged): never replayed

    def replay_orphans() -> None:
        try:
            orphans = inbox.claim_orphans()
        except (OSError, sqlite3.Error) as exc:
            log.error("the webhook inbox cannot be read", extra={"path": str(inbox.path), "reason": str(exc)})
            return
        for entry, action, body in orphans:
            log.warning("handling a webhook that a stopped worker had acknowledged", extra={"action": action})
            try:
                handle_webhook(entry, action, body)
            except Exception as exc:
                log.error("webhook handling failed", exc_info=exc)

    webhook_worker.submit(replay_orphans)

    app = Flask("ls_clickseg")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False
    app.extensions[EXTENSION_KEY] = service

    @app.before_request
    def authenticate() -> Optional[Response]:
        g.started = time.perf_counter()
        if settings.auth_enabled and not _credentials_match(settings):
            response = jsonify({"error": "authentication required: send the BASIC_AUTH_USER / BASIC_AUTH_PASS credentials "
                                         "(Label Studio: ML backend settings, Authentication method: Basic)"})
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="ls-clickseg"'
            return response
        return None

    @app.after_request
    def log_request(response: Response) -> Response:
        log.info("request", extra={
            "method": request.method, "path": request.path, "status": response.status_code,
            "ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 1),
        })
        return response

    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError):
        level = logging.WARNING if exc.status < 500 else logging.ERROR
        log.log(level, "request failed", extra={"path": request.path, "status": exc.status, "error": exc.message})
        response = jsonify(exc.to_json())
        response.status = f"{exc.status} {_reason_phrase(exc.message)}"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify({"error": f"{exc.name}: {exc.description}"}), exc.code

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.error("unexpected error", exc_info=exc, extra={"path": request.path})
        return jsonify({"error": f"internal error ({type(exc).__name__}); see the backend log"}), 500

    def health() -> Dict[str, str]:
        return {"status": "UP", "model_class": type(service).__name__, "model_version": service.model_version}

    app.add_url_rule("/health", "health", health, methods=["GET"])
    app.add_url_rule("/", "index", health, methods=["GET"])

    @app.post("/setup")
    def setup():
        body = as_object(_json_body(), "the /setup body")
        schema = body.get("schema")
        if schema is not None and not isinstance(schema, str):
            raise bad_request("schema must be the label config string")
        for name in ("hostname", "access_token"):
            if body.get(name) is not None and not isinstance(body.get(name), str):
                raise bad_request(f"{name} must be a string or null, got {type(body.get(name)).__name__}")
        return service.setup(
            project=body.get("project"), schema=schema, hostname=body.get("hostname"),
            access_token=body.get("access_token"), extra_params=body.get("extra_params"),
        )

    @app.post("/predict")
    def predict():
        body = as_object(_json_body(), "the /predict body")
        tasks = body.get("tasks")
        if tasks is None:
            raise bad_request("the /predict body has no 'tasks' list")
        if not isinstance(tasks, list):
            raise bad_request(f"'tasks' must be a list of tasks, got {type(tasks).__name__}")
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise bad_request("'params' must be an object")
        label_config = body.get("label_config")
        if label_config is not None and not isinstance(label_config, str):
            raise bad_request("'label_config' must be a string")
        results = service.predict(tasks, context=params.get("context"), label_config=label_config, project=body.get("project"))
        return {"results": results}

    @app.post("/webhook")
    def webhook():
        body = as_object(_json_body(), "the webhook payload")
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise bad_request("the webhook payload has no 'action' string")
        service.check_webhook(action, body)  # a malformed payload is a 400 here, not a log line later
        try:
            entry = inbox.put(action, body)  # on disk before the 201
        except (OSError, sqlite3.Error) as exc:
            raise BackendError(f"the webhook could not be stored ({exc}); Label Studio should send it again",
                               status=503) from None
        future = webhook_worker.submit(handle_webhook, entry, action, body)
        future.add_done_callback(_log_fit_failure)
        try:
            status = future.result(timeout=WEBHOOK_WAIT_SECONDS).get("status", "ok")
        except FutureTimeout:
            status = "queued"
        return {"action": action, "status": status}, 201

    @app.get("/versions")
    def versions():
        return service.versions()

    @app.get("/jobs/<project>")
    def job(project: str):
        return service.job_status(project)

    return app
