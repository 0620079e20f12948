"""One object is the mask's parts that hold a positive click.

The network often also lights up other objects like the clicked one (the other people of a crowd,
the other cups on a table). A connected part of the mask (8-connected, at ``MASK_THRESHOLD``) with
no positive click on it is such another object: its probabilities are lowered to just below the
threshold, so it leaves the mask and the map fed back with the next click. A part the object
really has is kept by a positive click on it, the click the standard clicker (and an annotator)
makes in the largest missed region.

    prob = keep_clicked_components(prob, clicks)   # (1, 1, H, W), clicks in its pixels

Where no positive click lies on the mask (a contradicted click, a box whose centre is off the
object), the map is returned unchanged.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from .clicks import MASK_THRESHOLD, Click

UNCLICKED_PROB = MASK_THRESHOLD - 0.01  # the most an unclicked part keeps: just off the mask


def keep_clicked_components(prob: torch.Tensor, clicks: Sequence[Click]) -> torch.Tensor:
    """``prob`` (1, 1, H, W) with every mask component that holds no positive click (pixel centres
    of this map, rounded; clicks outside it read the nearest pixel) lowered to ``UNCLICKED_PROB``."""
    h, w = prob.shape[-2:]
    on = (prob[0, 0] > MASK_THRESHOLD).cpu().numpy()
    count, labels = cv2.connectedComponents(on.astype(np.uint8), connectivity=8)
    if count <= 2:  # background and at most one part
        return prob
    clicked = {int(labels[min(max(round(c.y), 0), h - 1), min(max(round(c.x), 0), w - 1)])
               for c in clicks if c.is_positive} - {0}
    if not clicked:
        return prob
    unclicked_label = np.ones(count, bool)
    unclicked_label[sorted(clicked)] = False
    unclicked_label[0] = False  # the background
    unclicked = torch.from_numpy(unclicked_label[labels]).to(prob.device)
    return torch.where(unclicked, prob.clamp(max=UNCLICKED_PROB), prob)
