"""Exemplar recall output -> proposals: the other objects like the accepted ones, each on its own.

    found = propose(predictor, state, exemplar_mask, clicks, object_prob)   # List[Proposal], best first

The recall logits come from ``ClickSegPredictor.recall_logits`` on the recall branch's output
grid. Their connected components (accepted objects and the clicked object removed, scored,
thresholded) are found on that grid, and each is upscaled from its own logits to full size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .boxes import BoxMask
from .clicks import MASK_THRESHOLD, Click
from .predictor import ClickSegPredictor, ImageState
from .transforms import shrink_map

PROPOSAL_MIN_SCORE = 0.8  # measured on WGISD-dev MOIS: at most 1 false proposal per image (0.4)
OUTSIDE_LOGIT = -30.0  # logit given to the grid pixels beyond a proposal's one-pixel ring


@dataclass
class Proposal:
    """One proposed object, kept as its box; ``score`` in [0, 1] is its mean recall probability."""

    region: BoxMask
    score: float

    @classmethod
    def from_crop(cls, crop: np.ndarray, box: Sequence[int], shape: Sequence[int], score: float) -> "Proposal":
        return cls(BoxMask.from_crop(crop, box, shape), float(score))

    @property
    def mask(self) -> np.ndarray:
        """The full-size bool (H, W) mask."""
        return self.region.mask()

    @property
    def area(self) -> int:
        return int(self.region.crop().sum())


def propose_objects(
    recall_prob: np.ndarray,
    exclude: Optional[np.ndarray] = None,
    *,
    threshold: float = 0.5,
    min_score: float = PROPOSAL_MIN_SCORE,
    min_area: int = 16,
    max_excluded_fraction: float = 0.3,
    max_proposals: int = 50,
) -> List[Proposal]:
    """Connected components of ``recall_prob >= threshold`` as proposals, best first.

    recall_prob float (H, W). ``exclude`` bool (H, W): accepted objects and the clicked object;
    a component overlapping it by more than ``max_excluded_fraction`` of its area is dropped,
    any other loses the overlapping pixels (proposals never cover excluded pixels).
    Components smaller than ``min_area`` pixels or scoring below ``min_score`` are dropped.
    """
    recall_prob = np.asarray(recall_prob, dtype=np.float32)
    if recall_prob.ndim != 2:
        raise ValueError(f"recall_prob must be (H, W), got shape {recall_prob.shape}")
    if exclude is not None and exclude.shape != recall_prob.shape:
        raise ValueError(f"exclude has shape {exclude.shape}, recall_prob {recall_prob.shape}")
    components, count = ndimage.label(recall_prob >= threshold)
    if count == 0:
        return []
    proposals = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        component = components[box] == index
        area = int(component.sum())
        if area < min_area:
            continue
        if exclude is not None:
            excluded = component & exclude[box]
            if excluded.sum() > max_excluded_fraction * area:
                continue
            component = component & ~excluded
            area = int(component.sum())
            if area < min_area:
                continue
        score = float(recall_prob[box][component].mean())
        if score < min_score:
            continue
        rows, cols = box
        proposals.append(Proposal.from_crop(component, (rows.start, rows.stop, cols.start, cols.stop),
                                            recall_prob.shape, score))
    proposals.sort(key=lambda p: -p.score)
    return proposals[:max_proposals]


def upscale_proposal(proposal: Proposal, logits: np.ndarray, size: Tuple[int, int], exclude: np.ndarray,
                     object_prob: Optional[np.ndarray] = None) -> Proposal:
    """A proposal found on the grid of the logit map ``logits`` (h, w) -> the same object at full
    ``size``: the logits of the component and of one pixel around it, bilinearly upscaled and
    cut at 0 (probability 0.5), computed in its box only, without the pixels of bool ``exclude``
    (``size``) or of the object ``object_prob >= 0.49`` (``size``)."""

    def blocked(rows: slice, cols: slice) -> np.ndarray:
        out = exclude[rows, cols]
        return out if object_prob is None else out | (object_prob[rows, cols] >= MASK_THRESHOLD)

    region = proposal.region
    h, w = region.height, region.width
    if logits.shape != (h, w):
        raise ValueError(f"logits have shape {logits.shape}, the proposal's grid is {(h, w)}")
    if (h, w) == tuple(size):
        return Proposal.from_crop(region.crop() & ~blocked(*region.slices), region.box, size, proposal.score)
    sy, sx = size[0] / h, size[1] / w
    y0, y1, x0, x1 = region.box
    py0, py1, px0, px1 = max(0, y0 - 1), min(h, y1 + 1), max(0, x0 - 1), min(w, x1 + 1)  # a pixel of context
    around = np.zeros((py1 - py0, px1 - px0), dtype=bool)
    around[y0 - py0:y1 - py0, x0 - px0:x1 - px0] = region.crop()
    around = ndimage.binary_dilation(around, structure=np.ones((3, 3), bool))  # its fall-off, not its neighbours
    padded = np.where(around, logits[py0:py1, px0:px1], OUTSIDE_LOGIT).astype(np.float32)
    # map the crop exactly: align pixel grids by resizing the crop to its full-size extent
    up = F.interpolate(torch.from_numpy(padded)[None, None], size=(round((py1 - py0) * sy), round((px1 - px0) * sx)),
                       mode="bilinear", align_corners=False)[0, 0].numpy() >= 0
    Y0, X0 = int(np.floor(py0 * sy)), int(np.floor(px0 * sx))
    Y1, X1 = min(size[0], Y0 + up.shape[0], math.ceil(py1 * sy)), min(size[1], X0 + up.shape[1], math.ceil(px1 * sx))
    crop = up[:Y1 - Y0, :X1 - X0] & ~blocked(slice(Y0, Y1), slice(X0, X1))
    return Proposal.from_crop(crop, (Y0, Y1, X0, X1), size, proposal.score)


def propose(predictor: ClickSegPredictor, state: ImageState, exemplar_mask: np.ndarray, clicks: Sequence[Click],
            object_prob: np.ndarray, exclude: Optional[np.ndarray] = None, **options) -> List[Proposal]:
    """Other objects like the exemplar, as ``Proposal``s in full-size pixels (best first).

    exemplar_mask bool (H, W): the union of the accepted objects of the label; clicks and
    object_prob (H, W): the current object's clicks and probability map. No proposal covers the
    current object (``object_prob >= 0.49``) or bool ``exclude`` (H, W), the other pixels to keep
    free (accepted objects; defaults to the exemplar mask). ``options`` go to
    ``propose_objects`` (``min_score``, ``min_area`` in full-size pixels, ...).
    """
    if exclude is None:
        exclude = exemplar_mask
    elif np.shape(exclude) != (state.height, state.width):
        raise ValueError(f"exclude has shape {np.shape(exclude)}, expected ({state.height}, {state.width})")
    exclude = np.asarray(exclude, dtype=bool)
    logits = predictor.recall_logits(state, exemplar_mask, clicks, object_prob)
    # components on the recall output grid; each is upscaled from its logits to full size
    logits_grid = logits[0, 0].cpu().numpy()
    prob_grid = 1.0 / (1.0 + np.exp(-logits_grid))
    grid = prob_grid.shape
    if "min_area" in options:
        scale = (grid[0] * grid[1]) / (state.height * state.width)
        options["min_area"] = max(1, int(round(options["min_area"] * scale)))
    object_grid = predictor.object_prob_at(state, object_prob, grid)[0, 0].cpu().numpy()
    blocked = (shrink_map(exclude, grid) > 0.5) | (object_grid >= MASK_THRESHOLD)
    found = propose_objects(prob_grid, blocked, **options)
    return [upscale_proposal(p, logits_grid, (state.height, state.width), exclude, object_prob) for p in found]
