"""Load check of the scale-out deployment, on loopback: simulated annotators spread over several backends.

    python -m backend.load_check --backends 2 --annotators 8 --seconds 120 [--size 640x480] [--checkpoint X]

Starts a private ``redis-server``, an image source standing in for Label Studio, and ``--backends``
gunicorn backends sharing that Redis (exemplars, job records) and one ``MODEL_DIR``. Each annotator
works through tasks of its own: on each synthetic scene it clicks objects one after another with the
standard clicker (``backend.evaluate.ObjectSession``, the editor's payloads) until IoU 0.9 or
``--max-clicks``, accepting each object into the task's draft, then submits the task
(``ANNOTATION_CREATED`` webhook). Every request goes to the next backend in turn, as a balancer
without stickiness sends it (the worst case: an object's clicks land on different backends, which
replay them). Prints p50 / p99 per click and the errors; stops after ``--seconds``.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import requests
from PIL import Image
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from model.evaluation.benchmark import RECALL_SCENE_OBJECTS, machine_info, parse_sizes, synthetic_scene

from .evaluate import ObjectSession

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
ACCEPT_IOU = 0.9
OBJECTS_PER_TASK = 3
DUMMY_TOKEN = "0" * 40  # a legacy-token-shaped key: the image source accepts anything


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SceneSource:
    """Label Studio's file serving, for the scenes: ``/data/upload/1/scene<seed>.png``."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self._png: Dict[int, bytes] = {}
        self._lock = threading.Lock()

    def scene(self, seed: int) -> Tuple[np.ndarray, np.ndarray]:
        return synthetic_scene(self.width, self.height, seed=seed, objects=RECALL_SCENE_OBJECTS)

    def __call__(self, environ, start_response):
        path = Request(environ).path
        name = path.rsplit("/", 1)[-1]
        if not (path.startswith("/data/upload/1/scene") and name[5:-4].isdigit() and name.endswith(".png")):
            return Response("not found", 404)(environ, start_response)
        seed = int(name[5:-4])
        with self._lock:
            if seed not in self._png:
                buffer = io.BytesIO()
                Image.fromarray(self.scene(seed)[0]).save(buffer, format="PNG")
                self._png[seed] = buffer.getvalue()
        return Response(self._png[seed], 200, content_type="image/png")(environ, start_response)


@dataclass
class ClickRecord:
    annotator: int
    backend: int
    ms: float
    ok: bool
    error: str = ""


@dataclass
class LoadReport:
    backends: int
    annotators: int
    size: str
    seconds: float
    clicks: int
    errors: int
    webhooks: int
    webhook_errors: int
    objects: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    per_backend_p50_ms: List[float]
    error_samples: List[str] = field(default_factory=list)
    machine: Dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            "| backends | annotators | image | clicks | errors | objects | webhooks (errors) | p50 ms | p99 ms | max ms | p50 per backend |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {self.backends} | {self.annotators} | {self.size} | {self.clicks} | {self.errors} | {self.objects} | "
            f"{self.webhooks} ({self.webhook_errors}) | {self.p50_ms:.0f} | {self.p99_ms:.0f} | {self.max_ms:.0f} | "
            f"{' / '.join(f'{v:.0f}' for v in self.per_backend_p50_ms)} |",
        ]
        return "\n".join(rows)


class Deployment:
    """redis-server, the scene source and the backends, all on loopback; stopped by ``close``."""

    def __init__(self, backends: int, size: Tuple[int, int], checkpoint: Optional[str], redis_url: Optional[str],
                 workdir: Path):
        self.workdir = workdir
        self.processes: List[subprocess.Popen] = []
        self.source = SceneSource(*size)
        self.source_server = make_server("127.0.0.1", 0, self.source, threaded=True)
        threading.Thread(target=self.source_server.serve_forever, daemon=True).start()
        source_url = f"http://127.0.0.1:{self.source_server.server_port}"
        self.redis_url = redis_url or self._start_redis()
        env = {**os.environ, "REDIS_URL": self.redis_url, "EXEMPLAR_STORE": "redis", "LABEL_STUDIO_URL": source_url,
               "LABEL_STUDIO_API_KEY": DUMMY_TOKEN, "MODEL_DIR": str(workdir / "models"), "WORKERS": "1",
               "THREADS": "4", "LOG_LEVEL": "WARNING", "HOST": "127.0.0.1"}
        if checkpoint:
            env["CHECKPOINT"] = str(Path(checkpoint).resolve())
        self.urls = [self._start_backend(env, index) for index in range(backends)]
        for index, url in enumerate(self.urls):
            self._wait_up(url, self.processes[-backends + index], index)

    def _start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian package redis-server), or pass --redis-url")
        port = _free_port()
        self.processes.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        return f"redis://127.0.0.1:{port}/0"

    def _start_backend(self, env: Dict[str, str], index: int) -> str:
        port = _free_port()
        log = open(self.workdir / f"backend-{index}.log", "w")
        self.processes.append(subprocess.Popen(
            [str(Path(sys.executable).with_name("gunicorn")), "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"],
            cwd=PACKAGE_ROOT, env={**env, "PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT))
        return f"http://127.0.0.1:{port}"

    def _wait_up(self, url: str, process: subprocess.Popen, index: int) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if process.poll() is not None:
                break
            time.sleep(0.3)
        log = (self.workdir / f"backend-{index}.log").read_text()[-2000:]
        raise SystemExit(f"backend {index} did not start: {log}")

    def close(self) -> None:
        self.source_server.shutdown()
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def run_load(deployment: Deployment, annotators: int, seconds: float, max_clicks: int) -> Tuple[List[ClickRecord], Dict[str, int]]:
    """Run the annotators until ``seconds`` have passed; (every click, counters)."""
    urls = deployment.urls
    turn = itertools.count()
    turn_lock = threading.Lock()
    records: List[ClickRecord] = []
    counts = {"webhooks": 0, "webhook_errors": 0, "objects": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def next_backend() -> int:
        with turn_lock:
            return next(turn) % len(urls)

    def annotator(number: int) -> None:
        session = requests.Session()
        for task_id in itertools.count(1000 * (number + 1)):
            if time.monotonic() >= deadline:
                return
            image_url = f"/data/upload/1/scene{task_id}.png"
            _, labels = deployment.source.scene(task_id)
            accepted: List[Dict[str, Any]] = []

            def post(body: Dict[str, Any]) -> Dict[str, Any]:
                backend = next_backend()
                started = time.perf_counter()
                try:
                    response = session.post(f"{urls[backend]}/predict", json=body, timeout=300)
                    ok, error = response.status_code == 200, "" if response.status_code == 200 else \
                        f"HTTP {response.status_code}: {response.text[:200]}"
                except requests.RequestException as exc:
                    ok, error, response = False, f"{type(exc).__name__}: {exc}", None
                with lock:
                    records.append(ClickRecord(number, backend, 1000 * (time.perf_counter() - started), ok, error))
                if not ok:
                    raise RuntimeError(error)
                return response.json()

            try:
                for k in range(1, OBJECTS_PER_TASK + 1):
                    obj = ObjectSession(post, task_id, image_url, (labels == k).astype(np.uint8), f"a{number}t{task_id}o{k}")
                    for _ in range(max_clicks):
                        if obj.click(drafts=accepted) >= ACCEPT_IOU or time.monotonic() >= deadline:
                            break
                    accepted.append({**obj.region, "origin": "prediction"})
                    with lock:
                        counts["objects"] += 1
                    if time.monotonic() >= deadline:
                        return
            except RuntimeError:
                continue  # counted as an error; the annotator goes on with the next task
            submitted = {"id": task_id, "result": accepted, "was_cancelled": False, "task": task_id, "project": 1,
                         "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())}
            webhook = {"action": "ANNOTATION_CREATED", "annotation": submitted, "project": {"id": 1},
                       "task": {"id": task_id, "project": 1, "data": {"image": image_url}}}
            try:
                ok = session.post(f"{urls[next_backend()]}/webhook", json=webhook, timeout=60).status_code == 201
            except requests.RequestException:
                ok = False
            with lock:
                counts["webhooks"] += 1
                counts["webhook_errors"] += 0 if ok else 1

    threads = [threading.Thread(target=annotator, args=(n,), daemon=True) for n in range(annotators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 600)
    return records, counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.load_check", description=__doc__.split("\n")[0])
    parser.add_argument("--backends", type=int, default=2)
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the annotators work")
    parser.add_argument("--size", default="640x480", help="scene size WxH")
    parser.add_argument("--max-clicks", type=int, default=5, help="clicks per object at most")
    parser.add_argument("--checkpoint", default=None, help="default: the embedded model")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of a private redis-server")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.backends < 1 or args.annotators < 1 or args.seconds <= 0 or args.max_clicks < 1:
        parser.error("--backends, --annotators, --seconds and --max-clicks must be positive")
    (size,) = parse_sizes(args.size)
    with tempfile.TemporaryDirectory(prefix="ls-clickseg-load-") as workdir:
        deployment = Deployment(args.backends, size, args.checkpoint, args.redis_url, Path(workdir))
        try:
            records, counts = run_load(deployment, args.annotators, args.seconds, args.max_clicks)
        finally:
            deployment.close()
    times = [r.ms for r in records]
    report = LoadReport(
        backends=args.backends, annotators=args.annotators, size=f"{size[0]}x{size[1]}", seconds=args.seconds,
        clicks=len(records), errors=sum(not r.ok for r in records), p50_ms=_percentile(times, 50),
        p99_ms=_percentile(times, 99), max_ms=max(times, default=float("nan")),
        per_backend_p50_ms=[_percentile([r.ms for r in records if r.backend == b], 50) for b in range(args.backends)],
        error_samples=sorted({r.error for r in records if not r.ok})[:5], machine=machine_info(), **counts)
    print(report.table())
    if report.error_samples:
        print("errors:", *report.error_samples, sep="\n  ")
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(report), indent=1))
    return 0 if report.errors == 0 and report.webhook_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
