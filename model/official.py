"""Official SimpleClick / CFR-ICL checkpoints (isegm ``.pth`` pickles) -> ``plainvit`` networks.

    net = load_official_checkpoint("cocolvis_icl_vit_huge.pth")

The pickle is read by a restricted unpickler that never imports the official code base and
never runs code stored in it; the architecture comes from the pickled config, or from the
tensor shapes of a bare state dict, and the weights load strictly.
"""
from __future__ import annotations

import collections
import math
import pickle
import types
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from .checkpoint import short_message
from .nets.plainvit import IMAGENET_MEAN, IMAGENET_STD, UPSAMPLE_FACTORS
from .nets.registry import create_model


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
        raise ValueError(f"official checkpoint {path} does not match plainvit {config}: {short_message(exc)}") from None
    # Non-persistent buffers were created on meta; rebuild them from the config.
    net.image_mean = torch.tensor(net.arch_config["image_mean"]).view(1, 3, 1, 1)
    net.image_std = torch.tensor(net.arch_config["image_std"]).view(1, 3, 1, 1)
    net.checkpoint_path = str(path)
    return net.to(map_location).eval()
