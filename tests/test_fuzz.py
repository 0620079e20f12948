"""A fuzzer of the HTTP surface, run in-process against the Flask app with the real predictor.

The property: every answer is 2xx, or 4xx with a JSON ``{"error": message}``; never a 5xx, never
a traceback; ``/health`` answers afterwards. Two parts:

- a corpus of hand-written hostile requests (every case that once broke the server);
- generated requests: valid Label Studio payloads (``/setup``, ``/predict``, ``/webhook``,
  ``/jobs``) with one or more nodes replaced by hostile values, or with a broken body.

Profiles: the default (CI) plays ``FUZZ_EXAMPLES`` = 2,000 generated requests, derandomized, so a
failure reproduces (hypothesis prints the failing example); ``FUZZ_EXAMPLES=20000 FUZZ_SEED=<n>
pytest tests/test_fuzz.py`` is the long run with another seed.
"""
from __future__ import annotations

import copy
import json
import os
import random
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from support import (annotation, brush_result, draft, interactive_task, keypoint, png_bytes, predict_body, rectangle,
                     serve, setup_body)

from backend.app import create_app
from backend.config import Settings
from backend.service import ClickSegModel
from model.predictor import DEFAULT_CHECKPOINT, ClickSegPredictor

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
FUZZ_SEED = int(os.environ["FUZZ_SEED"]) if os.environ.get("FUZZ_SEED") else None  # None: derandomized (CI)
IMAGE_URL = "/data/local-files/?d=scene.png"
H, W = 60, 80
DEEP = "\x00DEEP\x00"  # replaced, in the serialised body, by JSON nested thousands of levels deep
HUGE_NUMBER = "\x00HUGE\x00"  # replaced by a number token that overflows a float


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    scene = np.zeros((H, W, 3), np.uint8)
    scene[15:45, 20:60] = (230, 200, 40)
    (root / "scene.png").write_bytes(png_bytes(scene))
    checkpoint = DEFAULT_CHECKPOINT
    if not checkpoint.is_file():
        from model.checkpoint import save_checkpoint
        from model.nets.registry import create_model

        checkpoint = tmp_path_factory.mktemp("weights") / "random.safetensors"
        save_checkpoint(create_model("effnet-lite", {"input_size": 160}), checkpoint, meta={"version": "random"})
    settings = Settings.from_env({
        "CHECKPOINT": str(checkpoint), "LOCAL_FILES_DOCUMENT_ROOT": str(root), "LOG_LEVEL": "CRITICAL",
        "MODEL_DIR": str(tmp_path_factory.mktemp("model-dir")), "MAX_IMAGE_BYTES": "100000",
    })
    predictor = ClickSegPredictor.from_checkpoint(checkpoint, cfr_steps=1)
    app = create_app(settings, ClickSegModel(settings, predictor_factory=lambda: predictor))
    app.testing = False  # errors go through the app's handlers, as in production
    with app.test_client() as test_client:
        yield test_client


def mask() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[15:45, 20:60] = True
    return m


def seeds() -> List[Tuple[str, str, Any]]:
    """(method, path, JSON body) of valid requests, shaped as Label Studio 1.23.2 sends them."""
    task = interactive_task(IMAGE_URL, annotations=[annotation([brush_result(mask(), "a1")])],
                            drafts=[draft([brush_result(mask(), "d1")])])
    clicks = [keypoint(40, 50, width=W, height=H), keypoint(30, 40, False, width=W, height=H)]
    created = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 1, "data": {"image": IMAGE_URL}},
               "annotation": annotation([brush_result(mask(), "w1")])}
    return [
        ("POST", "/setup", setup_body()),
        ("POST", "/predict", predict_body([task], {"result": clicks})),
        ("POST", "/predict", predict_body([task], {"result": [rectangle(10, 10, 50, 40, width=W, height=H)]})),
        ("POST", "/predict", predict_body([interactive_task(IMAGE_URL, task_id=2)], None)),
        ("POST", "/webhook", created),
        ("POST", "/webhook", {**created, "action": "ANNOTATION_UPDATED"}),
        ("POST", "/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 1}]}),
        ("POST", "/webhook", {"action": "TASKS_DELETED", "project": {"id": 1}, "tasks": [{"id": 1}]}),
        ("POST", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}}),
        ("GET", "/jobs/1", None),
        ("GET", "/versions", None),
    ]


CONFIGURATION = ("LABEL_STUDIO_URL", "LOCAL_FILES_DOCUMENT_ROOT")  # a 5xx may only say what the admin must set


def assert_well_answered(response, what: str) -> None:
    text = response.get_data(as_text=True)
    assert b"Traceback" not in response.get_data() and "internal error" not in text, (what, text[:400])
    if response.status_code >= 400:
        body = response.get_json(silent=True)
        assert isinstance(body, dict) and isinstance(body.get("error"), str), (what, text[:200])
        if response.status_code >= 500:
            assert response.status_code == 500 and any(name in body["error"] for name in CONFIGURATION), (what, text[:400])


def send(client, method: str, path: str, body: Any = None, raw: Optional[bytes] = None):
    if raw is None and body is not None:
        raw = json.dumps(body).replace(json.dumps(DEEP), "[" * 5000 + "]" * 5000) \
            .replace(json.dumps(HUGE_NUMBER), "1e400").encode()
    return client.open(path, method=method, data=raw, content_type="application/json")


# --- the corpus --------------------------------------------------------------------------------


def _predict_with(mutate) -> Dict[str, Any]:
    body = copy.deepcopy(seeds()[1][2])
    mutate(body)
    return body


def _set(path: List[Any], value: Any):
    def mutate(body):
        node = body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


CONTEXT = ["params", "context", "result"]
TASK = ["tasks", 0]
CORPUS: List[Tuple[str, str, str, Any]] = [
    # deeply nested JSON
    *[(f"deep {path}", "POST", path, DEEP) for path in ("/predict", "/webhook", "/setup")],
    ("deep value", "POST", "/predict", _predict_with(_set(CONTEXT + [0, "value", "x"], DEEP))),
    # /setup access_token of other types
    *[(f"access_token {value!r}", "POST", "/setup", {**setup_body(), "access_token": value})
      for value in (7, [1], {"a": 1}, True, 1.5)],
    *[(f"hostname {value!r}", "POST", "/setup", {**setup_body(), "hostname": value}) for value in (7, [1], {"a": 1})],
    # a context item whose type is a list or a dict
    *[(f"context type {value!r}", "POST", "/predict", _predict_with(_set(CONTEXT + [0, "type"], value)))
      for value in (["keypointlabels"], {"a": 1})],
    # saved brush regions with nested RLE, and annotation ids of other types
    ("nested rle", "POST", "/predict", _predict_with(_set(TASK + ["annotations", 0, "result", 0, "value", "rle"], [[1, 2]]))),
    ("annotation id list", "POST", "/predict", _predict_with(_set(TASK + ["annotations", 0, "id"], [1]))),
    ("draft id dict", "POST", "/predict", _predict_with(_set(TASK + ["drafts", 0, "id"], {"x": 1}))),
    ("region id list", "POST", "/predict", _predict_with(_set(TASK + ["annotations", 0, "result", 0, "id"], [1]))),
    # coordinates that overflow
    ("x 1e400", "POST", "/predict", _predict_with(_set(CONTEXT + [0, "value", "x"], HUGE_NUMBER))),
    ("x 400 digits", "POST", "/predict", _predict_with(_set(CONTEXT + [0, "value", "x"], 10 ** 400))),
    ("rotation 1e400", "POST", "/predict", _predict_with(_set(CONTEXT + [0, "value", "rotation"], HUGE_NUMBER))),
    ("task id 400 digits", "POST", "/predict", _predict_with(_set(TASK + ["id"], 10 ** 400))),
    # project ids of a few hundred characters
    ("project id long /predict", "POST", "/predict", _predict_with(_set(["project"], "9" * 300))),
    ("project id long /setup", "POST", "/setup", {**setup_body(), "project": "9" * 300}),
    ("project id long /webhook", "POST", "/webhook", {"action": "START_TRAINING", "project": {"id": "9" * 300}}),
    ("project id long int /webhook", "POST", "/webhook", {"action": "START_TRAINING", "project": 10 ** 300}),
    ("project id unicode digits", "POST", "/webhook", {"action": "START_TRAINING", "project": "\u0663\u0663"}),
    ("project id long /jobs", "GET", "/jobs/" + "9" * 300, None),
    # too much work in one request
    ("10,000 keypoints", "POST", "/predict",
     _predict_with(_set(CONTEXT, [keypoint(1 + i % 98, 1 + (i // 98) % 98, width=W, height=H) for i in range(10_000)]))),
    ("a draft declaring 2^30 pixels", "POST", "/predict", _predict_with(_set(
        TASK + ["drafts", 0, "result", 0], {**brush_result(mask(), "big"), "original_width": 32768, "original_height": 32768}))),
    ("a webhook region of 16384 x 16384", "POST", "/webhook", {
        "action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 5},
        "annotation": annotation([{**brush_result(mask(), "big"), "original_width": 16384, "original_height": 16384}],
                                 task_id=5)}),
    # image URLs that parsers read differently
    *[(f"url {url}", "POST", "/predict", _predict_with(_set(TASK + ["data", "image"], url))) for url in (
        "http://127.0.0.1:9\\@127.0.0.1:8000/img.png", "http://169.254.169.254\\@127.0.0.1:8000/",
        "http://[::1/x.png", "http://a:b@c/x.png", "http:///x.png", "/data/local-files/?d=../../etc/passwd",
        "/data/local-files/?d=%00", "s3://bucket/x.png", "\u2028http://x", "http://x:99999/y",
    )],
]


@pytest.mark.parametrize("what, method, path, body", CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_request_is_answered(client, what, method, path, body):
    started = time.perf_counter()
    response = send(client, method, path, body)
    assert_well_answered(response, what)
    assert time.perf_counter() - started < 20, f"{what} held the server for {time.perf_counter() - started:.1f} s"


def test_one_malformed_saved_annotation_does_not_break_the_task(client):
    """A corrupt region is skipped (and logged); the clicks on that task still answer their mask."""
    body = _predict_with(_set(TASK + ["annotations", 0, "result", 0, "value", "rle"], [[1, 2]]))
    body["tasks"][0]["annotations"].append({**annotation([brush_result(mask(), "a2")]), "id": [1]})
    response = send(client, "POST", "/predict", body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["results"][0]["result"]


def test_broken_bodies_are_4xx(client):
    for raw in (b"", b"{", b"\xff\xfe", b"[]", b"null", b"1e400", b"{\"tasks\": " + b"[" * 100_000):
        for path in ("/predict", "/webhook", "/setup"):
            assert_well_answered(send(client, "POST", path, raw=raw), f"{path} {raw[:20]!r}")


def test_an_invalid_chunked_body_is_a_4xx_over_real_http(client):
    with serve(client.application) as url:
        host, port = url.rsplit("//", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
            answer = conn.recv(4096)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:200]


# --- generated requests ---------------------------------------------------------------------------

HOSTILE_SCALARS: List[Any] = [
    None, True, False, 0, -1, 1, 2 ** 31, -(2 ** 63), 10 ** 30, 10 ** 400, 0.5, -1e-300, 1e308, float("inf"),
    float("-inf"), float("nan"), "", " ", "0", "-1", "1.5", "1e400", "NaN", "abc", "x" * 5000, "\u0000", "\ud7ff",
    "../../etc/passwd", "http://127.0.0.1:9\\@127.0.0.1/x", "keypointlabels", "rectanglelabels", "brushlabels",
    "Object", "tag2", "image", DEEP, HUGE_NUMBER,
]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3 and roll < 0.25:
        return {rng.choice(["x", "y", "id", "type", "value", "rle", "result", ""]): hostile_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return rng.choice(HOSTILE_SCALARS)


def nodes(value: Any, path: Tuple = ()) -> List[Tuple]:
    """Paths of every node of a JSON tree (lists and dicts, not their scalars' characters)."""
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found += nodes(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value[:12]):
            found += nodes(child, path + (index,))
    return found


def mutate(body: Any, rng: random.Random) -> Any:
    """Replace, delete or duplicate one to three nodes of ``body`` (a deep copy)."""
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in nodes(body) if p]
        if not paths:
            return hostile_value(rng)
        path = rng.choice(paths)
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = rng.random()
        if action < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif action < 0.25 and isinstance(parent, list):
            parent.extend([copy.deepcopy(parent[key])] * rng.choice([1, 5, 300]))
        else:
            parent[key] = hostile_value(rng)
    return body


@pytest.mark.slow
def test_generated_requests_never_answer_5xx(client):
    base = seeds()
    counts: Dict[str, int] = {}
    started = time.perf_counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=FUZZ_SEED is None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def one_request(rng: random.Random) -> None:
        method, path, body = rng.choice(base)
        if method == "GET":
            path = path if rng.random() < 0.5 else "/jobs/" + str(hostile_value(rng))[:300].replace("/", "%2F")
            response = client.open(path, method="GET")
        elif rng.random() < 0.1:  # a broken body
            raw = json.dumps(body).encode()
            raw = raw[: rng.randint(0, len(raw))] + bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 8)))
            response = send(client, method, path, raw=raw)
        else:
            response = send(client, method, path, mutate(body, rng))
        assert_well_answered(response, f"{method} {path}")
        counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1

    if FUZZ_SEED is not None:
        one_request = seed(FUZZ_SEED)(one_request)
    one_request()
    assert client.get("/health").status_code == 200
    print(f"{sum(counts.values())} generated requests in {time.perf_counter() - started:.1f} s: "
          f"statuses {dict(sorted(counts.items()))}")
    assert sum(counts.values()) >= EXAMPLES
    assert sum(v for k, v in counts.items() if k.startswith("2")) > EXAMPLES // 20  # mutations reach the model too
