"""The classical baseline: OpenCV GrabCut (Rother et al., 2004) seeded by the same clicks.

Every model table shows it beside the model, on the same objects, with the same clicker and
metrics (``python -m model.evaluation.evaluate --baseline grabcut``). Each call starts GrabCut afresh from
all clicks so far; the previous mask is not used (seeding from it was worse: a wrong first
answer kept biasing the colour models):

- a positive click is definite foreground in a disk of ``sure_radius`` and probable foreground
  in a disk of ``probable_fraction`` of the image's shorter side around it;
- a negative click is definite background in a disk of ``sure_radius``;
- every other pixel is probable background;
- ``iterations`` rounds of GrabCut (colour GMMs + graph cut);
- only the connected components of the result that hold a positive click are kept.

GrabCut works on the image scaled to a longer side of at most ``max_side`` px, and its mask is
scaled back. The settings were chosen on 20 training objects (BSDS500 ``train``, coco-mini
``train``), never on an evaluation set: at 320 px, probable disks of 8 % gave NoC@85 5.40 within
10 clicks (4 %: 5.80, 15 %: 5.50); at 512 px NoC was no better (5.45) and each click took 3x longer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from ..clicks import Click, validate_clicks
from ..transforms import map_clicks

SURE_RADIUS = 5
PROBABLE_FRACTION = 0.08
ITERATIONS = 5
MAX_SIDE = 320


@dataclass(frozen=True)
class GrabCutImage:
    """``bgr`` (h, w, 3) uint8, the image GrabCut works on; ``height``, ``width`` of the original."""

    bgr: np.ndarray
    height: int
    width: int


class GrabCutPredictor:
    """The ``model.evaluation.evaluate.Predictor`` interface on GrabCut; ``predict`` returns a 0/1 float map (H, W)."""

    model_version = "grabcut"

    def __init__(self, sure_radius: int = SURE_RADIUS, probable_fraction: float = PROBABLE_FRACTION,
                 iterations: int = ITERATIONS, max_side: int = MAX_SIDE, seed: int = 0):
        if sure_radius < 1 or iterations < 1 or max_side < 16 or not 0 < probable_fraction <= 1:
            raise ValueError(f"GrabCutPredictor: bad settings sure_radius={sure_radius}, iterations={iterations}, "
                             f"max_side={max_side}, probable_fraction={probable_fraction}")
        self.sure_radius = sure_radius
        self.probable_fraction = probable_fraction
        self.iterations = iterations
        self.max_side = max_side
        self.seed = seed

    def encode_image(self, image: np.ndarray) -> GrabCutImage:
        """(H, W, 3) uint8 RGB -> the BGR image GrabCut works on, scaled to at most ``max_side``."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        return GrabCutImage(bgr, height, width)

    def predict(self, state: GrabCutImage, clicks: Sequence[Click], prev_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Clicks in original-image pixels -> (H, W) float32 map, 1 on the object."""
        validate_clicks(clicks, state.height, state.width)
        small = self._segment(state.bgr, map_clicks(clicks, (state.height, state.width), state.bgr.shape[:2]))
        if small.shape != (state.height, state.width):
            small = cv2.resize(small, (state.width, state.height), interpolation=cv2.INTER_NEAREST)
        return small.astype(np.float32)

    def _segment(self, bgr: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
        height, width = bgr.shape[:2]
        positives = [c for c in clicks if c.is_positive]
        if not positives:
            return np.zeros((height, width), np.uint8)
        seeds = np.full((height, width), cv2.GC_PR_BGD, np.uint8)
        probable = max(self.sure_radius + 1, round(self.probable_fraction * min(height, width)))
        for c in positives:
            cv2.circle(seeds, _centre(c), probable, cv2.GC_PR_FGD, -1)
        for c in clicks:  # definite seeds last, so a later click overrides an earlier probable disk
            cv2.circle(seeds, _centre(c), self.sure_radius, cv2.GC_FGD if c.is_positive else cv2.GC_BGD, -1)
        background = np.isin(seeds, (cv2.GC_BGD, cv2.GC_PR_BGD))
        if background.any() and not background.all():
            cv2.setRNGSeed(self.seed)
            models = (np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64))
            cv2.grabCut(bgr, seeds, None, *models, self.iterations, cv2.GC_INIT_WITH_MASK)
        foreground = np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
        return _components_with_clicks(foreground, positives)


def _centre(click: Click) -> Tuple[int, int]:
    return int(round(click.x)), int(round(click.y))


def _components_with_clicks(mask: np.ndarray, positives: Sequence[Click]) -> np.ndarray:
    """The connected components (8-connectivity) of ``mask`` that hold a positive click."""
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    if count <= 1:
        return mask
    height, width = mask.shape
    keep = {int(labels[min(max(int(round(c.y)), 0), height - 1), min(max(int(round(c.x)), 0), width - 1)])
            for c in positives} - {0}
    return np.isin(labels, sorted(keep)).astype(np.uint8) if keep else np.zeros_like(mask)
