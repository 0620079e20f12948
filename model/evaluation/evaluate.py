"""Standard interactive-segmentation evaluation (RITM / SimpleClick / CFR-ICL protocol).

For every object a ``Clicker`` places the clicks: the first at the object pixel
farthest from its boundary, each later one at the centre of the larger error
region of the previous prediction (thresholded at 0.49, as in CFR-ICL).
The previous probability map is fed back as ``prev_mask``. The IoU after each
of ``max_clicks`` clicks gives:

- NoC@85/90/95: clicks needed to first reach that IoU (``max_clicks`` if never);
- NoF@85/90: objects that never reach that IoU within ``max_clicks`` clicks;
- mIoU@k, k = 1..max_clicks: mean IoU over objects after k clicks.

``--stop-at-iou T`` stops an object once its IoU reaches T and pads the rest of
its curve with the last IoU. NoC@thr and NoF@thr stay exact for thr <= T; NoC
and NoF above T, and mIoU@k after the stop, then assume the IoU would have
stayed put (an approximation, recorded in the JSON settings).

    python -m model.evaluation.evaluate --dataset bsds500:../shared/data/bsds500:val --max-objects 100 \
        --out-dir runs/eval --label cfr-on --compare runs/eval/cfr-off.json
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..clicks import MASK_THRESHOLD, Click
from ..data import open_objects
from ..predictor import DEFAULT_CHECKPOINT, ClickSegPredictor
from .grabcut import GrabCutPredictor
from .machine import machine_info
from .protocol import Clicker, by_object_size, iou, mask_overlap, summarize

TABLE_MIOU_CLICKS = (1, 3, 5, 10, 20)


class Predictor(Protocol):
    """What the evaluation needs from ``model.predictor.ClickSegPredictor``."""

    model_version: str

    def encode_image(self, image: np.ndarray) -> Any: ...

    def predict(self, state: Any, clicks: Sequence[Click], prev_mask: Optional[np.ndarray] = None) -> np.ndarray: ...


# --------------------------------------------------------------------------- evaluation loop


@dataclass
class ObjectResult:
    """One object's run: ``ious[k-1]`` is the IoU after k clicks (padded after an early stop)."""

    name: str
    image_id: str
    ious: List[float]
    clicks: List[Tuple[float, float, bool]]  # (y, x, is_positive) actually made
    click_seconds: List[float]  # predict() time of each click made
    encode_seconds: float  # encode_image() time (0.0 when the image's encoding was reused)
    refined_clicks: List[int] = field(default_factory=list)  # click numbers (1-based) that ran click refinement
    first_click: Optional[Dict[str, float]] = None  # protocol.mask_overlap of the first click's mask


@dataclass
class EvalResult:
    objects: List[ObjectResult]
    max_clicks: int
    settings: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> Dict[str, Any]:
        summary = summarize([o.ious for o in self.objects], self.max_clicks)
        click_seconds = [s for o in self.objects for s in o.click_seconds]
        encodes = [o.encode_seconds for o in self.objects if o.encode_seconds > 0]
        summary["clicks_made"] = len(click_seconds)
        summary["refined_clicks"] = sum(len(o.refined_clicks) for o in self.objects)
        summary["mean_seconds_per_click"] = float(np.mean(click_seconds))
        summary["mean_encode_seconds"] = float(np.mean(encodes)) if encodes else 0.0
        if all(o.first_click is not None for o in self.objects):
            summary["first_click_by_size"] = by_object_size([o.first_click for o in self.objects],
                                                            [o.ious[0] for o in self.objects])
        return summary

    def to_json(self) -> Dict[str, Any]:
        return {"settings": self.settings, "summary": self.summary(), "objects": [asdict(o) for o in self.objects]}


def evaluate_object(
    predictor: Predictor,
    state: Any,
    gt: np.ndarray,
    max_clicks: int = 20,
    stop_at_iou: Optional[float] = None,
    pred_threshold: float = MASK_THRESHOLD,
) -> Tuple[List[float], List[Click], List[float], List[int], Dict[str, float]]:
    """Click on one object; returns (IoU curve of length max_clicks, clicks made, predict seconds per
    click, the numbers of the clicks that ran click refinement, the first click's ``mask_overlap``)."""
    clicker = Clicker(gt)
    ious: List[float] = []
    seconds: List[float] = []
    refined: List[int] = []
    pred: Optional[np.ndarray] = None
    prev_mask: Optional[np.ndarray] = None
    first_click: Dict[str, float] = {}
    for _ in range(max_clicks):
        clicker.make_next_click(pred)
        start = time.perf_counter()
        prob = predictor.predict(state, list(clicker.clicks), prev_mask)
        seconds.append(time.perf_counter() - start)
        if getattr(predictor, "last_click_refined", False):
            refined.append(len(clicker.clicks))
        prob = np.asarray(prob)
        if prob.shape != gt.shape:
            raise ValueError(f"predictor returned a {prob.shape} map for a {gt.shape} ground truth")
        pred = prob > pred_threshold
        prev_mask = prob
        ious.append(iou(pred, gt))
        if len(ious) == 1:
            first_click = mask_overlap(pred, gt)
        if stop_at_iou is not None and ious[-1] >= stop_at_iou:
            break
    padded = ious + [ious[-1]] * (max_clicks - len(ious))
    return padded, list(clicker.clicks), seconds, refined, first_click


def evaluate_objects(
    predictor: Predictor,
    objects: Sequence[Any],
    max_clicks: int = 20,
    stop_at_iou: Optional[float] = None,
    pred_threshold: float = MASK_THRESHOLD,
    progress: bool = False,
) -> EvalResult:
    """Run the protocol on ``objects`` (each with ``.image`` (H,W,3) uint8, ``.mask`` (H,W), ``.name``, ``.image_id``).

    Consecutive objects sharing one image array reuse its ``encode_image`` state.
    """
    if len(objects) == 0:
        raise ValueError("evaluate_objects: no objects to evaluate")
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
    if stop_at_iou is not None and not 0.0 < stop_at_iou <= 1.0:
        raise ValueError(f"stop_at_iou must lie in (0, 1], got {stop_at_iou}")
    iterator = objects
    if progress:
        iterator = tqdm(objects, desc="objects", file=sys.stderr)
    results = []
    last_image, state = None, None
    for sample in iterator:
        mask = np.asarray(sample.mask)
        if mask.shape != sample.image.shape[:2]:
            raise ValueError(f"object {sample.name}: mask {mask.shape} does not match image {sample.image.shape[:2]}")
        encode_seconds = 0.0
        if sample.image is not last_image:
            start = time.perf_counter()
            state = predictor.encode_image(sample.image)
            encode_seconds = time.perf_counter() - start
            last_image = sample.image
        ious, clicks, seconds, refined, first_click = evaluate_object(predictor, state, mask, max_clicks,
                                                                      stop_at_iou, pred_threshold)
        results.append(ObjectResult(
            name=sample.name,
            image_id=sample.image_id,
            ious=ious,
            clicks=[(c.y, c.x, c.is_positive) for c in clicks],
            click_seconds=seconds,
            encode_seconds=encode_seconds,
            refined_clicks=refined,
            first_click=first_click,
        ))
    settings = {"max_clicks": max_clicks, "stop_at_iou": stop_at_iou, "pred_threshold": pred_threshold,
                "model_version": getattr(predictor, "model_version", None)}
    return EvalResult(results, max_clicks, settings)


# --------------------------------------------------------------------------- reporting


@dataclass
class Run:
    """A labelled summary, from this evaluation or a ``--compare`` JSON."""

    label: str
    summary: Dict[str, Any]


def load_run(path: str | Path) -> Run:
    """Read a JSON written by this command; ValueError if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        label = data["settings"]["label"]
        summary = data["summary"]
        if not isinstance(summary["miou_curve"], list) or not summary["miou_curve"]:
            raise KeyError("summary.miou_curve")
    except FileNotFoundError as exc:
        raise ValueError(f"--compare: {path} does not exist") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"--compare: {path} is not an evaluation JSON written by model.evaluation.evaluate ({exc})") from exc
    return Run(label, summary)


def format_table(runs: Sequence[Run]) -> str:
    """Plain-text table, one row per run."""
    columns = ["run", "objects", "NoC@85", "NoC@90", "NoC@95", "NoF@85", "NoF@90"]
    columns += [f"mIoU@{k}" for k in TABLE_MIOU_CLICKS] + ["s/click"]
    rows = []
    for run in runs:
        s, curve = run.summary, run.summary["miou_curve"]
        row = [run.label, str(s["num_objects"])]
        row += [f"{s[f'noc@{t}']:.2f}" for t in (85, 90, 95)]
        row += [str(s[f"nof@{t}"]) for t in (85, 90)]
        row += [f"{curve[k - 1]:.4f}" if k <= len(curve) else "-" for k in TABLE_MIOU_CLICKS]
        row += [f"{s['mean_seconds_per_click']:.3f}"]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def format_first_click_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``summary["first_click_by_size"]`` as text: one line per bin of the object's share of the image."""
    lines = ["first click by object size (share of the image): objects, mIoU@1, precision, recall"]
    for r in rows:
        low, high = r["share"]
        lines.append(f"  {low * 100:4.0f}-{high * 100:3.0f} %  {r['objects']:5d}  {r['iou']:.3f}  "
                     f"{r['precision']:.3f}  {r['recall']:.3f}")
    return "\n".join(lines)


def plot_miou(runs: Sequence[Run], path: str | Path, title: str = "") -> Path:
    """PNG of mIoU against the number of clicks, one line per run."""
    import matplotlib  # the [eval] extra: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for run in runs:
        curve = run.summary["miou_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=run.label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("mIoU")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the classical baseline

BASELINES = {"grabcut": GrabCutPredictor}
BASELINE_TARGET = 0.30  # the model's NoC@90 must be at least this much below the baseline's


def cached_evaluation(path: Path, key: Mapping[str, Any], label: str, compute: Callable[[], EvalResult]) -> Run:
    """The run stored at ``path`` if its ``settings.cache_key`` equals ``key``; else ``compute()``, stored there."""
    key = json.loads(json.dumps(key))  # as it reads back
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data["settings"].get("cache_key") == key:
                return Run(label, data["summary"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass  # an unreadable cache is recomputed
    result = compute()
    result.settings.update({"label": label, "cache_key": key})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=1))
    tmp.replace(path)
    return Run(label, result.summary())


def baseline_run(name: str, objects: Sequence[Any], out_dir: str | Path, dataset: str, max_clicks: int = 20,
                 stop_at_iou: Optional[float] = None, progress: bool = False) -> Run:
    """The baseline ``name`` on ``objects``, cached in ``out_dir`` (it does not depend on the checkpoint).

    The cache key holds the baseline's settings and every object's name, so a different sample
    or clicker setting is evaluated afresh.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    predictor = BASELINES[name]()
    key = {"baseline": name, "settings": vars(predictor), "dataset": dataset, "max_clicks": max_clicks,
           "stop_at_iou": stop_at_iou, "objects": [o.name for o in objects]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(out_dir) / f"baseline-{name}-{safe_filename(dataset)[-60:]}-{digest}.json"

    def compute() -> EvalResult:
        result = evaluate_objects(predictor, objects, max_clicks, stop_at_iou, progress=progress)
        result.settings["dataset"] = dataset
        return result

    return cached_evaluation(path, key, f"{name} (baseline)", compute)


def noc90_change(model: Mapping[str, Any], baseline: Mapping[str, Any]) -> float:
    """The model's NoC@90 relative to the baseline's: -0.3 is 30 % fewer clicks."""
    theirs = baseline["noc@90"]
    return (model["noc@90"] - theirs) / theirs if theirs else 0.0


def versus_baseline(model: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """One line: the model's NoC@90 against the baseline's, and whether it meets the target."""
    ours, theirs = model["noc@90"], baseline["noc@90"]
    change = noc90_change(model, baseline)
    verdict = "meets" if change <= -BASELINE_TARGET else "misses"
    return (f"NoC@90 {ours:.2f} vs the baseline's {theirs:.2f}: {abs(change) * 100:.1f} % "
            f"{'below' if change < 0 else 'above'} ({verdict} the target of {BASELINE_TARGET * 100:.0f} % below)")


def safe_filename(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "run"


def write_outputs(result: EvalResult, out_dir: str | Path, compare: Sequence[Run] = ()) -> Tuple[Path, Path, str]:
    """Write ``<label>.json`` and ``<label>.png`` (this run + compared runs); return (json, png, table)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = result.settings.get("label") or "run"
    stem = safe_filename(label)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result.to_json(), indent=1))
    runs = [Run(label, result.summary()), *compare]
    png_path = plot_miou(runs, out_dir / f"{stem}.png", title=str(result.settings.get("dataset", "")))
    return json_path, png_path, format_table(runs)


def report(result: EvalResult, out_dir: str | Path, compare: Sequence[Run] = (), baseline: Optional[Run] = None) -> None:
    """Write the JSON and plot, print the table (stdout) and where they went (stderr).

    ``baseline`` is shown as the second row, with a line on how the run compares with it.
    """
    json_path, png_path, table = write_outputs(result, out_dir, ([baseline] if baseline else []) + list(compare))
    summary = result.summary()
    print(table)
    if baseline:
        print(versus_baseline(summary, baseline.summary))
    if "first_click_by_size" in summary:
        print(format_first_click_table(summary["first_click_by_size"]))
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluation.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: the embedded default)")
    p.add_argument("--dataset", required=True, help="bsds500:<root>[:val], wgisd:<root> or folder:<root>")
    p.add_argument("--max-objects", type=int, default=None, help="evaluate a fixed random sample of N objects")
    p.add_argument("--seed", type=int, default=0, help="seed of the object sample")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--stop-at-iou", type=float, default=None,
                   help="stop an object once IoU >= this and pad its curve with the last IoU (faster; "
                        "NoC/NoF above this threshold and later mIoU@k become approximate)")
    cfr = p.add_mutually_exclusive_group()
    cfr.add_argument("--cfr-steps", type=int, default=None, help="CFR refinement steps (default: the predictor's)")
    cfr.add_argument("--no-cfr", action="store_true", help="disable CFR (cfr_steps=0)")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--no-zoom-in", action="store_true", help="disable zoom-in on the object")
    add_test_time_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default=None, help="name of this run in the table, plot and file names")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--compare", nargs="*", default=[], help="evaluation JSONs to show beside this run")
    p.add_argument("--baseline", choices=sorted(BASELINES), default=None,
                   help="also run this classical baseline on the same objects (cached in --out-dir)")
    return p


def add_test_time_arguments(parser: argparse.ArgumentParser) -> None:
    """``--click-refinement`` and ``--all-components``, shared with ``model.evaluation.suite``; read by
    ``load_predictor``."""
    parser.add_argument("--click-refinement", type=int, default=None, metavar="ITERATIONS",
                        help="f-BRS-style click-consistency refinement: L-BFGS iterations when a click is "
                             "contradicted (0 = off; default: the predictor's)")
    parser.add_argument("--all-components", action="store_true",
                        help="keep the mask's parts that hold no positive click (default: only the clicked "
                             "parts, model.clicked_components)")


def load_predictor(checkpoint: str, device: str, args: argparse.Namespace,
                   options: Dict[str, Any]) -> ClickSegPredictor:
    """The CLIs' predictor: ``options`` plus the test-time arguments (added to ``options``); a bad
    value or combination exits with the predictor's message."""
    if args.click_refinement is not None:
        if args.click_refinement < 0:
            raise SystemExit(f"--click-refinement must be >= 0, got {args.click_refinement}")
        options["click_refinement_iterations"] = args.click_refinement
    if args.all_components:
        options["clicked_components_only"] = False
    try:
        return ClickSegPredictor.from_checkpoint(checkpoint, device=device, **options)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def default_label(args: argparse.Namespace, checkpoint: str) -> str:
    cfr = "cfr-off" if args.no_cfr else ("cfr" if args.cfr_steps is None else f"cfr{args.cfr_steps}")
    parts = [Path(checkpoint).stem, cfr] + (["flip"] if args.flip else []) + (["nozoom"] if args.no_zoom_in else [])
    parts += [] if args.click_refinement is None else [f"refine{args.click_refinement}"]
    parts += ["all-components"] if args.all_components else []
    return "-".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_objects is not None and args.max_objects < 1:
        raise SystemExit(f"--max-objects must be >= 1, got {args.max_objects}")
    if args.cfr_steps is not None and args.cfr_steps < 0:
        raise SystemExit(f"--cfr-steps must be >= 0, got {args.cfr_steps}")
    compare = [load_run(p) for p in args.compare]  # fail before the long run

    checkpoint = str(args.checkpoint or DEFAULT_CHECKPOINT)
    options: Dict[str, Any] = {"zoom_in": not args.no_zoom_in, "flip": args.flip}
    if args.no_cfr:
        options["cfr_steps"] = 0
    elif args.cfr_steps is not None:
        options["cfr_steps"] = args.cfr_steps
    predictor = load_predictor(checkpoint, args.device, args, options)
    objects = open_objects(args.dataset, max_objects=args.max_objects, seed=args.seed)
    if not objects:
        raise SystemExit(f"dataset {args.dataset} holds no objects")
    print(f"evaluating {len(objects)} objects of {args.dataset} with {predictor.model_version} "
          f"({options}, device={args.device}, torch threads={torch.get_num_threads()})", file=sys.stderr)

    result = evaluate_objects(predictor, objects, args.max_clicks, args.stop_at_iou, progress=True)
    result.settings.update({
        "label": args.label or default_label(args, checkpoint),
        "checkpoint": checkpoint,
        "dataset": args.dataset,
        "max_objects": args.max_objects,
        "seed": args.seed,
        "predictor_options": {**options, "cfr_steps": predictor.cfr_steps,
                              "click_refinement_iterations": predictor.click_refinement_iterations,
                              "clicked_components_only": predictor.clicked_components_only},
        "device": args.device,
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    baseline = None
    if args.baseline:
        print(f"baseline {args.baseline} on the same {len(objects)} objects", file=sys.stderr)
        baseline = baseline_run(args.baseline, objects, args.out_dir, args.dataset, args.max_clicks,
                                args.stop_at_iou, progress=True)
    report(result, args.out_dir, compare, baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
