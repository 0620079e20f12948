"""Segmentation losses (logits in, per-sample loss out)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..clicks import IGNORE_VALUE


def normalized_focal_loss(logits: torch.Tensor, gt: torch.Tensor, alpha: float = 0.5, gamma: float = 2.0,
                          eps: float = 1e-8) -> torch.Tensor:
    """Normalized Focal Loss (RITM / CFR-ICL), one value per sample.

    logits (B, 1, H, W); gt (B, 1, H, W) with 1 object, 0 background, IGNORE_VALUE ignored.
    The focal weights are rescaled so they sum to the number of valid pixels.
    """
    valid = (gt != IGNORE_VALUE).float()
    target = (gt == 1).float()
    prob = torch.sigmoid(logits.float())
    pt = torch.where(target > 0, prob, 1 - prob)
    alpha_t = torch.where(target > 0, torch.full_like(prob, alpha), torch.full_like(prob, 1 - alpha)) * valid
    beta = (1 - pt) ** gamma * valid
    valid_sum = valid.sum(dim=(1, 2, 3), keepdim=True)
    scale = (valid_sum / (beta.sum(dim=(1, 2, 3), keepdim=True) + eps)).detach()
    loss = -alpha_t * beta * scale * torch.log(torch.clamp(pt + eps, max=1.0))
    return loss.sum(dim=(1, 2, 3)) / (valid_sum.flatten() + eps)


def binary_cross_entropy(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Plain BCE over valid pixels, one value per sample (an alternative to NFL)."""
    valid = (gt != IGNORE_VALUE).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), (gt == 1).float(), reduction="none") * valid
    return loss.sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1)


LOSSES = {"nfl": normalized_focal_loss, "bce": binary_cross_entropy}
