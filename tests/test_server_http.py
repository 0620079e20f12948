"""The ML-backend protocol over real HTTP on loopback, with the real predictor on 160x120 images.

They use the embedded default checkpoint (or a random network while there is none). Until that
checkpoint is trained (its header's meta.steps > 0), they check sizes and formats, not mask quality.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support import (stop_process, API_KEY, FakeLabelStudio, TricklingServer, batch_task, decode_region, free_port, interactive_task,
                     keypoint, pixel_keypoint, png_bytes, post, predict_body, rectangle, serve, setup_body,
                     webhook_body)

from backend.app import create_app
from backend.config import Settings
from backend.service import ClickSegModel
from model.clicks import Click
from model.predictor import DEFAULT_CHECKPOINT, ClickSegPredictor

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
SCENE = np.zeros((120, 160, 3), np.uint8)
SCENE[:] = (40, 90, 40)
SCENE[30:90, 50:110] = (230, 200, 40)  # one bright object on a dull background
SCENE = np.clip(SCENE + RNG.integers(-10, 10, SCENE.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The embedded default checkpoint, or a random small one while it does not exist yet."""
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT
    from model.checkpoint import save_checkpoint
    from model.nets.registry import create_model

    path = tmp_path_factory.mktemp("weights") / "random-effnet.safetensors"
    save_checkpoint(create_model("effnet-lite", {"input_size": 160}), path, meta={"version": "random-effnet-test"})
    return path


@pytest.fixture(scope="session")
def trained(checkpoint) -> bool:
    from model.checkpoint import read_header

    return read_header(checkpoint)[2].get("steps", 0) > 0


@pytest.fixture(scope="session")
def predictor(checkpoint) -> ClickSegPredictor:
    return ClickSegPredictor.from_checkpoint(checkpoint, cfr_steps=1)


@pytest.fixture(scope="module")
def label_studio():
    fake = FakeLabelStudio()
    fake.add("/data/upload/1/scene.png", png_bytes(SCENE))
    fake.add("/data/upload/1/notes.txt", b"these are not pixels", "text/plain")
    fake.add("/data/upload/1/noise.png", png_bytes(RNG.integers(0, 255, (300, 300, 3), dtype=np.uint8)))
    with serve(fake) as url:
        fake.url = url
        yield fake


def make_settings(label_studio, checkpoint, **env) -> Settings:
    base = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": API_KEY, "CHECKPOINT": str(checkpoint),
            "MAX_IMAGE_BYTES": "100000", "LOG_LEVEL": "WARNING",
            "MODEL_DIR": tempfile.mkdtemp(prefix="ls-clickseg-test-")}  # jobs and the exemplar store write here
    return Settings.from_env({**base, **env})


@pytest.fixture(scope="module")
def server(label_studio, checkpoint, predictor):
    """A backend on loopback serving the real predictor."""
    settings = make_settings(label_studio, checkpoint)
    model = ClickSegModel(settings, predictor_factory=lambda: predictor)
    with serve(create_app(settings, model)) as url:
        yield url


def interactive(context_items, task_id=1, image="/data/upload/1/scene.png", **task_fields):
    task = interactive_task(image, task_id=task_id)
    task.update(task_fields)
    return predict_body([task], {"result": list(context_items)})


def assert_error(response, status_range, *fragments):
    assert response.status_code in status_range, (response.status_code, response.text)
    body = response.json()
    assert set(body) >= {"error"} and "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body


CLIENT_ERROR = range(400, 500)


# --- routes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/"])
def test_health(server, predictor, path):
    response = requests.get(server + path, timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "UP", "model_class": "ClickSegModel", "model_version": predictor.model_version}


def test_setup_answers_the_served_checkpoints_version(server, predictor):
    response = post(f"{server}/setup", setup_body())
    assert response.status_code == 200 and response.json() == {"model_version": predictor.model_version}


def test_predict_without_label_config_uses_the_setup_schema(label_studio, checkpoint, predictor):
    settings = make_settings(label_studio, checkpoint)
    body = interactive([pixel_keypoint(80, 60)])
    del body["label_config"]
    with serve(create_app(settings, ClickSegModel(settings, predictor_factory=lambda: predictor))) as url:
        assert_error(post(f"{url}/predict", body), CLIENT_ERROR, "no label_config")
        assert post(f"{url}/setup", setup_body()).status_code == 200
        response = post(f"{url}/predict", body)
    assert response.status_code == 200 and response.json()["results"][0]["result"][0]["from_name"] == "tag"


def test_versions(server, predictor):
    response = requests.get(f"{server}/versions", timeout=30)
    assert response.status_code == 200 and response.json()["versions"] == [predictor.model_version]
    assert response.json()["projects"] == {}


def test_interactive_request_shaped_as_label_studio_sends_it(server, predictor, trained):
    started = time.perf_counter()
    response = post(f"{server}/predict", interactive([keypoint(46.953125, 52.1875, True, region_id="68157ba332")]))
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    assert prediction["model_version"] == predictor.model_version
    (region,) = prediction["result"]
    assert {k: region[k] for k in ("from_name", "to_name", "type", "original_width", "original_height")} == {
        "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 160, "original_height": 120}
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Object"]
    assert isinstance(region["id"], str) and len(region["id"]) == 10
    assert 0.0 <= region["score"] <= 1.0 and prediction["score"] == region["score"]
    mask = decode_region(region)  # decoded with the Label Studio SDK
    assert mask.shape == (120, 160)
    if trained:  # the mask covers the clicked pixel
        assert mask[62, 75]
    print(f"first interactive request: {time.perf_counter() - started:.2f} s")


class RecordingPredictor:
    """The real predictor, with the clicks of every predict call recorded."""

    def __init__(self, predictor: ClickSegPredictor):
        self.predictor = predictor
        self.model_version = predictor.model_version
        self.max_working_side = predictor.max_working_side
        self.calls = []

    def encode_image(self, image, size=None):
        return self.predictor.encode_image(image, size)

    def predict(self, state, clicks, prev_mask=None, clicked_components_only=None):
        self.calls.append((list(clicks), prev_mask is not None))
        return self.predictor.predict(state, clicks, prev_mask=prev_mask)


def test_negative_click_changes_the_mask(label_studio, checkpoint, predictor, trained):
    recorder = RecordingPredictor(predictor)
    settings = make_settings(label_studio, checkpoint)
    positive, negative = pixel_keypoint(80, 60), pixel_keypoint(60, 40, is_positive=False)
    with serve(create_app(settings, ClickSegModel(settings, predictor_factory=lambda: recorder))) as url:
        first = post(f"{url}/predict", interactive([positive])).json()["results"][0]["result"][0]
        second = post(f"{url}/predict", interactive([positive, negative])).json()["results"][0]["result"][0]
    assert second["id"] == first["id"]  # the same object, refined
    # The negative click reaches the model at its pixel, with the previous mask fed back.
    assert recorder.calls[-1] == ([Click(60.0, 80.0, True), Click(40.0, 60.0, False)], True)
    if trained:  # untrained weights barely react to clicks; trained ones must
        assert not np.array_equal(decode_region(first), decode_region(second))


def test_a_large_jpeg_is_decoded_reduced_and_answered_at_its_true_size(label_studio, checkpoint, predictor):
    big = np.asarray(Image.fromarray(SCENE).resize((3000, 2250), Image.BICUBIC))  # the object at [562:1687, 937:2062]
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="JPEG", quality=92)
    label_studio.add("/data/upload/1/big.jpg", buffer.getvalue(), "image/jpeg")
    encoded = []

    class ShapeRecorder(RecordingPredictor):
        def encode_image(self, image, size=None):
            encoded.append((image.shape, size))
            return super().encode_image(image, size)

    settings = make_settings(label_studio, checkpoint, MAX_IMAGE_BYTES=str(10**7))
    click = pixel_keypoint(1500, 1125, width=3000, height=2250)
    with serve(create_app(settings, ClickSegModel(settings, predictor_factory=lambda: ShapeRecorder(predictor)))) as url:
        response = post(f"{url}/predict", interactive([click], task_id=31, image="/data/upload/1/big.jpg"))
    assert response.status_code == 200, response.text
    assert encoded == [((1125, 1500, 3), (2250, 3000))]  # 1/2 still keeps predictor.max_working_side (1280)
    region = response.json()["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (3000, 2250)
    mask = decode_region(region)
    full = predictor.predict(predictor.encode_image(np.asarray(Image.open(io.BytesIO(buffer.getvalue())))),
                             [Click(1125.0, 1500.0)]) > 0.49
    assert mask.shape == full.shape == (2250, 3000)
    assert (mask & full).sum() / max(1, (mask | full).sum()) > 0.98  # the model's own answer on the full decode


def test_missing_is_positive_means_positive(server):
    explicit = post(f"{server}/predict", interactive([pixel_keypoint(80, 60, True)], task_id=8)).json()
    absent = post(f"{server}/predict", interactive([pixel_keypoint(80, 60, None)], task_id=9)).json()
    assert explicit["results"][0]["result"][0]["value"]["rle"] == absent["results"][0]["result"][0]["value"]["rle"]


def test_box_prompt_mask_stays_inside_the_box(server):
    response = post(f"{server}/predict", interactive([rectangle(50, 30, 110, 90)], task_id=10))
    assert response.status_code == 200, response.text
    mask = decode_region(response.json()["results"][0]["result"][0])
    outside = np.ones_like(mask)
    outside[30:90, 50:110] = False
    assert mask.shape == (120, 160) and not mask[outside].any()


def test_batch_predictions_are_empty_and_download_nothing(server, label_studio, predictor):
    before = len(label_studio.requests)
    tasks = [batch_task("/data/upload/1/scene.png", 2), batch_task("/data/upload/1/missing.png", 3),
             {"id": 4, "data": {}}, {"garbage": True}]
    response = post(f"{server}/predict", predict_body(tasks, None))
    assert response.status_code == 200
    assert response.json() == {"results": [{"result": [], "score": 0.0, "model_version": predictor.model_version}] * 4}
    assert len(label_studio.requests) == before


def test_webhook_events(server):
    # a START_TRAINING answer that fit() did not give within the webhook's short wait says "queued"
    for action, statuses in [("START_TRAINING", ("training started", "queued")), ("ANNOTATION_CREATED", ("ok",)),
                             ("SOMETHING_NEW", ("ignored",))]:
        response = post(f"{server}/webhook", webhook_body(action))
        body = response.json()
        assert response.status_code == 201 and body["action"] == action and body["status"].startswith(statuses), body


def test_webhook_answers_at_once_while_slow_work_continues(label_studio, checkpoint, predictor):
    release, finished = threading.Event(), threading.Event()

    class SlowTrainer(ClickSegModel):
        def fit(self, event, data, **kwargs):
            release.wait(60)  # held until the webhook has answered; a webhook that waited for it times out
            finished.set()
            return {"status": "trained"}

    settings = make_settings(label_studio, checkpoint)
    with serve(create_app(settings, SlowTrainer(settings, predictor_factory=lambda: predictor))) as url:
        try:
            response = post(f"{url}/webhook", webhook_body("START_TRAINING"), timeout=30)
            answered_before_fit_ended = not finished.is_set()
        finally:
            release.set()
        assert finished.wait(30), "fit() never ran"
    assert response.status_code == 201 and response.json()["status"] == "queued"
    assert answered_before_fit_ended


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"", "body is empty"),
    (b"[1, 2]", "must be a JSON object"),
    ({"project": "1"}, "no 'action'"),
])
def test_malformed_webhooks_are_400s(server, body, fragment):
    assert_error(post(f"{server}/webhook", body), CLIENT_ERROR, fragment)


# --- auth --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(label_studio, checkpoint, predictor):
    settings = make_settings(label_studio, checkpoint, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret")
    with serve(create_app(settings, ClickSegModel(settings, predictor_factory=lambda: predictor))) as url:
        yield url


@pytest.mark.parametrize("method, path, body", [
    ("get", "/health", None), ("get", "/", None), ("get", "/versions", None), ("post", "/setup", setup_body()),
    ("post", "/predict", predict_body([batch_task("/data/upload/1/scene.png")], None)),
    ("post", "/webhook", webhook_body("ANNOTATION_CREATED")),
])
def test_basic_auth_guards_every_route(auth_server, method, path, body):
    def call(auth):
        return requests.request(method, auth_server + path, json=body, auth=auth, timeout=30)

    for auth in (None, ("ls", "wrong"), ("other", "s3cret")):
        response = call(auth)
        assert_error(response, {401}, "authentication required")
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert call(("ls", "s3cret")).status_code in (200, 201)


def test_auth_settings_must_come_in_pairs():
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "ls"})


# --- bad input ---------------------------------------------------------------------------------


def test_malformed_json_is_a_400(server):
    assert_error(post(f"{server}/predict", b'{"tasks": [', headers={"Content-Type": "application/json"}),
                 CLIENT_ERROR, "not valid JSON")


def test_missing_tasks_is_a_400(server):
    assert_error(post(f"{server}/predict", {"params": {"context": None}}), CLIENT_ERROR, "no 'tasks'")


@pytest.mark.parametrize("context, fragment", [
    ({"result": []}, "no keypoints or rectangles"),
    ({"result": [{"type": "brushlabels", "from_name": "tag", "to_name": "image", "value": {}}]}, "no keypoints"),
    ({"result": [keypoint(120.0, 50.0)]}, "value.x=120.0 is outside 0-100"),
    ({"result": [keypoint(50.0, -3.0)]}, "value.y=-3.0 is outside 0-100"),
    ({"result": [dict(keypoint(50.0, 50.0), from_name="kp_nope")]}, "unknown control name 'kp_nope'"),
])
def test_bad_contexts_are_400s(server, context, fragment):
    body = predict_body([interactive_task("/data/upload/1/scene.png")], context)
    assert_error(post(f"{server}/predict", body), CLIENT_ERROR, fragment)


def test_task_without_its_image_field_is_a_400(server):
    body = interactive([pixel_keypoint(80, 60)], data={"picture": "/data/upload/1/scene.png"})
    assert_error(post(f"{server}/predict", body), CLIENT_ERROR, "no field 'image'")


@pytest.mark.parametrize("image, status_range, fragment", [
    ("/data/upload/1/gone.png", CLIENT_ERROR, "no such file"),               # unreachable: Label Studio has no such file
    ("http://images.example.com/a.png", CLIENT_ERROR, "ALLOWED_IMAGE_HOSTS"),  # forbidden host (SSRF guard)
    ("/data/upload/1/noise.png", CLIENT_ERROR, "MAX_IMAGE_BYTES"),            # oversized
    ("/data/upload/1/notes.txt", CLIENT_ERROR, "not an image"),               # non-image body
])
def test_image_problems_are_errors_naming_the_url(server, image, status_range, fragment):
    body = interactive([pixel_keypoint(80, 60)], task_id=20, image=image)
    error = assert_error(post(f"{server}/predict", body), status_range, fragment)
    assert image in error["error"]


def test_unreachable_image_host(label_studio, checkpoint, predictor):
    """An allowed host where nothing listens: backend.images answers 502 (Bad Gateway) for a
    connection that fails, and 404 (tested above) when the host has no such file."""
    settings = make_settings(label_studio, checkpoint, ALLOWED_IMAGE_HOSTS="127.0.0.1:9")
    with serve(create_app(settings, ClickSegModel(settings, predictor_factory=lambda: predictor))) as url:
        response = post(f"{url}/predict", interactive([pixel_keypoint(80, 60)], image="http://127.0.0.1:9/x.png"))
    error = assert_error(response, {502}, "cannot connect")
    assert "http://127.0.0.1:9/x.png" in error["error"]


def test_oversized_in_pixels(label_studio, checkpoint, predictor):
    settings = make_settings(label_studio, checkpoint, MAX_IMAGE_PIXELS="10000")
    with serve(create_app(settings, ClickSegModel(settings, predictor_factory=lambda: predictor))) as url:
        response = post(f"{url}/predict", interactive([pixel_keypoint(80, 60)]))
    assert_error(response, CLIENT_ERROR, "MAX_IMAGE_PIXELS")


def test_unknown_route_and_method_are_json_errors(server):
    assert_error(requests.get(f"{server}/nope", timeout=30), {404})
    assert_error(requests.get(f"{server}/predict", timeout=30), {405})


def test_a_model_that_cannot_load_is_a_503_naming_the_checkpoint(label_studio, tmp_path):
    missing = tmp_path / "absent.safetensors"
    settings = make_settings(label_studio, missing)
    with serve(create_app(settings)) as url:
        assert_error(requests.get(f"{url}/health", timeout=30), {503}, str(missing))
        batch = post(f"{url}/predict", predict_body([batch_task("/data/upload/1/scene.png")], None))
    assert batch.status_code == 200 and batch.json()["results"][0]["result"] == []  # batch never fails


# --- gunicorn ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_gunicorn_serves_the_wsgi_app_with_json_logs(label_studio, checkpoint, tmp_path):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "CHECKPOINT": str(checkpoint), "WORKERS": "1",
           "MODEL_DIR": str(tmp_path / "model_dir"),
           "THREADS": "2", "DEVICE": "cpu", "LOG_LEVEL": "INFO", "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": API_KEY, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}
    log_path = tmp_path / "gunicorn.log"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(gunicorn), "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = requests.get(f"{base}/health", auth=("ls", "pw"), timeout=5)
                break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still loading the model
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "gunicorn did not start within 120 s"
                time.sleep(0.5)
        assert health.status_code == 200 and health.json()["status"] == "UP"
        assert requests.get(f"{base}/health", timeout=5).status_code == 401
        response = requests.post(f"{base}/predict", auth=("ls", "pw"), timeout=120,
                                 json=interactive([pixel_keypoint(80, 60)]))
        assert response.status_code == 200, response.text
        assert decode_region(response.json()["results"][0]["result"][0]).shape == (120, 160)
    finally:
        stop_process(process)
    lines = [line for line in log_path.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert any(r["message"] == "model loaded" for r in records), log_path.read_text()
    assert any(r["message"] == "interactive prediction" for r in records)


@pytest.mark.slow
def test_clients_that_stop_mid_request_do_not_hold_gunicorn(checkpoint, tmp_path, backend_processes):
    """Four connections stuck in their headers or body, with two threads: /health still answers
    once REQUEST_READ_TIMEOUT has passed, and the stuck connections are closed."""
    base = backend_processes({"CHECKPOINT": str(checkpoint), "WORKERS": "1", "THREADS": "2", "DEVICE": "cpu",
                              "LOG_LEVEL": "WARNING", "REQUEST_READ_TIMEOUT": "2",
                              "MODEL_DIR": str(tmp_path / "model_dir")})
    port = int(base.rsplit(":", 1)[1])
    stuck = []
    try:
        for partial in (b"POST /predict HTTP/1.1\r\nHost: x\r\n", b"GET /health HTTP/1.1\r\nHo",
                        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
                        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):  # the last: a TLS ClientHello
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            conn.sendall(partial)
            stuck.append(conn)
        started = time.monotonic()
        assert requests.get(f"{base}/health", timeout=30).status_code == 200
        assert time.monotonic() - started < 15
        for conn in stuck:  # the server gave up on each: the next read sees the end (or a 4xx) at once
            conn.settimeout(15)
            try:
                conn.recv(4096)
            except ConnectionResetError:
                pass
        healthcheck = subprocess.run([sys.executable, "-m", "backend.healthcheck"], cwd=REPO, timeout=30,
                                     env={**os.environ, "PORT": str(port)})
        assert healthcheck.returncode == 0  # the Docker HEALTHCHECK
    finally:
        for conn in stuck:
            conn.close()


@pytest.mark.slow
def test_eight_slow_clients_leave_health_and_a_click_answering(label_studio, checkpoint, tmp_path, backend_processes):
    """The embedded default's settings (THREADS, REQUEST_READ_TIMEOUT) with 8 slow clients at once:
    3 trickling their headers, 3 trickling a body, 2 clicks on an image whose source trickles.
    /health and a normal click on another task still answer (held threads would never free: the clients
    never fall silent), each within 5 s on a busy CI machine (about 0.1 s when idle)."""
    source = TricklingServer(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n",
                             b"\0" * 100000, interval=0.5)  # a slow image source
    base = backend_processes({"CHECKPOINT": str(checkpoint), "WORKERS": "1", "DEVICE": "cpu", "LOG_LEVEL": "WARNING",
                              "MODEL_DIR": str(tmp_path / "model_dir"), "LABEL_STUDIO_URL": label_studio.url,
                              "LABEL_STUDIO_API_KEY": API_KEY, "ALLOWED_IMAGE_HOSTS": f"127.0.0.1:{source.port}"},
                             unset=("THREADS", "REQUEST_READ_TIMEOUT"))
    port = int(base.rsplit(":", 1)[1])
    slow, stop = [], threading.Event()

    def trickle(conn, data: bytes):
        for i in range(len(data)):
            if stop.wait(0.5):
                return
            try:
                conn.sendall(data[i:i + 1])
            except OSError:
                return

    try:
        assert requests.post(f"{base}/predict", json=interactive([pixel_keypoint(80, 60)]), timeout=120).ok  # warm
        body = json.dumps(interactive([pixel_keypoint(80, 60)])).encode()
        for request in [b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" * 3] * 3 + \
                       [b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body] * 3:
            conn = socket.create_connection(("127.0.0.1", port), timeout=60)
            split = request.index(b"\r\n") + 2 if b"Content-Length" not in request else request.index(b"\r\n\r\n") + 4
            conn.sendall(request[:split])
            threading.Thread(target=trickle, args=(conn, request[split:]), daemon=True).start()
            slow.append(conn)
        slow_image = interactive([pixel_keypoint(80, 60)], task_id=7, image=f"http://127.0.0.1:{source.port}/slow.png")
        for _ in range(2):
            threading.Thread(target=requests.post, args=(f"{base}/predict",),
                             kwargs={"json": slow_image, "timeout": 60}, daemon=True).start()
        time.sleep(1.0)  # every slow client now holds its thread
        started = time.monotonic()
        assert requests.get(f"{base}/health", timeout=10).status_code == 200
        health_s = time.monotonic() - started
        started = time.monotonic()
        click = requests.post(f"{base}/predict", json=interactive([pixel_keypoint(60, 50)], task_id=3), timeout=10)
        click_s = time.monotonic() - started
        assert click.status_code == 200, click.text
        assert health_s < 5 and click_s < 5, (health_s, click_s)
    finally:
        stop.set()
        for conn in slow:
            conn.close()
        source.close()


@pytest.mark.slow
def test_gunicorn_stops_at_boot_when_the_checkpoint_cannot_load(tmp_path):
    missing = tmp_path / "absent.safetensors"
    env = {**os.environ, "PORT": str(free_port()), "HOST": "127.0.0.1", "CHECKPOINT": str(missing), "DEVICE": "cpu"}
    gunicorn = Path(sys.executable).with_name("gunicorn")
    result = subprocess.run([str(gunicorn), "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "Traceback" not in result.stdout
