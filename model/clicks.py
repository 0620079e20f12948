"""Click state and the click-map encoding shared by every network.

Coordinates are pixels ``(y, x)`` of the image they were placed on (row, column),
as in RITM's ``isegm.inference.clicker``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

DISK_RADIUS = 5  # pixels at network-input resolution (SimpleClick / CFR-ICL: norm_radius=5)
IGNORE_VALUE = 128  # ground-truth value that marks an ignore band
MASK_THRESHOLD = 0.49  # CFR-ICL's binarisation threshold: a pixel is on the object when prob > 0.49


@dataclass(frozen=True)
class Click:
    y: float
    x: float
    is_positive: bool = True



def validate_clicks(clicks: Sequence[Click], height: int, width: int) -> None:
    """ValueError unless ``clicks`` is non-empty and every click lies inside the image."""
    if len(clicks) == 0:
        raise ValueError("clicks: the click list is empty; at least one click is needed")
    for i, c in enumerate(clicks):
        if not (0 <= c.y < height and 0 <= c.x < width) or not (np.isfinite(c.y) and np.isfinite(c.x)):
            raise ValueError(
                f"clicks[{i}] at (y={c.y}, x={c.x}) lies outside the {width}x{height} image"
            )


def encode_click_maps(
    clicks: Sequence[Click],
    height: int,
    width: int,
    prev_mask: Optional[torch.Tensor] = None,
    radius: float = DISK_RADIUS,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Click maps ``(1, 3, H, W)`` = ``[prev_mask, positive disks, negative disks]``.

    ``clicks`` are in network-input pixels; ``prev_mask`` is a probability map
    ``(H, W)`` or ``(1, 1, H, W)`` (zeros when None).
    """
    ys = torch.arange(height, device=device, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, -1)
    maps = torch.zeros(1, 3, height, width, device=device)
    if prev_mask is not None:
        maps[0, 0] = prev_mask.reshape(height, width).to(maps)
    r2 = radius * radius
    for c in clicks:
        disk = ((ys - c.y) ** 2 + (xs - c.x) ** 2) <= r2
        channel = 1 if c.is_positive else 2
        maps[0, channel] = torch.maximum(maps[0, channel], disk.float())
    return maps


def padded_distance(mask: np.ndarray) -> np.ndarray:
    """Distance to the nearest non-mask pixel, with the image border counted as boundary."""
    return distance_transform_edt(np.pad(mask, 1, mode="constant"))[1:-1, 1:-1]


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


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of binary ``pred`` against ``gt``, ignoring pixels where ``gt == IGNORE_VALUE``."""
    gt = np.asarray(gt)
    valid = gt != IGNORE_VALUE
    g = (gt > 0) & valid
    p = np.asarray(pred, dtype=bool) & valid
    union = np.logical_or(p, g).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, g).sum() / union)
