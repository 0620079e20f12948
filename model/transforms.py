"""The one place where clicks and maps change frame: full image <-> working copy <-> zoom-in box
<-> network input, and the horizontal flip. Each transform carries its inverse.

Coordinates are pixel centres: pixel i spans [i, i + 1) and its centre is i, so a map from a
frame of size n to one of size m sends y to (y + 0.5) * m / n - 0.5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .boxes import Box, bounding_box, box_slices
from .clicks import MASK_THRESHOLD, Click

PIXEL_CENTRE_SNAP = 1e-6  # percent coordinates lose ~1e-13 of a pixel on the way through Label Studio


# --- coordinates -------------------------------------------------------------------------------


def map_click(click: Click, scale: Tuple[float, float], offset: Tuple[float, float] = (0.0, 0.0),
              rescale: Tuple[float, float] = (1.0, 1.0)) -> Click:
    """``click`` scaled by ``scale`` (sy, sx), shifted by ``-offset`` (oy, ox) in the scaled
    frame's pixels, then scaled by ``rescale``; pixel centres are preserved at every step."""
    (sy, sx), (oy, ox), (ry, rx) = scale, offset, rescale
    return Click(((click.y + 0.5) * sy - oy) * ry - 0.5, ((click.x + 0.5) * sx - ox) * rx - 0.5, click.is_positive)


def map_clicks(clicks: Sequence[Click], source: Tuple[int, int], target: Tuple[int, int]) -> list:
    """``clicks`` of a ``source`` (H, W) frame in a ``target`` (h, w) frame of the same view."""
    scale = (target[0] / source[0], target[1] / source[1])
    return [map_click(c, scale) for c in clicks]


def continuous_to_click(x: float, y: float, height: int, width: int, is_positive: bool) -> Click:
    """A click at continuous coordinates (pixel i spans [i, i + 1), as Label Studio's percentages
    times the size) in pixel-centre coordinates, clipped to the image. Within
    ``PIXEL_CENTRE_SNAP`` of a pixel centre it is put on it, so the model sees the same click as
    for that pixel (float noise can move a zoom-in box edge by a pixel)."""
    def centred(value: float, size: int) -> float:
        value = float(np.clip(value - 0.5, 0, size - 1))
        nearest = round(value)
        return float(nearest) if abs(value - nearest) < PIXEL_CENTRE_SNAP else value

    return Click(centred(y, height), centred(x, width), is_positive)


# --- maps --------------------------------------------------------------------------------------


def resize(t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), bilinear (antialiased when shrinking); ``t`` itself when the
    size already matches."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    shrinking = size[0] < t.shape[-2] or size[1] < t.shape[-1]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def shrink_map(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bool or [0, 1] map (H, W) -> float32 ``size`` (box filter; PIL is much faster than torch here).

    A bool mask is resized only around its bounding box (zeros elsewhere), so a small object on
    a large image costs what the object costs.
    """
    mask = np.asarray(mask)
    if mask.shape == tuple(size):
        return mask.astype(np.float32)
    if mask.dtype != bool:
        small = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32), mode="F").resize((size[1], size[0]), Image.BOX)
        return np.array(small, dtype=np.float32)
    out = np.zeros(size, dtype=np.float32)
    box = bounding_box(mask)
    if box is None:
        return out
    top, bottom, left, right = box[0], box[1] - 1, box[2], box[3] - 1  # inclusive
    height, width = mask.shape
    sy, sx = height / size[0], width / size[1]  # input pixels per output pixel
    # output pixels whose box window can reach the mask (one of margin), and the input they read
    oy0, oy1 = max(0, int(top / sy) - 1), min(size[0], int(bottom / sy) + 2)
    ox0, ox1 = max(0, int(left / sx) - 1), min(size[1], int(right / sx) + 2)
    iy0, iy1 = max(0, int(oy0 * sy) - 1), min(height, math.ceil(oy1 * sy) + 1)
    ix0, ix1 = max(0, int(ox0 * sx) - 1), min(width, math.ceil(ox1 * sx) + 1)
    crop = Image.fromarray(mask[iy0:iy1, ix0:ix1].view(np.uint8) * np.uint8(255))
    source = (ox0 * sx - ix0, oy0 * sy - iy0, ox1 * sx - ix0, oy1 * sy - iy0)
    small = crop.resize((ox1 - ox0, oy1 - oy0), Image.BOX, box=source)
    out[oy0:oy1, ox0:ox1] = np.asarray(small, dtype=np.float32) / 255.0
    return out


def network_shape(height: int, width: int, input_size: int, multiple: int) -> Tuple[int, int]:
    """Input shape for a ``height x width`` view: long side about ``input_size``, sides multiples of ``multiple``."""
    scale = input_size / max(height, width)
    return (max(multiple, int(round(height * scale / multiple)) * multiple),
            max(multiple, int(round(width * scale / multiple)) * multiple))


def working_shape(height: int, width: int, max_side: int) -> Tuple[int, int]:
    """The working copy's size: the image's, shrunk so that its long side is at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


# --- views -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoomIn:
    """RITM-style zoom-in: the view is ``box`` of the working image (H, W) = ``frame``.

    ``crop`` takes the view out of a working-size map; ``paste`` is its inverse for a
    prediction of the view (zeros outside the box).
    """

    box: Box
    frame: Tuple[int, int]

    @classmethod
    def around(cls, frame: Tuple[int, int], scale: Tuple[float, float], clicks: Sequence[Click],
               mask: Optional[torch.Tensor], expansion: float, min_crop: int) -> Optional["ZoomIn"]:
        """The box around the mask (1, 1, H, W) ``> MASK_THRESHOLD`` and all ``clicks`` (full-image
        pixels, times ``scale`` (sy, sx) to the working frame: the box is expanded anyway),
        expanded by ``expansion`` and at least ``min_crop``; None when it would cover most of the
        image (the full view is used then)."""
        wh, ww = frame
        ys = [c.y * scale[0] for c in clicks]
        xs = [c.x * scale[1] for c in clicks]
        if mask is not None:
            rows = torch.nonzero((mask[0, 0] > MASK_THRESHOLD).any(dim=1)).flatten()
            cols = torch.nonzero((mask[0, 0] > MASK_THRESHOLD).any(dim=0)).flatten()
            if len(rows):
                ys += [float(rows[0]), float(rows[-1])]
                xs += [float(cols[0]), float(cols[-1])]
        cy, cx = (min(ys) + max(ys)) / 2, (min(xs) + max(xs)) / 2
        min_crop = min(min_crop, wh, ww)
        bh = max((max(ys) - min(ys) + 1) * expansion, min_crop)
        bw = max((max(xs) - min(xs) + 1) * expansion, min_crop)
        if bh >= 0.8 * wh and bw >= 0.8 * ww:
            return None
        bh, bw = min(bh, wh), min(bw, ww)
        y0 = int(np.clip(round(cy - bh / 2), 0, wh - math.ceil(bh)))
        x0 = int(np.clip(round(cx - bw / 2), 0, ww - math.ceil(bw)))
        return cls((y0, min(wh, y0 + math.ceil(bh)), x0, min(ww, x0 + math.ceil(bw))), (wh, ww))

    @property
    def shape(self) -> Tuple[int, int]:
        y0, y1, x0, x1 = self.box
        return y1 - y0, x1 - x0

    @property
    def offset(self) -> Tuple[int, int]:
        return self.box[0], self.box[2]

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """The view of a working-size (B, C, H, W) map."""
        return t[(..., *box_slices(self.box))]

    def paste(self, view: torch.Tensor) -> torch.Tensor:
        """A view-size (B, C, h, w) map back on the working frame, zeros outside the box."""
        out = torch.zeros(*view.shape[:-2], *self.frame, dtype=view.dtype, device=view.device)
        out[(..., *box_slices(self.box))] = view
        return out


def flip(t: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of (..., h, w); its own inverse."""
    return t.flip(-1)
