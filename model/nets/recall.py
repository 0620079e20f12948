"""Exemplar recall: segment every object that looks like the accepted exemplar(s).

iCMFormer++-style ("Learning from Exemplars for Interactive Image Segmentation"):

1. ``encode``: click-independent image features at stride 8 from a frozen ImageNet
   EfficientNet-Lite (stages at strides 8 and 16) and a trained embedding, computed once per
   image.
2. Exemplar-informed module: the exemplar's features are pooled into a prototype and also
   kept as correlation kernels; cosine similarity with every pixel gives response maps.
   The clicked object's features give two more.
3. Channel fusion (squeeze-excitation over [features, responses, masks, click disks]) and a
   dilated recall head -> logits of *all* objects of the exemplar's category.

``model.proposals`` turns the recall map into separate proposals.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import IMAGE_MEAN, IMAGE_STD, conv_bn_relu

RECALL_STAGES = (2, 4)  # backbone stages used: strides 8 and 16
FINE_STAGE = 1  # stride 4, for the optional boundary refinement
RECALL_STRIDE = 8
RECALL_CLICK_RADIUS = 8  # click disk radius at recall-input resolution
# correlation kernels kept per mask (strided subsample beyond this); 256 instead of 1024 cuts the
# recall head by ≈ 20 % on large exemplars, recall masks agree at IoU 0.98 (BSDS500 val, largest regions)
MAX_KERNELS = 256
# Input channels of the fusion module besides the features: 4 responses, exemplar, object, pos, neg, prev.
GUIDANCE_CHANNELS = 9


def masked_responses(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Prototype and correlation-kernel responses of L2-normalised ``features`` to a soft mask.

    features (B, C, h, w), unit length along C; weights (B, 1, h, w) in [0, 1].
    Returns (B, 2, h, w): cosine similarity to the weighted mean feature, and the maximum
    cosine similarity to any kernel (pixels with weight >= 0.5, or the heaviest pixel).
    Both are 0 where the mask is empty.
    """
    b, c, h, w = features.shape
    flat = features.flatten(2)  # (B, C, hw)
    wflat = weights.flatten(2)  # (B, 1, hw)
    mass = wflat.sum(-1, keepdim=True)  # (B, 1, 1)
    proto = F.normalize((flat * wflat).sum(-1) / mass.squeeze(-1).clamp(min=1e-6), dim=1)  # (B, C)
    proto_map = torch.einsum("bc,bcn->bn", proto, flat).view(b, 1, h, w)
    corr = []
    for i in range(b):
        chosen = torch.nonzero(wflat[i, 0] >= 0.5).flatten()
        if chosen.numel() == 0:
            chosen = wflat[i, 0].argmax().view(1)
        if chosen.numel() > MAX_KERNELS:
            chosen = chosen[torch.linspace(0, chosen.numel() - 1, MAX_KERNELS, device=chosen.device).long()]
        kernels = flat[i][:, chosen]  # (C, K)
        corr.append((kernels.t() @ flat[i]).amax(0))  # (hw,)
    corr_map = torch.stack(corr).view(b, 1, h, w)
    present = (mass.view(b, 1, 1, 1) > 1e-6).to(features.dtype)
    return torch.cat([proto_map, corr_map], 1) * present


class ChannelFusion(nn.Module):
    """1x1 projection of the concatenated streams, reweighted per channel (squeeze-excitation)."""

    def __init__(self, cin: int, cout: int, reduction: int = 4):
        super().__init__()
        self.project = conv_bn_relu(cin, cout, kernel=1)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cout, cout // reduction, 1), nn.ReLU(inplace=True),
            nn.Conv2d(cout // reduction, cout, 1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return x * self.gate(x)


class DilatedBlock(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class RecallFeatures(NamedTuple):
    """Click-independent features of one image (``ExemplarRecall.encode``), computed once:
    ``coarse`` (B, C, H/8, W/8); ``unit``, ``coarse`` L2-normalised along C (for the cosine
    responses); with a refinement stage, ``fine_term`` (B, R, H/4, W/4), the stride-4 features'
    share of the refinement's first convolution (else None)."""

    coarse: torch.Tensor
    unit: torch.Tensor
    fine_term: Optional[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)


class ExemplarRecall(nn.Module):
    """Exemplar-informed recall branch.

    encode(image (B, 3, H, W) in [0, 1]) -> RecallFeatures; H, W multiples of 16.
    forward(features, exemplar, object_prob, click_maps, prev) -> logits (B, 1, H/8, W/8)
    (H/4, W/4 with ``refine_channels``), where exemplar, object_prob, prev are (B, 1, H', W')
    and click_maps (B, 2, H', W') [pos, neg] at any resolution (area-resized inside).
    """

    size_multiple = 16

    def __init__(self, variant: str = "lite0", channels: int = 64, refine_channels: int = 0):
        super().__init__()
        backbone = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        self.conv_stem = backbone.conv_stem
        self.bn1 = backbone.bn1
        self.blocks = backbone.blocks[: max(RECALL_STAGES) + 1]
        stage_channels = [self.blocks[i][-1].conv_pwl.out_channels for i in RECALL_STAGES]
        self.embed = nn.Sequential(
            conv_bn_relu(sum(stage_channels), channels, kernel=1),
            nn.Conv2d(channels, channels, 3, 1, 1),
        )
        self.fusion = ChannelFusion(channels + GUIDANCE_CHANNELS, channels)
        self.head = nn.Sequential(
            DilatedBlock(channels, 1), DilatedBlock(channels, 2), DilatedBlock(channels, 4), DilatedBlock(channels, 1),
            nn.Conv2d(channels, 1, 1),
        )
        self.refine_channels = refine_channels
        if refine_channels:
            # Stride-4 boundary refinement from the stride-4 backbone stage.
            fine_in = self.blocks[FINE_STAGE][-1].conv_pwl.out_channels
            self.fine_embed = conv_bn_relu(fine_in, refine_channels, kernel=1)
            self.refine = nn.Sequential(
                conv_bn_relu(channels + refine_channels + 1, refine_channels),
                conv_bn_relu(refine_channels, refine_channels),
                nn.Conv2d(refine_channels, 1, 1),
            )

    def backbone_modules(self) -> List[nn.Module]:
        """The ImageNet part (kept frozen, BatchNorm in eval mode)."""
        return [self.conv_stem, self.bn1, self.blocks]

    def backbone_stages(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Frozen ImageNet features of image (B, 3, H, W) in [0, 1]: (strides 8 + 16 stacked at
        H/8, stride-4 stage at H/4)."""
        x = self.bn1(self.conv_stem((image - IMAGE_MEAN) / IMAGE_STD))
        stages, fine = [], None
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i == FINE_STAGE:
                fine = x
            if i in RECALL_STAGES:
                stages.append(x)
        size = stages[0].shape[-2:]
        stacked = torch.cat([stages[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                                           for s in stages[1:]], 1)
        return stacked, fine

    def embed_stages(self, stages: Tuple[torch.Tensor, torch.Tensor]) -> RecallFeatures:
        stacked, fine = stages
        coarse = self.embed(stacked)
        fine_term = None
        if self.refine_channels:  # the first refinement conv reads [up (C), fine (R), up_logits (1)]
            conv, c = self.refine[0][0], coarse.shape[1]
            fine_term = F.conv2d(self.fine_embed(fine), conv.weight[:, c:c + self.refine_channels], padding=conv.padding)
        return RecallFeatures(coarse, F.normalize(coarse, dim=1), fine_term)

    def encode(self, image: torch.Tensor) -> RecallFeatures:
        return self.embed_stages(self.backbone_stages(image))

    def forward(self, features: RecallFeatures, exemplar: torch.Tensor, object_prob: torch.Tensor,
                click_maps: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        coarse = features.coarse
        size = coarse.shape[-2:]
        small = [F.adaptive_avg_pool2d(t.to(coarse.dtype), size) for t in (exemplar, object_prob, click_maps, prev)]
        exemplar_s, object_s = small[0], small[1]
        unit = features.unit
        guidance = torch.cat([masked_responses(unit, exemplar_s), masked_responses(unit, object_s)] + small, 1)
        x = self.head[:-1](self.fusion(torch.cat([coarse, guidance], 1)))
        logits = self.head[-1](x)
        if not self.refine_channels:
            return logits
        fine_size = features.fine_term.shape[-2:]
        up = F.interpolate(x, size=fine_size, mode="bilinear", align_corners=False)
        up_logits = F.interpolate(logits, size=fine_size, mode="bilinear", align_corners=False)
        # refine(cat[up, fine, up_logits]) with the fine share precomputed (a conv is a sum over inputs)
        (conv, bn, relu), c = self.refine[0], x.shape[1]
        first = (F.conv2d(up, conv.weight[:, :c], padding=conv.padding) + features.fine_term
                 + F.conv2d(up_logits, conv.weight[:, c + self.refine_channels:], padding=conv.padding))
        return up_logits + self.refine[1:](relu(bn(first)))
