"""The standard interactive-segmentation protocol (RITM / SimpleClick / CFR-ICL): the clicker that
places each next click from the previous prediction's errors, and the metrics of its IoU curves.
``evaluate``, ``evaluate_mois``, ``benchmark`` and ``backend.evaluate`` all use these."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..clicks import IGNORE_VALUE, Click, padded_distance

NOC_THRESHOLDS = (0.85, 0.90, 0.95)
NOF_THRESHOLDS = (0.85, 0.90)


class Clicker:
    """Standard evaluation clicker (RITM / SimpleClick / CFR-ICL protocol).

    The first click goes at the object pixel farthest from the object boundary.
    Each later click goes at the distance-transform maximum of the larger error
    region: false negatives give a positive click, false positives a negative one.
    Pixels equal to ``IGNORE_VALUE`` in ``gt`` are excluded.
    """

    def __init__(self, gt: np.ndarray):
        gt = np.asarray(gt)
        if gt.ndim != 2 or gt.size == 0:
            raise ValueError(f"gt: expected a non-empty 2-D mask, got shape {gt.shape}")
        self.not_ignore = gt != IGNORE_VALUE
        self.gt = (gt > 0) & self.not_ignore
        if not self.gt.any():
            raise ValueError("gt: the object mask is empty")
        self.clicks: List[Click] = []

    def make_next_click(self, pred: Optional[np.ndarray] = None) -> Click:
        """Append and return the next click for the binary prediction ``pred`` (None before the first)."""
        pred = np.zeros_like(self.gt) if pred is None else np.asarray(pred, dtype=bool)
        fn = self.gt & ~pred & self.not_ignore
        fp = ~self.gt & pred & self.not_ignore
        fn_dt = padded_distance(fn)
        fp_dt = padded_distance(fp)
        fn_max, fp_max = fn_dt.max(), fp_dt.max()
        is_positive = fn_max > fp_max
        dt, dmax = (fn_dt, fn_max) if is_positive else (fp_dt, fp_max)
        y, x = np.argwhere(dt == dmax)[0]
        click = Click(float(y), float(x), bool(is_positive))
        self.clicks.append(click)
        return click


def _scored_pixels(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(valid, object, prediction)`` boolean maps, the last two without pixels where ``gt == IGNORE_VALUE``."""
    gt = np.asarray(gt)
    valid = gt != IGNORE_VALUE
    return valid, (gt > 0) & valid, np.asarray(pred, dtype=bool) & valid


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of binary ``pred`` against ``gt``, ignoring pixels where ``gt == IGNORE_VALUE``."""
    _, g, p = _scored_pixels(pred, gt)
    union = np.logical_or(p, g).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, g).sum() / union)


def _curve(ious: Sequence[float], max_clicks: int) -> np.ndarray:
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
    curve = np.asarray(ious, dtype=np.float64)
    if curve.ndim != 1 or len(curve) < max_clicks:
        raise ValueError(f"an IoU curve needs at least max_clicks={max_clicks} values, got shape {curve.shape}")
    return curve[:max_clicks]


def noc(ious: Sequence[float], thr: float, max_clicks: int) -> int:
    """Number of clicks to first reach IoU >= ``thr`` (``ious[k-1]`` = IoU after k clicks); ``max_clicks`` if never."""
    reached = _curve(ious, max_clicks) >= thr
    return int(np.argmax(reached)) + 1 if reached.any() else max_clicks


def nof(curves: Sequence[Sequence[float]], thr: float, max_clicks: int) -> int:
    """Number of objects whose IoU never reaches ``thr`` within ``max_clicks`` clicks."""
    return int(sum(not (_curve(c, max_clicks) >= thr).any() for c in curves))


def miou_curve(curves: Sequence[Sequence[float]], max_clicks: int) -> np.ndarray:
    """``(max_clicks,)`` mean IoU over objects after 1..max_clicks clicks."""
    if len(curves) == 0:
        raise ValueError("miou_curve: no IoU curves given")
    return np.stack([_curve(c, max_clicks) for c in curves]).mean(axis=0)


def summarize(curves: Sequence[Sequence[float]], max_clicks: int) -> Dict[str, Any]:
    """NoC / NoF / mIoU summary of per-object IoU curves."""
    summary: Dict[str, Any] = {"num_objects": len(curves), "max_clicks": max_clicks}
    for thr in NOC_THRESHOLDS:
        summary[f"noc@{round(thr * 100)}"] = float(np.mean([noc(c, thr, max_clicks) for c in curves]))
    for thr in NOF_THRESHOLDS:
        summary[f"nof@{round(thr * 100)}"] = nof(curves, thr, max_clicks)
    summary["miou_curve"] = miou_curve(curves, max_clicks).tolist()
    return summary


# Bins of the object's share of the image for the first-click breakdown: below 5 %, 5-20 %, 20 % and up
# (the last one includes 1.0).
SIZE_BINS = ((0.0, 0.05), (0.05, 0.20), (0.20, 1.0))


def mask_overlap(pred: np.ndarray, gt: np.ndarray) -> Dict[str, float]:
    """``share`` of the image the object covers, and ``precision`` / ``recall`` of binary ``pred`` on it
    (pixels where ``gt == IGNORE_VALUE`` left out; precision is 1.0 for an empty prediction)."""
    valid, g, p = _scored_pixels(pred, gt)
    if not g.any():
        raise ValueError("mask_overlap: the object mask is empty")
    hit = np.logical_and(p, g).sum()
    return {"share": float(g.sum() / max(valid.sum(), 1)), "precision": float(hit / p.sum()) if p.any() else 1.0,
            "recall": float(hit / g.sum())}


def by_object_size(first_clicks: Sequence[Dict[str, float]], first_ious: Sequence[float]) -> List[Dict[str, Any]]:
    """The first click's mean IoU, precision and recall per bin of the object's share of the image
    (``SIZE_BINS``): shows whether one click over- or under-segments small and large objects."""
    if len(first_clicks) != len(first_ious):
        raise ValueError(f"by_object_size: {len(first_clicks)} overlaps for {len(first_ious)} IoUs")
    bins = [next((b for b, (_, high) in enumerate(SIZE_BINS) if o["share"] < high), len(SIZE_BINS) - 1)
            for o in first_clicks]
    rows = []
    for b, share in enumerate(SIZE_BINS):
        picked = [i for i, bin_ in enumerate(bins) if bin_ == b]
        if picked:
            rows.append({"share": list(share), "objects": len(picked),
                         "iou": float(np.mean([first_ious[i] for i in picked])),
                         "precision": float(np.mean([first_clicks[i]["precision"] for i in picked])),
                         "recall": float(np.mean([first_clicks[i]["recall"] for i in picked]))})
    return rows
