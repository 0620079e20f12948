"""``plainvit``: SimpleClick / CFR-ICL (``isegm`` ``PlainVitModel``), state-dict compatible.

A plain ViT whose patch embedding of the click maps is added to the image patch
embedding, a SimpleFPN neck (strides 4, 8, 16, 32) and a SegFormer-style head.
Module and parameter names reproduce the official ones (the ViT blocks are timm's, whose names
already match), so official weights (for example CFR-ICL's ``cocolvis_icl_vit_huge.pth``) load
unchanged through ``model.official.load_official_checkpoint``.

Forward, as the official model (eval mode):
    image (B,3,H,W) in [0,1] -> ImageNet normalisation -> patch_embed
    click maps [prev_mask, pos disks, neg disks] -> patch_embed_coords
    tokens = image tokens + click tokens + pos_embed (bicubic-resized when the grid differs)
    ViT blocks: windowed attention (224x224-pixel windows) except every ``depth // 4``-th
    block (every 6th for depth 12), which is global
    SimpleFPN -> head -> logits at stride 4 (x1) -> bilinear, align_corners=True, to (H, W).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .registry import register_model

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# The official backbone hard-codes windows of the 224x224 pretraining resolution.
WINDOW_PIXELS = 224
IMAGENET_CLASSES = 1000  # size of the (unused) classification head kept for key compatibility
UPSAMPLE_FACTORS = {"x1": 1, "x2": 2, "x4": 4}

PLAINVIT_PRESETS: Dict[str, Dict[str, Any]] = {
    # SimpleClick / CFR-ICL ViT-B, 448, patch 16.
    "vit_base": {"input_size": 448, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
                 "neck_out_dims": [128, 256, 512, 1024], "head_channels": 256, "upsample": "x1"},
    # CFR-ICL ``cocolvis_icl_vit_huge.pth`` / SimpleClick ViT-H, 448, patch 14.
    "vit_huge": {"input_size": 448, "patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16,
                 "neck_out_dims": [240, 480, 960, 1920], "head_channels": 256, "upsample": "x1"},
    # SimpleClick xTiny (``vit_tiny_patch16``), 448.
    "xtiny": {"input_size": 448, "patch_size": 16, "embed_dim": 160, "depth": 8, "num_heads": 4,
              "neck_out_dims": [96, 192, 288, 384], "head_channels": 128, "upsample": "x1"},
}

DEFAULT_CONFIG: Dict[str, Any] = {
    **PLAINVIT_PRESETS["vit_base"],
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "with_prev_mask": True,  # click maps carry the previous mask (3 channels, else 2)
    "norm_radius": 5,  # disk radius (input pixels) the network was trained with; disks, not distance maps
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
    "head_dropout": 0.1,  # Dropout2d before the classifier (training only)
    "head_align_corners": False,  # align_corners of the head's multi-scale resize
}


# --- official building blocks (names match the isegm state dict) ------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution: (B,C,H,W) -> tokens (B, H/p * W/p, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def window_partition(x: torch.Tensor, grid: Tuple[int, int], windows: Tuple[int, int]) -> torch.Tensor:
    """(B, gh*gw, C) -> (B*wh*ww, gh*gw/(wh*ww), C): ``wh x ww`` contiguous windows (official ``patchify``)."""
    b, _, c = x.shape
    (gh, gw), (wh, ww) = grid, windows
    x = x.view(b, wh, gh // wh, ww, gw // ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * wh * ww, (gh // wh) * (gw // ww), c)


def window_merge(x: torch.Tensor, grid: Tuple[int, int], windows: Tuple[int, int]) -> torch.Tensor:
    """Inverse of ``window_partition`` (official ``unpatchify``)."""
    _, _, c = x.shape
    (gh, gw), (wh, ww) = grid, windows
    x = x.view(-1, wh, ww, gh // wh, gw // ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, gh * gw, c)


class VisionTransformer(nn.Module):
    """The official ``models_vit.VisionTransformer``; ``cls_token``, ``fc_norm`` and ``head``
    are unused by segmentation but kept so that official state dicts load strictly."""

    def __init__(self, input_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.patch_size = patch_size
        self.native_grid = (input_size // patch_size, input_size // patch_size)
        self.window_tokens = WINDOW_PIXELS // patch_size
        # Blocks i (1-based) with i % group == 0 attend globally, the others within windows.
        self.global_every = 6 if depth == 12 else depth // 4
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.native_grid[0] * self.native_grid[1] + 1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer=norm) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, IMAGENET_CLASSES)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the official ``VisionTransformer.init_weights``.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def grid_pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings (1, gh*gw, D), bicubic-resized as the official
        ``interpolate_pos_embed_inference`` when ``grid`` is not the training grid."""
        pos = self.pos_embed[:, 1:]
        if grid == self.native_grid:
            return pos
        d = pos.shape[-1]
        pos = pos.reshape(1, *self.native_grid, d).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).flatten(1, 2)

    def window_counts(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        counts = tuple(max(1, g // self.window_tokens) for g in grid)
        if grid[0] % counts[0] or grid[1] % counts[1]:
            raise ValueError(
                f"a {grid[0]}x{grid[1]} token grid does not split into {counts[0]}x{counts[1]} equal "
                f"attention windows; use an input side that gives a divisible grid (e.g. the configured input_size)"
            )
        return counts

    def forward_blocks(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Official ``forward_backbone`` after the embeddings (non-shuffled path)."""
        windows = self.window_counts(grid)
        windowed = False
        for i, block in enumerate(self.blocks, start=1):
            if i % self.global_every:
                if not windowed:
                    x, windowed = window_partition(x, grid, windows), True
            elif windowed:
                x, windowed = window_merge(x, grid, windows), False
            x = block(x)
        return window_merge(x, grid, windows) if windowed else x


class SimpleFPN(nn.Module):
    """Official SimpleFPN: ViT map (B, D, g, g) -> [stride 4, 8, 16, 32] maps of ``out_dims`` channels."""

    def __init__(self, in_dim: int, out_dims: Sequence[int]):
        super().__init__()
        c4 = max(out_dims[0] * 2, in_dim // 2)
        self.down_4 = nn.Sequential(
            nn.ConvTranspose2d(in_dim, c4, 2, stride=2), nn.GroupNorm(1, c4), nn.GELU(),
            nn.ConvTranspose2d(c4, c4 // 2, 2, stride=2), nn.GroupNorm(1, c4 // 2),
            nn.Conv2d(c4 // 2, out_dims[0], 1), nn.GroupNorm(1, out_dims[0]), nn.GELU(),
        )
        c8 = max(out_dims[1], in_dim // 2)
        self.down_8 = nn.Sequential(
            nn.ConvTranspose2d(in_dim, c8, 2, stride=2), nn.GroupNorm(1, c8),
            nn.Conv2d(c8, out_dims[1], 1), nn.GroupNorm(1, out_dims[1]), nn.GELU(),
        )
        self.down_16 = nn.Sequential(nn.Conv2d(in_dim, out_dims[2], 1), nn.GroupNorm(1, out_dims[2]), nn.GELU())
        c32 = max(out_dims[3], in_dim * 2)
        self.down_32 = nn.Sequential(
            nn.Conv2d(in_dim, c32, 2, stride=2), nn.GroupNorm(1, c32),
            nn.Conv2d(c32, out_dims[3], 1), nn.GroupNorm(1, out_dims[3]), nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [self.down_4(x), self.down_8(x), self.down_16(x), self.down_32(x)]


class ConvReLU(nn.Module):
    """mmcv ``ConvModule`` without norm: 1x1 conv + ReLU (keys ``<name>.conv.*``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x))


def _up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 2, stride=2), nn.GroupNorm(1, cout),
        nn.Conv2d(cout, cout, 1), nn.GroupNorm(1, cout), nn.GELU(),
    )


class SegHead(nn.Module):
    """Official ``SwinTransfomerSegHead`` (SegFormer all-MLP head) with one output class.

    ``up_conv1`` / ``up_conv2`` always exist (as officially) but only run for ``x2`` / ``x4``.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, upsample: str, dropout: float,
                 align_corners: bool):
        super().__init__()
        self.upsample = upsample
        self.align_corners = align_corners
        width = channels * UPSAMPLE_FACTORS[upsample]
        self.convs = nn.ModuleList(ConvReLU(c, width) for c in in_channels)
        self.fusion_conv = ConvReLU(width * len(in_channels), width)
        self.up_conv1 = _up_block(width, width // 2)
        self.up_conv2 = _up_block(width // 2, width // 4)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, 1, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        outs = []
        for conv, x in zip(self.convs, features):
            y = conv(x)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners)
            outs.append(y)
        out = self.fusion_conv(torch.cat(outs, dim=1))
        if self.upsample in ("x2", "x4"):
            out = self.up_conv1(out)
        if self.upsample == "x4":
            out = self.up_conv2(out)
        return self.conv_seg(self.dropout(out))


class PlainVitModel(nn.Module):
    """Click-conditioned plain ViT (SimpleClick / CFR-ICL).

    forward(image (B,3,H,W) in [0,1], click_maps (B,3,H,W)) -> logits (B,1,H,W).
    H and W need not be multiples of the patch size: the input is zero-padded at the
    bottom/right (after normalisation) and the output cropped back.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.patch_size = config["patch_size"]
        self.size_multiple = self.patch_size  # the predictor feeds sides that are multiples of this
        self.click_radius = config["norm_radius"]
        self.with_prev_mask = config["with_prev_mask"]
        self.register_buffer("image_mean", torch.tensor(config["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config["image_std"]).view(1, 3, 1, 1), persistent=False)
        dim = config["embed_dim"]
        self.patch_embed_coords = PatchEmbed(self.patch_size, 3 if self.with_prev_mask else 2, dim)
        self.backbone = VisionTransformer(config["input_size"], self.patch_size, dim, config["depth"],
                                          config["num_heads"], config["mlp_ratio"], config["qkv_bias"])
        self.neck = SimpleFPN(dim, config["neck_out_dims"])
        self.head = SegHead(config["neck_out_dims"], config["head_channels"], config["upsample"],
                            config["head_dropout"], config["head_align_corners"])

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image patch tokens (B, N, D): the per-image work that clicks do not change."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image: expected shape (B, 3, H, W), got {tuple(image.shape)}")
        x = (image - self.image_mean) / self.image_std
        return self.backbone.patch_embed(self._pad(x))

    def forward_prepared(self, image_tokens: torch.Tensor, click_maps: torch.Tensor) -> torch.Tensor:
        """Logits (B,1,H,W) from ``prepare_image`` tokens and click maps (B,3,H,W)."""
        if click_maps.ndim != 4 or click_maps.shape[1] != 3:
            raise ValueError(f"click_maps: expected shape (B, 3, H, W), got {tuple(click_maps.shape)}")
        height, width = click_maps.shape[-2:]
        p = self.patch_size
        grid = (math.ceil(height / p), math.ceil(width / p))
        if image_tokens.ndim != 3 or image_tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"image tokens {tuple(image_tokens.shape)} do not belong to {height}x{width} click maps "
                f"(expected {grid[0] * grid[1]} tokens); prepare the image at the click-map size"
            )
        maps = click_maps if self.with_prev_mask else click_maps[:, 1:]
        x = image_tokens + self.patch_embed_coords(self._pad(maps))
        x = x + self.backbone.grid_pos_embed(grid)
        x = self.backbone.forward_blocks(x, grid)
        b, _, d = x.shape
        features = self.neck(x.transpose(1, 2).reshape(b, d, *grid))
        logits = self.head(features)
        padded = (grid[0] * p, grid[1] * p)
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=True)
        return logits[..., :height, :width]

    def forward(self, image: torch.Tensor, click_maps: torch.Tensor) -> torch.Tensor:
        return self.forward_prepared(self.prepare_image(image), click_maps)


def validate_config(config: Mapping[str, Any]) -> None:
    """ValueError naming the first inconsistent ``plainvit`` config value."""
    p, dim = config["patch_size"], config["embed_dim"]
    if config["input_size"] % p:
        raise ValueError(f"plainvit input_size {config['input_size']} is not a multiple of patch_size {p}")
    if dim % config["num_heads"]:
        raise ValueError(f"plainvit embed_dim {dim} is not divisible by num_heads {config['num_heads']}")
    if config["depth"] < 4 or config["depth"] % 4:
        raise ValueError(f"plainvit depth must be a positive multiple of 4 (official rule), got {config['depth']}")
    if config["upsample"] not in UPSAMPLE_FACTORS:
        raise ValueError(f"plainvit upsample must be one of {sorted(UPSAMPLE_FACTORS)}, got {config['upsample']!r}")
    if len(config["neck_out_dims"]) != 4:
        raise ValueError(f"plainvit neck_out_dims needs 4 values (strides 4..32), got {config['neck_out_dims']}")
    for key in ("image_mean", "image_std"):
        if len(config[key]) != 3:
            raise ValueError(f"plainvit {key} needs 3 values, got {config[key]}")


@register_model("plainvit", defaults=DEFAULT_CONFIG)
def build_plainvit(config: Dict[str, Any]) -> nn.Module:
    validate_config(config)
    return PlainVitModel(config)
