"""Multi-object evaluation of exemplar recall (MOIS): ``python -m model.evaluation.evaluate_mois``.

Per image with at least two instances (order: seeded shuffle):
1. object 1 is clicked with the standard clicker until IoU >= 0.90 (or ``max_clicks``); its
   final mask becomes the exemplar;
2. one positive click (the clicker's first) goes on object 2; the proposals returned with it
   are matched one-to-one to the remaining instances (greedy by IoU);
3. every remaining object costs 0 actions if a proposal reaches the IoU threshold, else its
   NoC from scratch; every unmatched proposal costs 1 action (a deletion).
Objects 1 and 2 cost their NoC. "Without recall" is the sum of every object's NoC.

    python -m model.evaluation.evaluate_mois --dataset ../shared/data/wgisd-dev --out-dir artifacts/mois

``--oracle`` needs no model: it bounds what proposals made as connected components of a recall
map can reach at all, with a perfect map of all instances (touching instances merge), what
the recall output grid (stride 4 at ``--recall-input-size``) costs a perfect mask, and what
splitting the perfect map by perfect instance cores (an instance-aware head) would reach.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..clicks import MASK_THRESHOLD
from ..data import read_label_map, read_rgb
from ..predictor import DEFAULT_CHECKPOINT, ClickSegPredictor
from ..proposals import PROPOSAL_MIN_SCORE, propose
from ..transforms import shrink_map
from .protocol import Clicker, iou, noc

log = logging.getLogger("model.evaluation.evaluate_mois")
THRESHOLDS = (0.85, 0.90)
CORE_FRACTION = 0.15  # --oracle: instance cores, share of the largest inner distance


@dataclass
class ObjectClicks:
    label: int
    ious: List[float]  # IoU after each click, padded to max_clicks
    final_mask: Optional[np.ndarray] = field(default=None, repr=False)


@dataclass
class ImageResult:
    image: str
    objects: int
    noc: Dict[str, List[int]]  # threshold -> NoC per object, in evaluation order
    proposals: int
    matched: Dict[str, int]  # threshold -> remaining objects found by a proposal
    false_proposals: Dict[str, int]
    actions_without: Dict[str, int]
    actions_with: Dict[str, int]
    click_ms: float  # the triggering click on object 2 (segmentation only)
    recall_cold_ms: float  # recall on that click, features not cached
    recall_warm_ms: float  # recall on that click, features cached


def click_object(predictor: ClickSegPredictor, state, gt: np.ndarray, max_clicks: int, stop_at: float) -> ObjectClicks:
    """Standard clicker until IoU >= ``stop_at``; keeps the last mask."""
    clicker = Clicker(gt)
    prob, pred, ious = None, None, []
    for _ in range(max_clicks):
        clicker.make_next_click(pred)
        prob = predictor.predict(state, list(clicker.clicks), prob)
        pred = prob >= MASK_THRESHOLD
        ious.append(iou(pred, gt))
        if ious[-1] >= stop_at:
            break
    return ObjectClicks(0, ious + [ious[-1]] * (max_clicks - len(ious)), pred)


def match_proposals(proposal_masks: Sequence[np.ndarray], gts: Sequence[np.ndarray], threshold: float) -> Tuple[List[int], int]:
    """Greedy one-to-one matching by IoU; returns (indices of matched gts, unmatched proposals)."""
    pairs = []
    for i, p in enumerate(proposal_masks):
        for j, g in enumerate(gts):
            value = iou(p, g)
            if value >= threshold:
                pairs.append((value, i, j))
    used_p, used_g = set(), set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
    return sorted(used_g), len(proposal_masks) - len(used_p)


def evaluate_image(predictor: ClickSegPredictor, image: np.ndarray, labels: np.ndarray, name: str,
                   rng: np.random.Generator, max_clicks: int, min_scores: Sequence[float],
                   min_area: int) -> Optional[List[ImageResult]]:
    """One ``ImageResult`` per proposal score threshold (the clicking is shared); None below 2 objects."""
    ids = [int(i) for i in np.unique(labels) if i > 0]
    if len(ids) < 2:
        return None
    rng.shuffle(ids)
    gts = [labels == i for i in ids]
    state = predictor.encode_image(image)
    objects = []
    for label, gt in zip(ids, gts):
        result = click_object(predictor, state, gt, max_clicks, stop_at=max(THRESHOLDS))
        result.label = label
        objects.append(result)
    nocs = {f"{t:.2f}": [noc(o.ious, t, max_clicks) for o in objects] for t in THRESHOLDS}

    exemplar = objects[0].final_mask
    first = Clicker(gts[1]).make_next_click(None)
    started = time.perf_counter()
    object_prob = predictor.predict(state, [first])
    click_ms = (time.perf_counter() - started) * 1000
    results = []
    for min_score in min_scores:
        state.recall_features = None
        started = time.perf_counter()
        propose(predictor, state, exemplar, [first], object_prob, min_score=min_score, min_area=min_area)
        cold_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        proposals = propose(predictor, state, exemplar, [first], object_prob, min_score=min_score, min_area=min_area)
        warm_ms = (time.perf_counter() - started) * 1000
        matched, false, without, with_recall = {}, {}, {}, {}
        for t in THRESHOLDS:
            key = f"{t:.2f}"
            found, unmatched = match_proposals([p.mask for p in proposals], gts[2:], t)
            costs = nocs[key]
            matched[key] = len(found)
            false[key] = unmatched
            without[key] = int(sum(costs))
            with_recall[key] = int(costs[0] + costs[1] + sum(c for j, c in enumerate(costs[2:]) if j not in found)
                                   + unmatched)
        results.append(ImageResult(name, len(ids), nocs, len(proposals), matched, false, without, with_recall,
                                   round(click_ms, 2), round(cold_ms, 2), round(warm_ms, 2)))
    return results


def summarize(results: Sequence[ImageResult]) -> Dict[str, Dict[str, float]]:
    out = {}
    n = max(1, len(results))
    for t in THRESHOLDS:
        key = f"{t:.2f}"
        without = sum(r.actions_without[key] for r in results)
        with_recall = sum(r.actions_with[key] for r in results)
        out[key] = {
            "images": len(results),
            "objects": sum(r.objects for r in results),
            "actions_per_image_without": without / n,
            "actions_per_image_with": with_recall / n,
            "reduction_percent": 100.0 * (without - with_recall) / max(1, without),
            "recalled_objects_per_image": sum(r.matched[key] for r in results) / n,
            "false_proposals_per_image": sum(r.false_proposals[key] for r in results) / n,
        }
    click = np.median([r.click_ms for r in results]) if results else 0.0
    cold = np.median([r.recall_cold_ms for r in results]) if results else 0.0
    warm = np.median([r.recall_warm_ms for r in results]) if results else 0.0
    out["latency_ms_p50"] = {"click": float(click), "recall_cold": float(cold), "recall_warm": float(warm),
                             "added_percent_cold": float(100 * cold / max(click, 1e-9)),
                             "added_percent_warm": float(100 * warm / max(click, 1e-9))}
    return out


def format_table(summary: Dict[str, Dict[str, float]]) -> str:
    lines = ["| IoU | images | objects | actions/image without recall | with recall | reduction | "
             "recalled objects/image | false proposals/image |",
             "|---|---|---|---|---|---|---|---|"]
    for t in THRESHOLDS:
        s = summary[f"{t:.2f}"]
        lines.append(f"| {t:.2f} | {s['images']} | {s['objects']} | {s['actions_per_image_without']:.2f} | "
                     f"{s['actions_per_image_with']:.2f} | {s['reduction_percent']:.1f}% | "
                     f"{s['recalled_objects_per_image']:.2f} | {s['false_proposals_per_image']:.2f} |")
    lat = summary["latency_ms_p50"]
    lines.append("")
    lines.append(f"Triggering click p50: segmentation {lat['click']:.1f} ms; recall +{lat['recall_warm']:.1f} ms "
                 f"(+{lat['added_percent_warm']:.0f}%) with cached recall features, +{lat['recall_cold']:.1f} ms "
                 f"(+{lat['added_percent_cold']:.0f}%) computing them on that click.")
    return "\n".join(lines)


def instance_cores(labels: np.ndarray, fraction: float = CORE_FRACTION) -> np.ndarray:
    """Bool (H, W): each instance's pixels at least ``fraction`` of its largest inner distance
    from its boundary (touching instances' cores are apart)."""
    cores = np.zeros(labels.shape, dtype=bool)
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        padded = np.pad(labels[box] == value, 1)
        distance = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
        cores[box] |= distance >= fraction * distance.max()
    return cores


def split_by_cores(union: np.ndarray, cores: np.ndarray) -> np.ndarray:
    """Int (H, W) segment ids (0 = outside ``union``): each union pixel goes to its nearest
    connected core; a union component without a core stays one segment."""
    seeds, count = ndimage.label(cores & union)
    if count == 0:
        return ndimage.label(union)[0]
    _, (rows, cols) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    segments = np.where(union, seeds[rows, cols], 0)
    components, found = ndimage.label(union)
    seeded = ndimage.maximum(seeds > 0, components, np.arange(found + 1)).astype(bool)
    return np.where(union & ~seeded[components], components + count, segments)


def oracle_bounds(labels: np.ndarray, recall_input_size: int = 768,
                  thresholds: Sequence[float] = THRESHOLDS, core_fraction: float = CORE_FRACTION) -> Dict[str, float]:
    """Upper bounds for one instance map (H, W) (0 = background), no model involved.

    ``components@t``: instances that the connected component of a perfect union mask matching
    them best covers at IoU >= t; ``grid@t``: instances whose mask, box-filtered to the recall
    output grid and bilinearly upscaled back (threshold 0.5), keeps IoU >= t; ``cores@t``:
    instances that the best segment covers when the perfect union mask on the recall grid is
    split by perfect instance cores (``instance_cores``, ``split_by_cores``), as an
    instance-aware recall head would. Counts, and ``instances``.
    """
    height, width = labels.shape
    scale = recall_input_size / max(height, width)
    grid = (max(1, round(height * scale / 4)), max(1, round(width * scale / 4)))

    def regrow(small: np.ndarray) -> np.ndarray:
        up = F.interpolate(torch.from_numpy(small)[None, None], size=(height, width), mode="bilinear", align_corners=False)
        return up[0, 0].numpy() >= 0.5

    components, _ = ndimage.label(labels > 0)
    core_segments = split_by_cores(shrink_map(labels > 0, grid) >= 0.5,
                                   shrink_map(instance_cores(labels, core_fraction), grid) >= 0.5)
    segments = [regrow((core_segments == k).astype(np.float32)) for k in range(1, int(core_segments.max()) + 1)]
    counts = {"instances": 0.0, **{f"{kind}@{t:.2f}": 0.0 for kind in ("components", "grid", "cores") for t in thresholds}}
    for value in np.unique(labels):
        if value == 0:
            continue
        gt = labels == value
        counts["instances"] += 1
        best = components == np.bincount(components[gt]).argmax()
        regrown = regrow(shrink_map(gt, grid))
        best_segment = max((iou(segment, gt) for segment in segments), default=0.0)
        for t in thresholds:
            counts[f"components@{t:.2f}"] += iou(best, gt) >= t
            counts[f"grid@{t:.2f}"] += iou(regrown, gt) >= t
            counts[f"cores@{t:.2f}"] += best_segment >= t
    return counts


def format_oracle_table(totals: Dict[str, float], images: int, recall_input_size: int) -> str:
    n = max(totals["instances"], 1)
    lines = [f"{images} images, {int(totals['instances'])} instances; share of instances a proposal could match:", "",
             "| IoU | perfect map, connected components | perfect mask on the recall grid "
             f"({recall_input_size} px, stride 4) | perfect map on the grid, split by perfect instance cores |",
             "|---|---|---|---|"]
    for t in THRESHOLDS:
        lines.append(f"| {t:.2f} | {totals[f'components@{t:.2f}'] / n:.0%} | {totals[f'grid@{t:.2f}'] / n:.0%} "
                     f"| {totals[f'cores@{t:.2f}'] / n:.0%} |")
    return "\n".join(lines)


def wgisd_images(root: Path, stems: Optional[Sequence[str]]) -> List[Tuple[Path, Path]]:
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise ValueError(f"WGISD folder not found: {image_dir} is not a directory")
    pairs = [(p, root / "instances" / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]
    if stems:
        unknown = sorted(set(stems) - {p.stem for p, _ in pairs})
        if unknown:
            raise ValueError(f"--images names images that {root} lacks: {', '.join(unknown)}")
        pairs = [pair for pair in pairs if pair[0].stem in set(stems)]
    return [pair for pair in pairs if pair[1].is_file()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--dataset", default="../shared/data/wgisd-dev", help="WGISD-style folder (images/, instances/)")
    parser.add_argument("--images", nargs="*", help="only these image stems (e.g. the recall hold-out)")
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--min-score", type=float, nargs="+", default=[PROPOSAL_MIN_SCORE],
                        help="proposal score threshold(s); several give one table each (shared clicking)")
    parser.add_argument("--min-area", type=int, default=64, help="smallest proposal in full-size pixels")
    parser.add_argument("--seed", type=int, default=0, help="object order per image")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--out-dir", default="artifacts/mois")
    parser.add_argument("--oracle", action="store_true", help="model-free upper bounds instead (see above)")
    parser.add_argument("--recall-input-size", type=int, default=768, help="recall grid of --oracle (long side, px)")
    parser.add_argument("--core-fraction", type=float, default=CORE_FRACTION,
                        help="--oracle: an instance's core is its pixels at least this share of its largest inner distance")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.oracle:
        if not 0.0 < args.core_fraction < 1.0:
            parser.error(f"--core-fraction must be between 0 and 1 (exclusive), got {args.core_fraction}")
        try:
            pairs = wgisd_images(Path(args.dataset), args.images)
        except ValueError as exc:
            parser.error(str(exc))
        totals: Dict[str, float] = {}
        for _, label_path in pairs:
            bounds = oracle_bounds(read_label_map(label_path), args.recall_input_size, core_fraction=args.core_fraction)
            for key, value in bounds.items():
                totals[key] = totals.get(key, 0.0) + value
        text = format_oracle_table(totals, len(pairs), args.recall_input_size)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "oracle.json").write_text(json.dumps({"settings": dict(vars(args)), "totals": totals}, indent=1))
        print(text)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        predictor = ClickSegPredictor.from_checkpoint(args.checkpoint)
        if not predictor.has_recall:
            raise ValueError(f"{args.checkpoint} has no exemplar recall branch")
        pairs = wgisd_images(Path(args.dataset), args.images)
    except ValueError as exc:
        parser.error(str(exc))
    results: Dict[float, List[ImageResult]] = {m: [] for m in args.min_score}
    for index, (image_path, label_path) in enumerate(pairs):
        rng = np.random.default_rng([args.seed, index])
        per_score = evaluate_image(predictor, read_rgb(image_path), read_label_map(label_path), image_path.stem, rng,
                                   args.max_clicks, args.min_score, args.min_area)
        for min_score, result in zip(args.min_score, per_score or []):
            results[min_score].append(result)
            log.info("%s (min score %.2f): %d objects, %d proposals, actions@0.85 %d -> %d", result.image, min_score,
                     result.objects, result.proposals, result.actions_without["0.85"], result.actions_with["0.85"])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, tables = [], []
    for min_score, per_image in results.items():
        summary = summarize(per_image)
        runs.append({"min_score": min_score, "summary": summary, "images": [asdict(r) for r in per_image]})
        tables.append(f"### proposal min score {min_score:g}\n\n{format_table(summary)}\n")
    payload = {"settings": dict(vars(args)), "model_version": predictor.model_version, "runs": runs}
    (out_dir / "mois.json").write_text(json.dumps(payload, indent=1))
    text = "\n".join(tables)
    (out_dir / "mois.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
