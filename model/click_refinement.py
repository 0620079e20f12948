"""Click-consistency refinement (f-BRS-B style; Sofiiuk et al., CVPR 2020).

When the prediction contradicts a click (a positive click's pixel off the mask, or a negative
click's pixel on it), per-channel scales and biases of the decoder features are optimised with
L-BFGS so that the click disks take their labels, with an L2 pull towards the identity. Only the
network's head runs in the loop, on small windows around the clicks; the decoder features are
those of the prediction's last pass.

    prob = refine_for_clicks(net, features, maps, clicks, iterations=10)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .clicks import MASK_THRESHOLD, Click

HEAD_HALO = 2  # cells around a logit that the head's two 3x3 convolutions read


def clicks_disagree(prob: torch.Tensor, clicks: Sequence[Click]) -> bool:
    """True when a click's pixel in ``prob`` (1, 1, H, W) lies on the wrong side of the threshold.

    Clicks outside the map (beyond a zoom-in box) are not checked.
    """
    h, w = prob.shape[-2:]
    for c in clicks:
        y, x = round(c.y), round(c.x)
        if 0 <= y < h and 0 <= x < w and (float(prob[0, 0, y, x]) > MASK_THRESHOLD) != c.is_positive:
            return True
    return False


@dataclass
class ClickWindows:
    """Windows of the head's inputs around k clicks, for one batched head pass.

    Each window is a slice of the map, clamped inside it, that reaches ``reach + HEAD_HALO``
    cells past the click's cell wherever the map allows, so the head gives exactly the full map's
    logits on every cell within ``reach`` of the click (a window edge is either the map's edge,
    zero-padded alike, or ``HEAD_HALO`` cells beyond those cells). features (k, C, sh, sw) and
    clicks_small (k, 3, sh, sw) are the windows; weight (k, sh, sw) is each click's disk cover on
    the cells within ``reach`` of it (0 elsewhere); labels (k,) 1.0 or 0.0.
    """

    features: torch.Tensor
    clicks_small: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def around(cls, features: torch.Tensor, clicks_small: torch.Tensor, clicks: Sequence[Click], stride: float,
               reach: int) -> Optional["ClickWindows"]:
        """The windows of the clicks that lie on the map; None when none does (all beyond a zoom-in view)."""
        grid_h, grid_w = features.shape[-2:]
        side = 2 * (reach + HEAD_HALO) + 1
        side_h, side_w = min(side, grid_h), min(side, grid_w)
        feature_windows, click_windows, weights, labels = [], [], [], []
        for c in clicks:
            cy, cx = math.floor((c.y + 0.5) / stride), math.floor((c.x + 0.5) / stride)  # the clicked pixel's cell
            if not (0 <= cy < grid_h and 0 <= cx < grid_w):
                continue
            y0 = min(max(cy - reach - HEAD_HALO, 0), grid_h - side_h)
            x0 = min(max(cx - reach - HEAD_HALO, 0), grid_w - side_w)
            rows, cols = slice(y0, y0 + side_h), slice(x0, x0 + side_w)
            near = torch.zeros(side_h, side_w, device=features.device)
            near[max(cy - reach - y0, 0):cy + reach + 1 - y0, max(cx - reach - x0, 0):cx + reach + 1 - x0] = 1
            feature_windows.append(features[:, :, rows, cols])
            click_windows.append(clicks_small[:, :, rows, cols])
            weights.append(clicks_small[0, 1 if c.is_positive else 2, rows, cols] * near)
            labels.append(float(c.is_positive))
        if not weights:
            return None
        return cls(torch.cat(feature_windows), torch.cat(click_windows), torch.stack(weights),
                   torch.tensor(labels, device=features.device))


def refine_for_clicks(net, features: torch.Tensor, click_maps: torch.Tensor, clicks: Sequence[Click],
                      iterations: int, weight_decay: float = 1e-2) -> torch.Tensor:
    """Probabilities (1, 1, H, W) after optimising feature scales and biases for the click disks.

    net: a network with ``head_logits(features, click_maps)`` whose head reads at most ``HEAD_HALO``
    cells around a logit; features (1, C, h, w) from its ``decoder_features``; click_maps
    (1, 3, H, W) as the network saw them (channels 1 and 2: the positive and negative disks);
    clicks in the same pixels. The loss is a binary cross-entropy on the feature-grid cells under
    each click's disk, weighted by how much of a cell the disk covers, computed exactly on
    ``ClickWindows``; the result is the head on the full map. The network's weights are not changed.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    grid = features.shape[-2:]
    stride = click_maps.shape[-2] / grid[0]
    reach = math.ceil(net.click_radius / stride) + 1  # cells a disk can cover around its click's cell
    with torch.inference_mode(False), torch.enable_grad():
        # Copies made outside inference mode, so autograd may use them.
        features = features.detach().clone().float()
        click_maps = click_maps.detach().clone().float()
        windows = ClickWindows.around(features, F.adaptive_avg_pool2d(click_maps, grid), clicks, stride, reach)
        channels = features.shape[1]
        scale = torch.ones(1, channels, 1, 1, device=features.device, requires_grad=True)
        bias = torch.zeros(1, channels, 1, 1, device=features.device, requires_grad=True)
        if windows is not None:
            weight = windows.weight / windows.weight.sum(dim=(1, 2), keepdim=True).clamp_min(1e-6) / len(windows.labels)
            target = windows.labels.view(-1, 1, 1).expand_as(weight)

            def closure() -> torch.Tensor:
                logits = net.head_logits(windows.features * scale + bias, windows.clicks_small).float()[:, 0]
                bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
                loss = (bce * weight).sum() + weight_decay * (((scale - 1) ** 2).sum() + (bias ** 2).sum())
                scale.grad, bias.grad = torch.autograd.grad(loss, [scale, bias])
                return loss.detach()

            torch.optim.LBFGS([scale, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe").step(closure)
        with torch.no_grad():
            logits = net.head_logits(features * scale + bias, click_maps).float()
            return torch.sigmoid(F.interpolate(logits, size=click_maps.shape[-2:], mode="bilinear",
                                               align_corners=False))
