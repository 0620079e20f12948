"""The standard evaluation played through Label Studio's protocol: what an annotator gets from ``/predict``.

The clicker of ``model.evaluation.evaluate`` (first click on the object's interior-most pixel, each next one
on the centre of the larger error region of the *returned brush mask*) sends every click to
``POST /predict`` exactly as Label Studio 1.23.2's editor does with Auto-Accept off: all smart
keypoints of the object so far, in percent of the image, with ``is_positive``; no saved masks.
The answer's brush RLE is decoded and compared with the ground truth. Same dataset specs, table,
JSON and plot as ``model.evaluation.evaluate``, so the two tables can be compared row by row.

``--multi-object`` plays scenes instead: on each image with at least three objects, object 1 is
clicked until IoU >= ``--accept-iou`` (or ``--max-clicks``), then accepted the way the editor
reports it (✓ deletes the keypoints, and the accepted region appears in the task's draft from the
next request on), then objects 2 and 3 the same way, on one task.

Targets: the WSGI app in-process (default; images served from memory), or a running backend
(``--backend-url``, with ``--local-files-root`` = the backend's ``LOCAL_FILES_DOCUMENT_ROOT``, where
the images are written and read back as ``/data/local-files/?d=...``).

    python -m backend.evaluate --dataset bsds500:../shared/data/bsds500:val --max-objects 300 \\
        --stop-at-iou 0.9 --out-dir artifacts/eval --label product-bsds300
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import requests
from PIL import Image

from model.clicks import Click
from model.data import open_objects
from model.evaluation.evaluate import BASELINES, EvalResult, ObjectResult, baseline_run, load_run, report
from model.evaluation.protocol import Clicker, iou, mask_overlap

from .app import create_app
from .config import Settings
from .images import DecodedImage
from .rle import rle_to_mask
from .service import ClickSegModel

PROJECT = "1.1795419391"  # /predict's "id.timestamp" form
LABEL = "Object"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
</View>"""

Post = Callable[[Dict[str, Any]], Dict[str, Any]]  # /predict body -> answer JSON


# --- what the editor sends -----------------------------------------------------------------------


def keypoint_item(click: Click, height: int, width: int, region_id: str) -> Dict[str, Any]:
    """A smart keypoint on the centre of the click's pixel, serialised as the editor does."""
    return {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": (click.x + 0.5) / width * 100, "y": (click.y + 0.5) / height * 100, "width": 0.26,
                  "keypointlabels": [LABEL], "labels": [LABEL]},
        "is_positive": click.is_positive, "id": region_id, "from_name": "tag2", "to_name": "image",
        "type": "keypointlabels", "origin": "manual",
    }


def predict_body(task_id: int, image_url: str, keypoints: Sequence[Dict[str, Any]],
                 drafts: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    task = {"id": task_id, "project": 1, "data": {"image": image_url}, "annotations": [],
            "drafts": [{"id": task_id, "user": "eval@example.com", "result": list(drafts), "task": task_id}]
            if drafts else [], "predictions": []}
    return {"tasks": [task], "project": PROJECT, "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": list(keypoints)}}}


def object_region(answer: Mapping[str, Any], height: int, width: int) -> Dict[str, Any]:
    """The clicked object's brush region (the first; exemplar proposals follow it)."""
    try:
        region = answer["results"][0]["result"][0]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"/predict answered no brush region: {str(answer)[:300]}") from None
    if (region.get("original_height"), region.get("original_width")) != (height, width):
        raise RuntimeError(f"/predict answered a region of {region.get('original_width')}x"
                           f"{region.get('original_height')} for a {width}x{height} image")
    return region


def region_mask(region: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    return rle_to_mask(region["value"]["rle"], height, width)


# --- one object: the standard clicker against /predict ------------------------------------------


class ObjectSession:
    """One object's clicks on one task, sent as growing contexts."""

    def __init__(self, post: Post, task_id: int, image_url: str, gt: np.ndarray, name: str):
        self.post, self.task_id, self.image_url, self.gt = post, task_id, image_url, gt
        self.height, self.width = gt.shape
        self.clicker = Clicker(gt)
        self.keypoints: List[Dict[str, Any]] = []
        self.name = name
        self.ious: List[float] = []
        self.seconds: List[float] = []
        self.region: Optional[Dict[str, Any]] = None
        self.mask: Optional[np.ndarray] = None
        self.first_click: Optional[Dict[str, float]] = None

    def click(self, drafts: Sequence[Dict[str, Any]] = ()) -> float:
        """Make the next click, send it, and return the IoU of the answer."""
        click = self.clicker.make_next_click(self.mask)
        self.keypoints.append(keypoint_item(click, self.height, self.width, f"{self.name}-{len(self.keypoints)}"))
        body = predict_body(self.task_id, self.image_url, self.keypoints, drafts)
        started = time.perf_counter()
        answer = self.post(body)
        self.seconds.append(time.perf_counter() - started)
        self.region = object_region(answer, self.height, self.width)
        self.mask = region_mask(self.region, self.height, self.width)
        self.ious.append(iou(self.mask, self.gt))
        if len(self.ious) == 1:
            self.first_click = mask_overlap(self.mask, self.gt)
        return self.ious[-1]

    def result(self, image_id: str, max_clicks: int) -> ObjectResult:
        padded = self.ious + [self.ious[-1]] * (max_clicks - len(self.ious))
        return ObjectResult(self.name, image_id, padded, [(c.y, c.x, c.is_positive) for c in self.clicker.clicks],
                            self.seconds, 0.0, first_click=self.first_click)


def evaluate_through_protocol(post: Post, objects: Sequence[Any], image_url: Callable[[Any], str],
                              max_clicks: int = 20, stop_at_iou: Optional[float] = None,
                              progress: bool = False) -> EvalResult:
    """``model.evaluation.evaluate.evaluate_objects`` through ``/predict``: one task per object, so each starts clean."""
    if not objects:
        raise ValueError("evaluate_through_protocol: no objects to evaluate")
    results = []
    for index, sample in enumerate(objects, start=1):
        gt = np.asarray(sample.mask)  # 1 object, 0 background, 128 ignored (as model.evaluation.evaluate)
        session = ObjectSession(post, index, image_url(sample), gt, f"o{index}")
        for _ in range(max_clicks):
            if session.click() >= (stop_at_iou if stop_at_iou is not None else 2.0):
                break
        results.append(session.result(sample.image_id, max_clicks))
        if progress and index % 10 == 0:
            print(f"  {index}/{len(objects)} objects", file=sys.stderr)
    return EvalResult(results, max_clicks, {"max_clicks": max_clicks, "stop_at_iou": stop_at_iou,
                                            "protocol": "Label Studio /predict, Auto-Accept off"})


def evaluate_scenes(post: Post, objects: Sequence[Any], image_url: Callable[[Any], str], max_clicks: int = 20,
                    accept_iou: float = 0.9, per_scene: int = 3, progress: bool = False) -> EvalResult:
    """Objects 1..``per_scene`` of each image with that many objects, clicked one after another on one task."""
    scenes: Dict[str, List[Any]] = OrderedDict()
    for sample in objects:
        scenes.setdefault(sample.image_id, []).append(sample)
    results = []
    scenes_played = [s for s in scenes.values() if len(s) >= per_scene]
    if not scenes_played:
        raise ValueError(f"no image has {per_scene} objects for --multi-object")
    for task_id, scene in enumerate(scenes_played, start=1):
        accepted: List[Dict[str, Any]] = []  # the draft's brush regions
        for k, sample in enumerate(scene[:per_scene], start=1):
            gt = np.asarray(sample.mask)  # 1 object, 0 background, 128 ignored (as model.evaluation.evaluate)
            session = ObjectSession(post, task_id, image_url(sample), gt, f"t{task_id}o{k}")
            for _ in range(max_clicks):
                if session.click(drafts=accepted) >= accept_iou:
                    break
            # ✓: the editor deletes the keypoints (the next object's context starts empty) and the
            # accepted region reaches the draft with the next save.
            accepted.append({**session.region, "origin": "prediction"})
            results.append(session.result(sample.image_id, max_clicks))
        if progress:
            print(f"  scene {task_id}/{len(scenes_played)}", file=sys.stderr)
    return EvalResult(results, max_clicks, {"max_clicks": max_clicks, "stop_at_iou": accept_iou,
                                            "protocol": f"Label Studio /predict, {per_scene} objects per task, "
                                                        f"each accepted with ✓ at IoU {accept_iou}"})


# --- targets ---------------------------------------------------------------------------------------


class MemoryFetcher:
    """Serves the evaluation's images from memory by URL (the WSGI target's image access)."""

    def __init__(self) -> None:
        self.images: Dict[str, np.ndarray] = {}

    def set_setup_access_token(self, token) -> None:
        pass

    def fetch_decoded(self, url, task_id=None, project_id=None, min_side=None) -> DecodedImage:
        """At full size: the evaluation's images are arrays, as ``model.evaluation.evaluate`` reads them."""
        return DecodedImage(self.images[url], *self.images[url].shape[:2])


def wsgi_target(env: Mapping[str, str]) -> Tuple[Post, Callable[[Any], str]]:
    """An in-process backend (``create_app``) configured by ``env``; images served from memory."""
    settings = Settings.from_env(dict(env))
    fetcher = MemoryFetcher()
    client = create_app(settings, ClickSegModel(settings, fetcher=fetcher)).test_client()
    urls: Dict[int, str] = {}

    def image_url(sample: Any) -> str:
        key = id(sample.image)
        if key not in urls:
            urls[key] = f"/data/upload/eval/{len(urls)}.png"
            fetcher.images[urls[key]] = sample.image
        return urls[key]

    def post(body: Dict[str, Any]) -> Dict[str, Any]:
        response = client.post("/predict", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"/predict answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
        return response.get_json()

    return post, image_url


def url_target(backend_url: str, local_files_root: Path, auth: Optional[Tuple[str, str]]) -> Tuple[Post, Callable[[Any], str]]:
    """A running backend; images written as PNG under its LOCAL_FILES_DOCUMENT_ROOT."""
    http = requests.Session()
    http.auth = auth
    written: Dict[int, str] = {}
    folder = Path(tempfile.mkdtemp(prefix="clickseg-eval-", dir=local_files_root))

    def image_url(sample: Any) -> str:
        key = id(sample.image)
        if key not in written:
            path = folder / f"{len(written)}.png"
            Image.fromarray(sample.image).save(path)
            written[key] = f"/data/local-files/?d={path.relative_to(local_files_root)}"
        return written[key]

    def post(body: Dict[str, Any]) -> Dict[str, Any]:
        response = http.post(f"{backend_url.rstrip('/')}/predict", json=body, timeout=300)
        if response.status_code != 200:
            raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:300]}")
        return response.json()

    return post, image_url


# --- CLI -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="as model.evaluation.evaluate: bsds500:<root>[:val], wgisd:<root>, folder:<root>")
    p.add_argument("--max-objects", type=int, default=None, help="the same fixed random sample as model.evaluation.evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--stop-at-iou", type=float, default=None, help="as model.evaluation.evaluate")
    p.add_argument("--checkpoint", default=None, help="CHECKPOINT of the in-process backend (default: the embedded one)")
    p.add_argument("--cfr-steps", type=int, default=None, help="CFR_STEPS of the in-process backend")
    p.add_argument("--click-refinement", type=int, default=None, help="CLICK_REFINEMENT of the in-process backend")
    p.add_argument("--all-components", action="store_true",
                   help="CLICKED_COMPONENTS_ONLY=false for the in-process backend: keep unclicked mask parts")
    p.add_argument("--backend-url", default=None, help="evaluate a running backend instead of the in-process one")
    p.add_argument("--local-files-root", default=None, help="with --backend-url: its LOCAL_FILES_DOCUMENT_ROOT")
    p.add_argument("--basic-auth", default=None, help="with --backend-url: USER:PASS")
    p.add_argument("--multi-object", action="store_true", help="play three-object scenes on one task each")
    p.add_argument("--accept-iou", type=float, default=0.9, help="with --multi-object: IoU at which an object is accepted")
    p.add_argument("--label", default=None)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--compare", nargs="*", default=[], help="evaluation JSONs (e.g. model.evaluation.evaluate's) to show beside")
    p.add_argument("--baseline", choices=sorted(BASELINES), default=None,
                   help="as model.evaluation.evaluate: the classical baseline on the same objects (cached in --out-dir)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_objects is not None and args.max_objects < 1:
        raise SystemExit(f"--max-objects must be >= 1, got {args.max_objects}")
    if args.max_clicks < 1:
        raise SystemExit(f"--max-clicks must be >= 1, got {args.max_clicks}")
    if args.backend_url and not args.local_files_root:
        raise SystemExit("--backend-url needs --local-files-root (the backend's LOCAL_FILES_DOCUMENT_ROOT)")
    for flag, value in (("--cfr-steps", args.cfr_steps), ("--click-refinement", args.click_refinement)):
        if value is not None and value < 0:
            raise SystemExit(f"{flag} must be >= 0, got {value}")
        if value is not None and args.backend_url:
            raise SystemExit(f"{flag} sets the in-process backend; a running backend (--backend-url) "
                             "has its own CFR_STEPS and CLICK_REFINEMENT")
    if args.all_components and args.backend_url:
        raise SystemExit("--all-components sets the in-process backend; a running backend (--backend-url) "
                         "has its own CLICKED_COMPONENTS_ONLY")
    if args.baseline and args.multi_object:
        raise SystemExit("--baseline plays single objects; it does not apply to --multi-object")
    compare = [load_run(p) for p in args.compare]

    objects = open_objects(args.dataset, max_objects=args.max_objects, seed=args.seed)
    if not objects:
        raise SystemExit(f"dataset {args.dataset} holds no objects")
    if args.backend_url:
        auth = tuple(args.basic_auth.split(":", 1)) if args.basic_auth else None
        post, image_url = url_target(args.backend_url, Path(args.local_files_root).resolve(), auth)
        target = args.backend_url
    else:
        model_dir = tempfile.mkdtemp(prefix="clickseg-eval-model-dir-")
        # One object per task has no exemplar to recall: recall off saves its background warm-up.
        env = {"MODEL_DIR": model_dir, "LOG_LEVEL": "WARNING", "DEVICE": "cpu",
               "RECALL": "true" if args.multi_object else "false"}
        if args.checkpoint:
            env["CHECKPOINT"] = args.checkpoint
        if args.cfr_steps is not None:
            env["CFR_STEPS"] = str(args.cfr_steps)
        if args.click_refinement is not None:
            env["CLICK_REFINEMENT"] = str(args.click_refinement)
        if args.all_components:
            env["CLICKED_COMPONENTS_ONLY"] = "false"
        post, image_url = wsgi_target(env)
        target = "wsgi"
    print(f"playing {len(objects)} objects of {args.dataset} through /predict ({target})", file=sys.stderr)
    if args.multi_object:
        result = evaluate_scenes(post, objects, image_url, args.max_clicks, args.accept_iou, progress=True)
    else:
        result = evaluate_through_protocol(post, objects, image_url, args.max_clicks, args.stop_at_iou, progress=True)
    result.settings.update({
        "label": args.label or ("product-multi-object" if args.multi_object else "product"),
        "dataset": args.dataset, "max_objects": args.max_objects, "seed": args.seed, "target": target,
        "checkpoint": args.checkpoint, "cfr_steps": args.cfr_steps, "click_refinement": args.click_refinement,
        "all_components": args.all_components,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    baseline = None
    if args.baseline:
        baseline = baseline_run(args.baseline, objects, args.out_dir, args.dataset, args.max_clicks,
                                args.stop_at_iou, progress=True)
    report(result, args.out_dir, compare, baseline)
    for run in compare:
        print(agreement(result.summary(), run))
    return 0


def agreement(summary: Mapping[str, Any], run: Any) -> str:
    """How this run's numbers agree with a compared run's (e.g. ``model.evaluation.evaluate`` on the same objects)."""
    ours, theirs = np.asarray(summary["miou_curve"]), np.asarray(run.summary["miou_curve"])
    k = min(len(ours), len(theirs))
    noc = all(summary[f"noc@{t}"] == run.summary[f"noc@{t}"] for t in (85, 90, 95))
    return (f"vs {run.label}: NoC@85/90/95 {'identical' if noc else 'differ'}; "
            f"max |mIoU@k difference| over k = 1..{k}: {float(np.abs(ours[:k] - theirs[:k]).max()):.4f}")


if __name__ == "__main__":
    sys.exit(main())
