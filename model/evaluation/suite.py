"""The evaluation suite: one checkpoint beside the GrabCut baseline on every evaluation set.

Sets (``--data-root`` = ``../shared/data``), each with the standard clicker of ``model.evaluation.evaluate``
(sized so that the suite, GrabCut included, takes about 75 minutes on 2 CPU cores as two processes
over disjoint ``--sets``; GrabCut takes ~0.5 s per click, the model ~0.1 s):

- ``bsds500-sod-val``: the 89 bsds500-sod object masks on BSDS500 ``val`` images;
- ``coco-mini-heldout``: 60 instances (of at least 1 % of the image) on the fixed 20 % held-out images;
- ``pennfudan-heldout``: the 89 pedestrians on the fixed 20 % held-out images;
- ``bsds500-val-300``: the fixed 300-object sample of BSDS500 ``val`` regions;
- ``wgisd-dev``: 30 grape clusters (WGISD-dev is also a training set: an in-domain check, not held out).

One table (stdout, and ``suite-<label>.md``), ``suite-<label>.json`` and ``suite-<label>.png`` (mIoU
curves per set) in ``--out-dir``, with the per-set evaluation JSONs beside them. Every model and
baseline run is cached there by what it depends on, so another checkpoint costs the model's time
only, and an interrupted suite resumes where it stopped.

    python -m model.evaluation.suite --out-dir artifacts/suite
    python -m model.evaluation.suite --checkpoint runs/mix/last.safetensors --out-dir artifacts/suite --label mix
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..data import open_objects
from ..predictor import DEFAULT_CHECKPOINT
from .benchmark import machine_info
from .evaluate import (BASELINE_TARGET, EvalResult, add_test_time_arguments, baseline_run, cached_evaluation,
                       evaluate_objects, load_predictor, noc90_change, safe_filename, versus_baseline)
from .protocol import SIZE_BINS


@dataclass(frozen=True)
class SuiteSet:
    name: str
    spec: str  # a dataset spec with ``{root}`` for --data-root
    max_objects: Optional[int]  # a fixed seed-0 sample, or every object
    held_out: bool = True


SUITE = (
    SuiteSet("bsds500-sod-val", "sod:{root}/bsds500-sod:val", None),
    SuiteSet("coco-mini-heldout", "instances:{root}/coco-mini:heldout", 60),
    SuiteSet("pennfudan-heldout", "instances:{root}/pennfudan:heldout", None),
    SuiteSet("bsds500-val-300", "bsds500:{root}/bsds500:val", 300),
    SuiteSet("wgisd-dev", "wgisd:{root}/wgisd-dev", 30, held_out=False),
)
BASELINE = "grabcut"


def run_set(predictor: Any, suite_set: SuiteSet, data_root: str, out_dir: Path, label: str, model_key: Dict[str, Any],
            max_clicks: int, stop_at_iou: Optional[float], max_objects: Optional[int]) -> Dict[str, Any]:
    """Model and baseline on one set, each cached as an evaluation JSON in ``out_dir``; returns both summaries.

    ``model_key`` identifies the model (checkpoint digest and predictor settings), so a rerun after
    an interruption evaluates only what is missing.
    """
    spec = suite_set.spec.format(root=data_root)
    limit = suite_set.max_objects if max_objects is None else min(max_objects, suite_set.max_objects or max_objects)
    objects = open_objects(spec, max_objects=limit, seed=0)
    if not objects:
        raise ValueError(f"suite set {suite_set.name} ({spec}) holds no objects")
    print(f"{suite_set.name}: {len(objects)} objects, model then {BASELINE}", file=sys.stderr)
    key = {**model_key, "dataset": spec, "max_clicks": max_clicks, "stop_at_iou": stop_at_iou,
           "objects": [o.name for o in objects]}

    def compute() -> EvalResult:
        result = evaluate_objects(predictor, objects, max_clicks, stop_at_iou, progress=True)
        result.settings.update({"dataset": spec, "max_objects": limit, "seed": 0})
        return result

    model = cached_evaluation(out_dir / f"{safe_filename(label)}-{suite_set.name}.json", key, label, compute)
    baseline = baseline_run(BASELINE, objects, out_dir, spec, max_clicks, stop_at_iou, progress=True)
    return {"spec": spec, "held_out": suite_set.held_out, "model": model.summary, "baseline": baseline.summary}


def format_suite_table(label: str, sets: Dict[str, Dict[str, Any]]) -> str:
    """A markdown table, one row per set: the model's metrics, the baseline's, and the NoC@90 change."""
    clicks = min(entry["model"]["max_clicks"] for entry in sets.values())
    header = ["set", "objects", "NoC@85", "NoC@90", "NoC@95", "NoF@90", "mIoU@1", f"mIoU@{min(5, clicks)}", f"mIoU@{clicks}",
              f"{BASELINE} NoC@90", f"{BASELINE} mIoU@1", "NoC@90 vs baseline"]
    lines = [f"model: {label}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in sets.items():
        m, b = entry["model"], entry["baseline"]
        change = noc90_change(m, b) * 100
        curve = m["miou_curve"]
        row = [name + ("" if entry["held_out"] else " (seen in training)"), str(m["num_objects"]),
               f"{m['noc@85']:.2f}", f"{m['noc@90']:.2f}", f"{m['noc@95']:.2f}", str(m["nof@90"]),
               f"{curve[0]:.4f}", f"{curve[min(5, clicks) - 1]:.4f}", f"{curve[clicks - 1]:.4f}",
               f"{b['noc@90']:.2f}", f"{b['miou_curve'][0]:.4f}", f"{change:+.1f} %"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Target: NoC@90 at least {BASELINE_TARGET * 100:.0f} % below the baseline on every held-out set."]
    return "\n".join(lines)


def format_first_click_sizes(sets: Dict[str, Dict[str, Any]]) -> str:
    """A markdown table of the model's first click by the object's share of the image (``protocol.by_object_size``),
    one row per set whose evaluation recorded it (caches written before it existed did not); "" if none did."""
    header = ["set"] + [f"{low * 100:.0f}-{high * 100:.0f} % of the image" for low, high in SIZE_BINS]
    lines = []
    for name, entry in sets.items():
        rows = {tuple(r["share"]): r for r in entry["model"].get("first_click_by_size", [])}
        if rows:
            cells = [f"{rows[b]['objects']}: IoU {rows[b]['iou']:.2f}, P {rows[b]['precision']:.2f}, "
                     f"R {rows[b]['recall']:.2f}" if b in rows else "-" for b in SIZE_BINS]
            lines.append("| " + " | ".join([name, *cells]) + " |")
    if not lines:
        return ""
    return "\n".join(["First click by object size (objects: IoU, precision, recall):", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])


def plot_suite(label: str, sets: Dict[str, Dict[str, Any]], path: Path) -> Path:
    """mIoU against clicks, one panel per set, model beside baseline."""
    import matplotlib  # the [eval] extra: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3.2), dpi=110, squeeze=False)
    for ax, (name, entry) in zip(axes[0], sets.items()):
        for run_label, summary in ((label, entry["model"]), (BASELINE, entry["baseline"])):
            curve = summary["miou_curve"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=2, label=run_label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("clicks")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("mIoU")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluation.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: the embedded default)")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--sets", default=",".join(s.name for s in SUITE), help="comma-separated subset of the sets")
    p.add_argument("--max-objects", type=int, default=None, help="at most N objects per set (a quick look)")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--stop-at-iou", type=float, default=None, help="as model.evaluation.evaluate")
    p.add_argument("--cfr-steps", type=int, default=None, help="CFR refinement steps (default: the predictor's)")
    add_test_time_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default=None, help="the model's name in the table (default: the checkpoint's stem)")
    p.add_argument("--out-dir", required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    known = {s.name: s for s in SUITE}
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--sets: unknown {unknown or 'empty list'}; known: {', '.join(known)}")
    if args.max_objects is not None and args.max_objects < 1:
        raise SystemExit(f"--max-objects must be >= 1, got {args.max_objects}")
    if not Path(args.data_root).is_dir():
        raise SystemExit(f"--data-root {args.data_root} is not a directory")
    checkpoint = str(args.checkpoint or DEFAULT_CHECKPOINT)
    options: Dict[str, Any] = {} if args.cfr_steps is None else {"cfr_steps": args.cfr_steps}
    predictor = load_predictor(checkpoint, args.device, args, options)
    label = args.label or Path(checkpoint).stem
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_key = {"checkpoint_sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest(),
                 "cfr_steps": predictor.cfr_steps, "device": args.device}
    if predictor.click_refinement_iterations:  # absent when off, as in caches made before it existed
        model_key["click_refinement_iterations"] = predictor.click_refinement_iterations
    if predictor.clicked_components_only:  # absent when off, as in caches made before it existed
        model_key["clicked_components_only"] = True

    sets: Dict[str, Dict[str, Any]] = {}
    for name in names:
        try:
            sets[name] = run_set(predictor, known[name], args.data_root, out_dir, label, model_key,
                                 args.max_clicks, args.stop_at_iou, args.max_objects)
        except ValueError as exc:
            raise SystemExit(f"suite set {name}: {exc}") from None
        print(f"{name}: " + versus_baseline(sets[name]["model"], sets[name]["baseline"]), file=sys.stderr)
    iterations = predictor.click_refinement_iterations
    refinement = f", click refinement {iterations}" if iterations else ", no click refinement"
    refinement += ", clicked components only" if predictor.clicked_components_only else ", all components"
    table = format_suite_table(f"{label} ({predictor.model_version}, CFR {predictor.cfr_steps}{refinement})", sets)
    first_click = format_first_click_sizes(sets)
    table += f"\n\n{first_click}" if first_click else ""
    settings = {"label": label, "checkpoint": checkpoint, "model_version": predictor.model_version,
                "cfr_steps": predictor.cfr_steps, "click_refinement_iterations": iterations,
                "clicked_components_only": predictor.clicked_components_only,
                "max_clicks": args.max_clicks, "stop_at_iou": args.stop_at_iou,
                "max_objects": args.max_objects, "baseline": BASELINE, "machine": machine_info(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    stem = f"suite-{safe_filename(label)}"
    (out_dir / f"{stem}.json").write_text(json.dumps({"settings": settings, "sets": sets}, indent=1))
    (out_dir / f"{stem}.md").write_text(table + "\n")
    plot_suite(label, sets, out_dir / f"{stem}.png")
    print(table)
    print(f"wrote {out_dir / stem}.json, .md and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
