"""Per-click latency of the predictor on synthetic images.

For each image size and CFR setting (off: ``cfr_steps=0``; on: the predictor's
defaults) it times, over ``--repeats`` fresh sessions on one image:

- the first click: ``encode_image`` + ``predict`` (what a new image costs);
- later clicks: clicks 2..5 on the same image, each with the previous map as ``prev_mask``;
- with a recall branch, the click that triggers exemplar recall: segmentation alone, and the
  proposals on top with the image's recall features cached (as the server warms them) or not;
- with ``--click-refinement N``, what click-consistency refinement adds to a click that
  contradicts its label (``model.click_refinement``, N L-BFGS iterations on the view), for 1 to
  20 clicks; other clicks are unchanged.

The clicks come from the standard ``Clicker`` on a synthetic blob object, so they
follow the model's own errors. One untimed warm-up session per setting records
the click sequence; the timed sessions replay it (the clicker's distance
transforms stay outside the timings).

    python -m model.evaluation.benchmark --sizes 640x480,1024x768,4000x3000 --repeats 5 --threads 2 --json bench.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..click_refinement import refine_for_clicks
from ..clicks import MASK_THRESHOLD, Click, encode_click_maps
from ..predictor import DEFAULT_CHECKPOINT, ClickSegPredictor
from ..proposals import propose
from ..transforms import network_shape
from .machine import machine_info
from .protocol import Clicker

CLICKS_PER_SESSION = 5  # click 1 + later clicks 2..5


def parse_sizes(text: str) -> List[Tuple[int, int]]:
    """``"640x480,4000x3000"`` -> ``[(640, 480), (4000, 3000)]`` as (width, height)."""
    sizes = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes: {part!r} is not WIDTHxHEIGHT (e.g. 640x480)") from None
        if w < 32 or h < 32:
            raise ValueError(f"--sizes: {part!r} is too small; both sides must be >= 32")
        sizes.append((w, h))
    return sizes


def synthetic_scene(width: int, height: int, seed: int = 0, objects: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """A textured background with lobed blobs of one look: (image uint8 (H,W,3), labels uint8 (H,W)).

    ``labels`` is 0 on the background and k on blob k (1..objects). One object is a large blob
    left of centre; several are smaller blobs on a grid of two rows.
    """
    if not 1 <= objects <= 255:
        raise ValueError(f"objects must be in 1..255, got {objects}")
    rng = np.random.default_rng(seed)

    def smooth_noise(cells: int, channels: int) -> np.ndarray:
        small = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
        return np.asarray(Image.fromarray(small.squeeze()).resize((width, height), Image.BILINEAR), np.float32)

    background = 0.6 * smooth_noise(6, 3) + 0.4 * smooth_noise(24, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if objects == 1:
        blobs = [(0.5 * height, 0.45 * width, 0.28 * height, 0.22 * width)]
    else:
        rows, cols = 2, -(-objects // 2)
        cell_h, cell_w = height / rows, width / cols
        blobs = [((k // cols + 0.5) * cell_h, (k % cols + 0.5) * cell_w, 0.3 * cell_h, 0.3 * cell_w)
                 for k in range(objects)]
    labels = np.zeros((height, width), np.uint8)
    for k, (cy, cx, ry, rx) in enumerate(blobs, start=1):
        angle = np.arctan2((yy - cy) / ry, (xx - cx) / rx)
        radius = np.hypot((yy - cy) / ry, (xx - cx) / rx)
        labels[radius <= 1.0 + 0.15 * np.sin(3 * angle)] = k
    shade = smooth_noise(12, 1)[..., None]
    foreground = np.array([200, 60, 40], np.float32) + 0.25 * (shade - 128)
    image = np.where(labels[..., None] > 0, foreground, background)
    image += rng.normal(0, 6, size=(height, width, 1)).astype(np.float32)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8), labels


def record_clicks(predictor, image: np.ndarray, gt: np.ndarray, n_clicks: int = CLICKS_PER_SESSION) -> List[Click]:
    """Untimed session: the click sequence the standard clicker makes against this predictor."""
    clicker = Clicker(gt)
    state = predictor.encode_image(image)
    prob = None
    for _ in range(n_clicks):
        clicker.make_next_click(None if prob is None else prob > MASK_THRESHOLD)
        prob = predictor.predict(state, list(clicker.clicks), prob)
    return list(clicker.clicks)


def time_session(predictor, image: np.ndarray, clicks: Sequence[Click]) -> Tuple[float, List[float], List[int]]:
    """(first-click ms incl. encode_image, later-click ms, CFR passes of the later clicks)."""
    start = time.perf_counter()
    state = predictor.encode_image(image)
    prob = predictor.predict(state, clicks[:1], None)
    first_ms = 1000 * (time.perf_counter() - start)
    later_ms, passes = [], []
    for k in range(2, len(clicks) + 1):
        start = time.perf_counter()
        prob = predictor.predict(state, clicks[:k], prob)
        later_ms.append(1000 * (time.perf_counter() - start))
        passes.append(int(getattr(predictor, "last_cfr_passes", 1)))
    return first_ms, later_ms, passes


@dataclass
class BenchRow:
    size: str  # WIDTHxHEIGHT
    cfr: str  # "off" or "on (steps=N)"
    first_p50_ms: float
    first_p90_ms: float
    later_p50_ms: float
    later_p90_ms: float
    mean_later_passes: float  # network passes per later click (1 = no CFR refinement)
    samples_first: int
    samples_later: int


def benchmark_setting(predictor, size: Tuple[int, int], cfr: str, repeats: int, warmup: int = 1) -> BenchRow:
    """Time ``repeats`` sessions of ``CLICKS_PER_SESSION`` clicks on a synthetic ``size`` image."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    image, gt = synthetic_scene(*size)
    clicks = record_clicks(predictor, image, gt)
    for _ in range(max(0, warmup - 1)):
        time_session(predictor, image, clicks)
    first, later, passes = [], [], []
    for _ in range(repeats):
        f, l, p = time_session(predictor, image, clicks)
        first.append(f)
        later += l
        passes += p
    return BenchRow(
        size=f"{size[0]}x{size[1]}", cfr=cfr,
        first_p50_ms=float(np.percentile(first, 50)), first_p90_ms=float(np.percentile(first, 90)),
        later_p50_ms=float(np.percentile(later, 50)), later_p90_ms=float(np.percentile(later, 90)),
        mean_later_passes=float(np.mean(passes)), samples_first=len(first), samples_later=len(later),
    )


RECALL_SCENE_OBJECTS = 6  # blobs in the recall scene: 1 accepted, 1 clicked, 4 to propose


@dataclass
class RecallRow:
    size: str
    click_p50_ms: float  # the triggering click's segmentation (CFR on)
    recall_warm_p50_ms: float  # + proposals, recall features already cached
    recall_cold_p50_ms: float  # + proposals, recall features computed on that click
    proposals: int  # proposals returned (the scene has RECALL_SCENE_OBJECTS - 2 objects to find)
    samples: int


def benchmark_recall(predictor, size: Tuple[int, int], repeats: int) -> RecallRow:
    """The click that triggers exemplar recall: the first click on blob 2 of a scene of
    ``RECALL_SCENE_OBJECTS`` like blobs whose blob 1 (the exemplar) was accepted; recall timed
    with and without cached features."""
    image, labels = synthetic_scene(*size, objects=RECALL_SCENE_OBJECTS)
    exemplar = labels == 1
    ys, xs = np.nonzero(labels == 2)
    click = Click(float(np.median(ys)), float(np.median(xs)))
    state = predictor.encode_image(image)
    propose(predictor, state, exemplar, [click], predictor.predict(state, [click]))  # warm-up
    clicks, warm, cold, found = [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        prob = predictor.predict(state, [click])
        clicks.append(1000 * (time.perf_counter() - start))
        state.recall_features = None
        start = time.perf_counter()
        propose(predictor, state, exemplar, [click], prob)
        cold.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        found.append(len(propose(predictor, state, exemplar, [click], prob)))
        warm.append(1000 * (time.perf_counter() - start))
    return RecallRow(f"{size[0]}x{size[1]}", float(np.median(clicks)), float(np.median(warm)),
                     float(np.median(cold)), int(np.median(found)), repeats)


REFINEMENT_CLICK_COUNTS = (1, 5, 10, 20)


@dataclass
class RefinementRow:
    size: str  # the image's; the refinement runs on the network's view of it
    clicks: int
    added_p50_ms: float  # refine_for_clicks on the view: what a contradicted click costs more
    added_p90_ms: float
    samples: int


def benchmark_click_refinement(predictor, size: Tuple[int, int], iterations: int, repeats: int,
                               seed: int = 0) -> List[RefinementRow]:
    """The added cost of a refined click: ``refine_for_clicks`` with ``iterations`` on the full view
    of a ``size`` image, for ``REFINEMENT_CLICK_COUNTS`` clicks spread over the view."""
    image, _ = synthetic_scene(*size)
    state = predictor.encode_image(image)
    ih, iw = network_shape(*state.working_size, predictor.input_size, predictor.size_multiple)
    rng = np.random.default_rng(seed)
    rows = []
    for count in REFINEMENT_CLICK_COUNTS:
        clicks = [Click(float(rng.uniform(0, ih - 1)), float(rng.uniform(0, iw - 1)), k % 2 == 0) for k in range(count)]
        with torch.inference_mode():
            maps = encode_click_maps(clicks, ih, iw, device=predictor.device)
            features = predictor.net.decoder_features(state.full_view_prepared, maps)
        refine_for_clicks(predictor.net, features, maps, clicks, iterations)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            refine_for_clicks(predictor.net, features, maps, clicks, iterations)
            times.append(1000 * (time.perf_counter() - start))
        rows.append(RefinementRow(f"{size[0]}x{size[1]}", count, float(np.percentile(times, 50)),
                                  float(np.percentile(times, 90)), repeats))
    return rows


def format_refinement_table(rows: Sequence[RefinementRow], iterations: int) -> str:
    lines = [f"size        clicks  added p50  added p90   (ms, {iterations} L-BFGS iterations)"]
    lines += [f"{r.size:<11} {r.clicks:6d}  {r.added_p50_ms:9.1f}  {r.added_p90_ms:9.1f}" for r in rows]
    return "\n".join(lines)


def format_recall_table(rows: Sequence[RecallRow]) -> str:
    lines = ["size        click p50  + recall (cached features)  + recall (features on this click)  proposals   (ms)"]
    for r in rows:
        lines.append(f"{r.size:<11} {r.click_p50_ms:9.1f}  {r.recall_warm_p50_ms:8.1f} ({100 * r.recall_warm_p50_ms / r.click_p50_ms:+.0f}%)"
                     f"            {r.recall_cold_p50_ms:8.1f} ({100 * r.recall_cold_p50_ms / r.click_p50_ms:+.0f}%)"
                     f"          {r.proposals:3d}")
    return "\n".join(lines)


def format_table(rows: Sequence[BenchRow]) -> str:
    header = ["size", "CFR", "first p50", "first p90", "later p50", "later p90", "passes/later"]
    body = [[r.size, r.cfr, f"{r.first_p50_ms:.1f}", f"{r.first_p90_ms:.1f}", f"{r.later_p50_ms:.1f}",
             f"{r.later_p90_ms:.1f}", f"{r.mean_later_passes:.2f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header) + "   (ms per click)", "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.evaluation.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: the embedded default)")
    p.add_argument("--sizes", default="640x480,1024x768,4000x3000", help="comma-separated WIDTHxHEIGHT")
    p.add_argument("--repeats", type=int, default=5, help="timed sessions per size and CFR setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed sessions per size and CFR setting (>= 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--click-refinement", type=int, default=0, metavar="ITERATIONS",
                   help="also time click-consistency refinement with this many L-BFGS iterations (0 = not timed)")
    p.add_argument("--json", default=None, help="also write the table and machine info to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.warmup < 1:
        raise SystemExit("--repeats, --threads and --warmup must be >= 1")
    if args.click_refinement < 0:
        raise SystemExit(f"--click-refinement must be >= 0, got {args.click_refinement}")
    sizes = parse_sizes(args.sizes)

    torch.set_num_threads(args.threads)
    checkpoint = str(args.checkpoint or DEFAULT_CHECKPOINT)
    cfr_on = ClickSegPredictor.from_checkpoint(checkpoint, device=args.device)
    cfr_off = ClickSegPredictor.from_checkpoint(checkpoint, device=args.device, cfr_steps=0)
    settings = [("off", cfr_off), (f"on (steps={cfr_on.cfr_steps})", cfr_on)]
    info = machine_info()
    print(f"checkpoint {checkpoint} ({cfr_on.model_version}), device {args.device}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    rows = []
    for size in sizes:
        for label, predictor in settings:
            rows.append(benchmark_setting(predictor, size, label, args.repeats, args.warmup))
            print(f"  done {rows[-1].size} CFR {label}", file=sys.stderr)
    print(format_table(rows))
    recall_rows = []
    if cfr_on.has_recall:
        recall_rows = [benchmark_recall(cfr_on, size, args.repeats) for size in sizes]
        print("\nExemplar recall on the triggering click (CFR on):")
        print(format_recall_table(recall_rows))
    refinement_rows = []
    if args.click_refinement:
        if not hasattr(cfr_on.net, "decoder_features"):
            raise SystemExit(f"--click-refinement: {cfr_on.model_version} has no decoder_features to refine")
        refinement_rows = [row for size in sizes
                           for row in benchmark_click_refinement(cfr_on, size, args.click_refinement, args.repeats)]
        print("\nClick-consistency refinement, added to a click that contradicts its label:")
        print(format_refinement_table(refinement_rows, args.click_refinement))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "checkpoint": checkpoint, "model_version": cfr_on.model_version, "device": args.device,
            "repeats": args.repeats, "clicks_per_session": CLICKS_PER_SESSION, "machine": info,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": [asdict(r) for r in rows], "recall_rows": [asdict(r) for r in recall_rows],
            "click_refinement_iterations": args.click_refinement,
            "refinement_rows": [asdict(r) for r in refinement_rows],
        }, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
