"""``plainvit``: SimpleClick / CFR-ICL (``isegm`` ``PlainVitModel``), state-dict compatible.

A plain ViT whose patch embedding of the click maps is added to the image patch
embedding, a SimpleFPN neck (strides 4, 8, 16, 32) and a SegFormer-style head.
Module and parameter names reproduce the official ones, so official weights
(for example CFR-ICL's ``cocolvis_icl_vit_huge.pth``) load unchanged through
``load_official_checkpoint``, which never imports the official code base and
never runs code stored in the pickle.

Forward, as the official model (eval mode):
    image (B,3,H,W) in [0,1] -> ImageNet normalisation -> patch_embed
    click maps [prev_mask, pos disks, neg disks] -> patch_embed_coords
    tokens = image tokens + click tokens + pos_embed (bicubic-resized when the grid differs)
    ViT blocks: windowed attention (224x224-pixel windows) except every ``depth // 4``-th
    block (every 6th for depth 12), which is global
    SimpleFPN -> head -> logits at stride 4 (x1) -> bilinear, align_corners=True, to (H, W).
"""
from __future__ import annotations

import collections
import math
import pickle
import types
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clicks import Click, encode_click_maps
from .registry import create_model, register_model

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


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
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


def official_points_to_click_maps(points: torch.Tensor, prev_mask: Optional[torch.Tensor],
                                  height: int, width: int, radius: float = 5) -> torch.Tensor:
    """Official ``points`` (B, 2N, 3) rows ``(y, x, click_index)`` -> click maps (B, 3, H, W).

    The first N rows are positive clicks, the last N negative; rows whose y and x are both
    negative are padding (official ``DistMaps``: ``max(y, x) < 0``). Disks are
    ``(row - y)^2 + (col - x)^2 <= radius^2``, exactly as ``DistMaps(use_disks=True)``.
    """
    if points.ndim != 3 or points.shape[2] != 3 or points.shape[1] % 2:
        raise ValueError(f"points: expected shape (B, 2N, 3), got {tuple(points.shape)}")
    half = points.shape[1] // 2
    maps = []
    for b in range(points.shape[0]):
        clicks = [Click(float(y), float(x), i < half)
                  for i, (y, x, _) in enumerate(points[b].tolist()) if max(y, x) >= 0]
        mask = None if prev_mask is None else prev_mask[b]
        maps.append(encode_click_maps(clicks, height, width, mask, radius=radius, device=points.device))
    return torch.cat(maps, dim=0)


# --- official checkpoints -----------------------------------------------------------------------

class PickledObjectPlaceholder:
    """Stands in for any class or function named in an official pickle (e.g. isegm's
    ``CrossEntropyLoss``). It records its construction arguments, state and items, and runs nothing."""

    pickled_module = ""
    pickled_name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(pickled_args=args, pickled_state=None, pickled_items=[])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):  # BUILD
        self.__dict__["pickled_state"] = state

    def __setitem__(self, key, value):  # SETITEM(S) of a pickled dict subclass
        self.pickled_items.append((key, value))

    def append(self, value):  # APPEND(S) of a pickled list subclass
        self.pickled_items.append(value)

    def extend(self, values):
        self.pickled_items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.pickled_module}.{self.pickled_name}>"


_TORCH_DTYPES = ("float64", "double", "float32", "float", "float16", "half", "bfloat16", "complex64",
                 "complex128", "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "bool")
_TORCH_STORAGES = ("UntypedStorage", "DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage",
                   "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage")
# The only globals an official checkpoint may really resolve: tensor rebuilders, containers, dtypes.
SAFE_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    **{(builtins_name, name): value for builtins_name in ("builtins", "__builtin__")
       for name, value in (("set", set), ("frozenset", frozenset))},
    **{("torch", name): getattr(torch, name) for name in _TORCH_DTYPES + _TORCH_STORAGES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only ``SAFE_GLOBALS``; every other global
    becomes an inert ``PickledObjectPlaceholder`` subclass, so no stored code can run.
    ``replaced`` lists the ``module.name`` of every global that was replaced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replaced: List[str] = []

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        self.replaced.append(f"{module}.{name}")
        return type(f"Placeholder_{name}", (PickledObjectPlaceholder,),
                    {"pickled_module": module, "pickled_name": name})


def _restricted_pickle_module() -> types.ModuleType:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)``."""
    module = types.ModuleType("ls_clickseg_restricted_pickle")
    module.Unpickler = RestrictedUnpickler

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    module.load = load
    return module


def load_official_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Contents of an official ``.pth`` through ``RestrictedUnpickler`` (nothing stored runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        # weights_only=False only because torch refuses a custom pickle_module otherwise;
        # the restricted unpickler is what keeps loading safe.
        return torch.load(path, map_location=map_location, pickle_module=_restricted_pickle_module(),
                          weights_only=False)
    except Exception as exc:  # a malformed pickle can fail in many ways; all mean "unreadable"
        raise ValueError(f"official checkpoint {path} cannot be read: {exc}") from exc


def _param(params: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Value of one entry of an isegm serialized config (``{'type':..., 'value':...}``)."""
    entry = params.get(name)
    if entry is None:
        return default
    return entry.get("value", default) if isinstance(entry, Mapping) else entry


def _pair(value: Any, what: str) -> int:
    """Side of a square ``(s, s)`` / ``s`` official size."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"official {what} {value} is not square; plainvit supports square sizes only")
        value = value[0]
    return int(value)


def _number(value: Any) -> int | float:
    """``value`` as int when integral, else float (keeps configs JSON-serialisable)."""
    value = float(value)
    return int(value) if value.is_integer() else value


# num_heads of the official ViTs, for checkpoints that carry no config (head dim is not in the weights).
_HEADS_BY_DIM = {160: 4, 768: 12, 1024: 16, 1280: 16}


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Architecture of an official PlainVitModel state dict, read from tensor shapes."""
    try:
        proj = state["backbone.patch_embed.proj.weight"]
        dim, patch = proj.shape[0], proj.shape[-1]
        grid = math.isqrt(state["backbone.pos_embed"].shape[1] - 1)
        depth = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")})
        hidden = state["backbone.blocks.0.mlp.fc1.weight"].shape[0]
        neck = [state["neck.down_4.5.weight"].shape[0], state["neck.down_8.2.weight"].shape[0],
                state["neck.down_16.0.weight"].shape[0], state["neck.down_32.2.weight"].shape[0]]
        channels = state["head.conv_seg.weight"].shape[1]
        width = state["head.convs.0.conv.weight"].shape[0]
        coords_in = state["patch_embed_coords.proj.weight"].shape[1]
    except KeyError as exc:
        raise ValueError(f"not an official PlainVitModel state dict: weight {exc} is missing") from exc
    factor = {v: k for k, v in UPSAMPLE_FACTORS.items()}.get(width // channels)
    if factor is None or width % channels:
        raise ValueError(f"head widths {width}/{channels} match no official upsample mode")
    if dim not in _HEADS_BY_DIM:
        raise ValueError(f"embed_dim {dim} is no official ViT; num_heads cannot be inferred without a config")
    return {
        "input_size": grid * patch, "patch_size": patch, "embed_dim": dim, "depth": depth,
        "num_heads": _HEADS_BY_DIM[dim], "mlp_ratio": hidden / dim,
        "qkv_bias": "backbone.blocks.0.attn.qkv.bias" in state,
        "neck_out_dims": neck, "head_channels": channels, "upsample": factor,
        "with_prev_mask": coords_in == 3,
    }


def config_from_official(official: Mapping[str, Any]) -> Dict[str, Any]:
    """``plainvit`` config from an isegm serialized config ``{'class': ..., 'params': {...}}``."""
    cls = official.get("class", "")
    if not str(cls).endswith("PlainVitModel"):
        raise ValueError(f"official checkpoint holds {cls!r}, not a PlainVitModel")
    params = official.get("params", {})
    backbone = _param(params, "backbone_params", {})
    neck = _param(params, "neck_params", {})
    head = _param(params, "head_params", {})
    if not _param(params, "use_disks", False):
        raise ValueError("official model uses distance maps (use_disks=False); plainvit encodes clicks as disks")
    if _param(params, "use_rgb_conv", False):
        raise ValueError("official model uses use_rgb_conv=True (RITM maps_transform), which PlainVitModel lacks")
    if head.get("num_classes", 1) != 1:
        raise ValueError(f"official head has {head['num_classes']} classes; plainvit predicts 1")
    if list(head.get("in_index", [0, 1, 2, 3])) != [0, 1, 2, 3]:
        raise ValueError(f"official head in_index {head['in_index']} is not [0, 1, 2, 3]")
    if list(head.get("in_channels", neck["out_dims"])) != list(neck["out_dims"]):
        raise ValueError("official head in_channels differ from the neck out_dims")
    # The head convs are conv + ReLU: no norm, default conv, default activation.
    for key, supported in (("norm_cfg", (None,)), ("conv_cfg", (None,)), ("act_cfg", (None, {"type": "ReLU"}))):
        if head.get(key) not in supported:
            raise ValueError(f"official head {key}={head[key]!r} is not supported")
    mean, std = _param(params, "norm_mean_std", (IMAGENET_MEAN, IMAGENET_STD))
    return {
        "input_size": _pair(backbone["img_size"], "img_size"),
        "patch_size": _pair(backbone["patch_size"], "patch_size"),
        "embed_dim": int(backbone["embed_dim"]),
        "depth": int(backbone.get("depth", 12)),  # official VisionTransformer defaults
        "num_heads": int(backbone.get("num_heads", 12)),
        "mlp_ratio": float(backbone.get("mlp_ratio", 4.0)),
        "qkv_bias": bool(backbone.get("qkv_bias", True)),
        "neck_out_dims": [int(c) for c in neck["out_dims"]],
        "head_channels": int(head["channels"]),
        "upsample": str(head.get("upsample", "x1")),
        "with_prev_mask": bool(_param(params, "with_prev_mask", False)),
        "norm_radius": _number(_param(params, "norm_radius", 5)),
        "image_mean": [float(v) for v in mean],
        "image_std": [float(v) for v in std],
        "head_dropout": float(head.get("dropout_ratio", 0.1)),
        "head_align_corners": bool(head.get("align_corners", False)),
    }


def load_official_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """``plainvit`` network (float32, eval mode) from an official SimpleClick / CFR-ICL checkpoint.

    Accepts ``{'state_dict': ..., 'config': ...}`` as the isegm trainer saves it, or a bare
    state dict (architecture then read from tensor shapes). Raises ValueError when the
    file is not a compatible PlainVitModel.
    """
    content = load_official_file(path, map_location="cpu")
    if isinstance(content, Mapping) and "state_dict" in content:
        state, official = content["state_dict"], content.get("config")
    else:
        state, official = content, None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"official checkpoint {path} holds no state dict of tensors")
    if isinstance(official, Mapping):
        try:
            config = config_from_official(official)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"official checkpoint {path} has an unreadable config: {exc!r}") from exc
    else:
        config = config_from_state_dict(state)
    with torch.device("meta"):
        net = create_model("plainvit", config)
    try:  # strict: missing, unexpected and wrong-shaped keys are all reported
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        raise ValueError(f"official checkpoint {path} does not match plainvit {config}: {text[:600]}") from None
    # Non-persistent buffers were created on meta; rebuild them from the config.
    net.image_mean = torch.tensor(net.arch_config["image_mean"]).view(1, 3, 1, 1)
    net.image_std = torch.tensor(net.arch_config["image_std"]).view(1, 3, 1, 1)
    net.checkpoint_path = str(path)
    return net.to(map_location).eval()
