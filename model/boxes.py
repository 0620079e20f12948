"""Pixel boxes of masks, (y0, y1, x0, x1) with half-open rows and columns (numpy only)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

Box = Tuple[int, int, int, int]


def bounding_box(mask: np.ndarray) -> Optional[Box]:
    """The smallest box holding every True pixel of bool ``mask`` (H, W); None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def box_slices(box: Sequence[int]) -> Tuple[slice, slice]:
    y0, y1, x0, x1 = box
    return slice(y0, y1), slice(x0, x1)


def check_box(box: Sequence[int], crop_shape: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` as ints, after checking that it lies in an image of ``shape`` (H, W) and that a
    crop of ``crop_shape`` fills it; ValueError naming all three otherwise."""
    y0, y1, x0, x1 = (int(v) for v in box)
    height, width = (int(v) for v in shape)
    if not (0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width) or tuple(crop_shape) != (y1 - y0, x1 - x0):
        raise ValueError(f"box {tuple(box)} with a mask of shape {tuple(crop_shape)} does not fit a "
                         f"({height}, {width}) mask")
    return y0, y1, x0, x1
