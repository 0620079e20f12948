"""End-to-end latency of the click that triggers exemplar recall, as Label Studio sees it.

Times ``POST /predict`` through the WSGI app (payload parsing, session, model, RLE, JSON) on
the synthetic scene of ``model.evaluation.benchmark`` (like blobs on a textured background), for the first
click on blob 2 of a task:

- without an accepted region of the label (the object's region alone);
- with blob 1 accepted in the task's draft (the object's region + proposals for the others).

The two settings use two tasks on the same image, so each keeps its own session as in use.

The image and the session are warmed first, as after the annotator's earlier clicks (the
server computes the recall features in the background when a task is opened); each timed
click is a new object after ✓ (a lone keypoint at a new place near blob 2's centre), so every
one is a triggering click.

    python -m backend.benchmark --sizes 640x480,1024x768,2048x1365,4000x3000 --repeats 5

``--memory-tasks N`` measures memory instead: N tasks, one click each, on images of the first
size (each task its own session); every 50 tasks it prints the process's RSS and peak RSS, and
the session cache's bytes against ``SESSION_CACHE_BYTES``:

    SESSION_CACHE_BYTES=268435456 python -m backend.benchmark --memory-tasks 300 --sizes 2048x1365

``--hostile`` measures what hostile payloads cost instead, on a task of the first size: each
request's status, time and extra peak memory (Python and numpy allocations, ``tracemalloc``),
beside a normal click:

    python -m backend.benchmark --hostile --sizes 640x480

``--decode`` measures what one image costs to decode and encode, JPEG and PNG, each in a fresh
process: as ``/predict`` decodes it (a JPEG of at least twice the model's working side at a reduced
DCT scale) and at full size, with the time of each step and the extra peak RSS:

    python -m backend.benchmark --decode --sizes 4000x3000,7000x5250
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from model.evaluation.benchmark import RECALL_SCENE_OBJECTS, machine_info, parse_sizes, synthetic_scene
from model.predictor import DEFAULT_CHECKPOINT, ClickSegPredictor

from .app import create_app
from .config import Settings
from .images import DecodedImage, decode_image
from .rle import mask_to_rle
from .service import ClickSegModel

IMAGE_URL = "/data/upload/1/benchmark.png"
PROJECT = "1.1795419391"  # /predict's "id.timestamp"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
</View>"""


class SceneFetcher:
    """Serves one in-memory image for every URL (no network): the benchmark's and tests' fetcher."""

    def __init__(self, image: np.ndarray):
        self.image = image

    def set_setup_access_token(self, token):
        pass

    def fetch_decoded(self, url, task_id=None, project_id=None, min_side=None) -> DecodedImage:
        return DecodedImage(self.image, *self.image.shape[:2])


def _keypoint(row: float, col: float, height: int, width: int, region_id: str) -> Dict[str, Any]:
    return {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": (col + 0.5) / width * 100, "y": (row + 0.5) / height * 100, "width": 0.5,
                  "keypointlabels": ["Object"]},
        "id": region_id, "from_name": "tag2", "to_name": "image", "type": "keypointlabels",
        "origin": "manual", "is_positive": True,
    }


def _predict_body(task_id: int, clicks: List[Dict[str, Any]], draft: Sequence[Dict[str, Any]] = (),
                  image: str = IMAGE_URL) -> Dict[str, Any]:
    """An interactive /predict of one task with ``clicks`` in the context and ``draft`` regions saved in a draft."""
    drafts = [{"id": 1, "user": "bench@example.com", "result": list(draft), "task": task_id}] if draft else []
    task = {"id": task_id, "project": 1, "data": {"image": image}, "annotations": [], "drafts": drafts}
    return {"tasks": [task], "project": PROJECT, "label_config": LABEL_CONFIG,
            "params": {"context": {"result": clicks}}}


def _body(clicks: List[Dict[str, Any]], accepted: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Task 1 has blob 1 accepted in a draft; task 2 (same image) has no region."""
    return _predict_body(1, clicks, [accepted]) if accepted else _predict_body(2, clicks)


@dataclass
class EndToEndRow:
    size: str
    click_p50_ms: float  # triggering click, no accepted region of the label
    recall_click_p50_ms: float  # the same click with blob 1 accepted: object + proposals
    proposals: int  # regions returned besides the object's
    samples: int

    @property
    def added_percent(self) -> float:
        return 100 * (self.recall_click_p50_ms - self.click_p50_ms) / self.click_p50_ms


def _serving(image: np.ndarray, model_dir: str, checkpoint: Optional[str], **env: str):
    """(settings, service, test client) of the WSGI app serving ``image`` for every task URL."""
    env = {"MODEL_DIR": model_dir, "LOG_LEVEL": "WARNING", **env}
    if checkpoint:
        env["CHECKPOINT"] = checkpoint
    settings = Settings.from_env(env)
    service = ClickSegModel(settings, fetcher=SceneFetcher(image))
    return settings, service, create_app(settings, service).test_client()


def benchmark_size(size: Tuple[int, int], repeats: int, checkpoint: Optional[str] = None) -> EndToEndRow:
    image, labels = synthetic_scene(*size, objects=RECALL_SCENE_OBJECTS)
    height, width = labels.shape
    ys, xs = np.nonzero(labels == 2)
    row, col = float(np.median(ys)), float(np.median(xs))
    accepted = {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(labels == 1), "brushlabels": ["Object"]},
        "id": "accepted1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "origin": "manual",
    }
    with tempfile.TemporaryDirectory() as model_dir:
        _, service, client = _serving(image, model_dir, checkpoint)
        counter = iter(range(10**6))

        def post(with_exemplar: bool, clicks: int = 1) -> Tuple[float, int]:
            items = []
            for _ in range(clicks):  # a new object needs a new click place: a 9 x 9 grid of 2-pixel steps
                k = next(counter)
                items.append(_keypoint(row + 2 * (k % 9 - 4), col + 2 * (k // 9 % 9 - 4), height, width, f"kp{k}"))
            body = _body(items, accepted if with_exemplar else None)
            started = time.perf_counter()
            response = client.post("/predict", json=body)
            elapsed = 1000 * (time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"/predict answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
            return elapsed, len(response.get_json()["results"][0]["result"]) - 1

        # Open the sessions with a two-click object, as the editor with Auto-Accept off sends it: each
        # later lone click is then a new object after ✓ (the server warms the recall features meanwhile).
        post(True, clicks=2), post(False, clicks=2)
        deadline = time.monotonic() + 120
        for task_id in (1, 2):
            key = (PROJECT, task_id, IMAGE_URL, service.predictor.model_version)
            while time.monotonic() < deadline and service.interactive.sessions.cache.get(key).image_state.recall_features is None:
                time.sleep(0.05)
        post(False), post(True)  # warm-up of both paths
        plain, recall, found = [], [], []
        for _ in range(repeats):
            plain.append(post(False)[0])
            ms, proposals = post(True)
            recall.append(ms)
            found.append(proposals)
    return EndToEndRow(f"{size[0]}x{size[1]}", float(np.median(plain)), float(np.median(recall)),
                       int(np.median(found)), repeats)


def rss_mib() -> Tuple[float, float]:
    """(current, peak) resident memory of this process in MiB (Linux /proc)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def memory_run(size: Tuple[int, int], tasks: int, checkpoint: Optional[str] = None, every: int = 50) -> List[str]:
    """Table lines: RSS, peak RSS and session-cache bytes after every ``every`` tasks of one click each."""
    image, labels = synthetic_scene(*size, objects=RECALL_SCENE_OBJECTS)
    height, width = labels.shape
    ys, xs = np.nonzero(labels == 2)
    lines = ["tasks   RSS MiB   peak MiB   session cache MiB (budget)   sessions"]
    with tempfile.TemporaryDirectory() as model_dir:
        settings, service, client = _serving(image, model_dir, checkpoint,
                                             SESSION_CACHE_BYTES=os.environ.get("SESSION_CACHE_BYTES", ""))
        cache = service.interactive.sessions.cache
        for task_id in range(1, tasks + 1):
            click = _keypoint(float(np.median(ys)), float(np.median(xs)), height, width, f"kp{task_id}")
            response = client.post("/predict", json=_predict_body(task_id, [click], image=f"/data/upload/1/{task_id}.png"))
            if response.status_code != 200:
                raise RuntimeError(f"/predict answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
            if task_id % every == 0 or task_id == tasks:
                rss, peak = rss_mib()
                lines.append(f"{task_id:5d}  {rss:8.0f}  {peak:9.0f}   {cache.total_bytes / 2**20:10.0f} "
                             f"({settings.session_cache_bytes / 2**20:.0f}){'':12}{len(cache):5d}")
                print("  " + lines[-1], file=sys.stderr)
    return lines


def _brush(mask: np.ndarray, region_id: str, width: int, height: int) -> Dict[str, Any]:
    """A brush region of ``mask``'s RLE that declares ``width`` x ``height`` (the attack: a size it does not have)."""
    return {"original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Object"]},
            "id": region_id, "from_name": "tag", "to_name": "image", "type": "brushlabels", "origin": "manual"}


def hostile_run(size: Tuple[int, int], checkpoint: Optional[str] = None) -> List[str]:
    """Table lines: status, ms and extra peak MiB of each hostile request, after a normal click."""
    image, labels = synthetic_scene(*size, objects=RECALL_SCENE_OBJECTS)
    height, width = labels.shape
    ys, xs = np.nonzero(labels == 2)
    row, col = float(np.median(ys)), float(np.median(xs))
    small = np.zeros((64, 64), bool)
    small[8:40, 8:40] = True

    many = [_keypoint(row + (k % 21 - 10), col + (k // 21 % 21 - 10), height, width, f"kp{k}") for k in range(10_000)]
    cases = [
        ("a normal click", "/predict", _predict_body(1, [_keypoint(row, col, height, width, "kp")])),
        (f"a valid draft region of {width} x {height} (decoded)", "/predict",
         _predict_body(7, [_keypoint(row, col, height, width, "kp")], [_brush(labels == 1, "fine", width, height)])),
        ("a draft region declaring 32768 x 32768 (2^30 px)", "/predict",
         _predict_body(2, [_keypoint(row, col, height, width, "kp")], [_brush(small, "big", 32768, 32768)])),
        (f"a draft region declaring the image's {width} x {height}, RLE of 64 x 64", "/predict",
         _predict_body(3, [_keypoint(row, col, height, width, "kp")], [_brush(small, "odd", width, height)])),
        ("an ANNOTATION_CREATED region of 16384 x 16384", "/webhook", {
            "action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": LABEL_CONFIG},
            "task": {"id": 5, "project": 1, "data": {"image": IMAGE_URL}},
            "annotation": {"id": 5, "task": 5, "result": [_brush(small, "huge", 16384, 16384)]}}),
        ("10,000 keypoints in one context", "/predict", _predict_body(6, many)),
    ]
    lines = [f"{'request':<62} status       ms   extra peak MiB"]
    with tempfile.TemporaryDirectory() as model_dir:
        _, _, client = _serving(image, model_dir, checkpoint)
        client.post("/predict", json=_predict_body(99, [_keypoint(row, col, height, width, "kp")]))  # load the model
        for name, path, body in cases:
            tracemalloc.start()
            started = time.perf_counter()
            response = client.post(path, json=body)
            elapsed = 1000 * (time.perf_counter() - started)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            lines.append(f"{name:<62} {response.status_code:6d} {elapsed:8.0f}   {peak / 2**20:14.1f}")
            print("  " + lines[-1], file=sys.stderr)
    return lines


DECODE_FORMATS = ("JPEG", "PNG")


def reset_peak_rss() -> None:
    """Sets this process's peak RSS (VmHWM) to its current RSS (Linux /proc), so the next peak is
    what follows alone."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def decode_one(path: str, reduced: bool, checkpoint: Optional[str] = None) -> str:
    """One table line: the image file at ``path`` decoded as ``/predict`` decodes it (or at full size)
    and encoded by the predictor; ms of each and the peak RSS above the loaded model. Run in a fresh
    process, so the peak is this image's alone."""
    with open(path, "rb") as file:
        data = file.read()
    predictor = ClickSegPredictor.from_checkpoint(checkpoint or DEFAULT_CHECKPOINT)
    predictor.encode_image(np.zeros((64, 64, 3), np.uint8))  # warm: lazy allocations are not the image's
    reset_peak_rss()
    before, _ = rss_mib()
    started = time.perf_counter()
    decoded = decode_image(data, "benchmark", None, 10**9, predictor.max_working_side if reduced else None)
    decoded_at = time.perf_counter()
    predictor.encode_image(decoded.pixels, (decoded.height, decoded.width))
    encoded_at = time.perf_counter()
    _, peak = rss_mib()
    pixels = f"{decoded.pixels.shape[1]}x{decoded.pixels.shape[0]}"
    return (f"{'as /predict' if reduced else 'full size':<12}{pixels:>10}  {1000 * (decoded_at - started):9.0f}"
            f"  {1000 * (encoded_at - decoded_at):9.0f}  {peak - before:14.0f}")


def decode_run(sizes: Sequence[Tuple[int, int]], checkpoint: Optional[str] = None, threads: int = 2) -> List[str]:
    """Table lines of ``decode_one`` for every format and size, as /predict and at full size. The
    images are made and saved here, so their making is in no measured process."""
    lines = ["format size       MiB  decoded      pixels  decode ms  encode ms  extra peak MiB"]
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for size in sizes:
            image, _ = synthetic_scene(*size, objects=RECALL_SCENE_OBJECTS)
            for fmt in DECODE_FORMATS:
                paths[fmt, size] = os.path.join(folder, f"{size[0]}x{size[1]}.{fmt.lower()}")
                Image.fromarray(image).save(paths[fmt, size], format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            del image
        for (fmt, size), path in paths.items():
            for reduced in (False, True):
                command = [sys.executable, "-m", "backend.benchmark", "--decode-one", path, "reduced" if reduced else "full",
                           "--threads", str(threads)] + (["--checkpoint", checkpoint] if checkpoint else [])
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-500:]}")
                lines.append(f"{fmt:<5} {size[0]}x{size[1]:<6} {os.path.getsize(path) / 2**20:7.1f}  "
                             + done.stdout.strip().splitlines()[-1])
                print("  " + lines[-1], file=sys.stderr)
    return lines


def format_table(rows: Sequence[EndToEndRow]) -> str:
    lines = ["size        /predict p50 (ms)  with recall p50 (ms)  added   proposals"]
    for r in rows:
        lines.append(f"{r.size:<11} {r.click_p50_ms:17.1f}  {r.recall_click_p50_ms:20.1f}  {r.added_percent:+5.0f}%  {r.proposals:9d}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backend.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: the server's default)")
    p.add_argument("--sizes", default="640x480,1024x768,2048x1365,4000x3000", help="comma-separated WIDTHxHEIGHT")
    p.add_argument("--repeats", type=int, default=5, help="timed clicks per size and setting")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--memory-tasks", type=int, default=0,
                   help="measure memory over this many tasks (one click each) on the first size instead")
    p.add_argument("--hostile", action="store_true",
                   help="measure the time and extra peak memory of hostile payloads on the first size instead")
    p.add_argument("--decode", action="store_true",
                   help="measure decoding and encoding JPEG and PNG images of each size instead (peak RSS each)")
    p.add_argument("--decode-one", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    if args.decode_one:  # one case of --decode, in its own process
        path, mode = args.decode_one
        print(decode_one(path, mode == "reduced", args.checkpoint))
        return 0
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine_info().items()))
    if args.memory_tasks < 0:
        raise SystemExit("--memory-tasks must be >= 0")
    if args.memory_tasks:
        print("\n".join(memory_run(parse_sizes(args.sizes)[0], args.memory_tasks, args.checkpoint)))
        return 0
    if args.hostile:
        print("\n".join(hostile_run(parse_sizes(args.sizes)[0], args.checkpoint)))
        return 0
    if args.decode:
        print("\n".join(decode_run(parse_sizes(args.sizes), args.checkpoint, args.threads)))
        return 0
    rows: List[EndToEndRow] = []
    for size in parse_sizes(args.sizes):
        rows.append(benchmark_size(size, args.repeats, args.checkpoint))
        print(f"  done {rows[-1].size}: {asdict(rows[-1])}", file=sys.stderr)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
