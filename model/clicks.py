"""Click state and the click-map encoding shared by every network.

Coordinates are pixels ``(y, x)`` of the image they were placed on (row, column),
as in RITM's ``isegm.inference.clicker``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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
