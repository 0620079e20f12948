"""Self-describing, safely loadable checkpoints.

A checkpoint is one safetensors file. Its header metadata holds
``arch`` (registry name), ``config`` (JSON) and ``meta`` (JSON: training data,
steps, metrics, ...). Loading never unpickles anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .nets.registry import create_model, resolve_config

FORMAT_VERSION = "ls-clickseg/1"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name as given (call after forking)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_checkpoint(
    net: nn.Module,
    path: str | os.PathLike,
    meta: Optional[Mapping[str, Any]] = None,
    half: bool = False,
) -> Path:
    """Write ``net`` (built by ``create_model``) to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.clone()
    header = {
        "format": FORMAT_VERSION,
        "arch": net.arch_name,
        "config": json.dumps(net.arch_config, sort_keys=True),
        "meta": json.dumps(dict(meta or {}), sort_keys=True, default=str),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """``(arch, config, meta)`` of a checkpoint without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        arch = header["arch"]
        config = json.loads(header["config"])
        meta = json.loads(header.get("meta", "{}"))
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt or not an ls-clickseg checkpoint: {exc}") from exc
    return arch, config, meta


def short_message(exc: BaseException, limit: int = 600) -> str:
    """The first ``limit`` characters of an exception's message, on one line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def load_checkpoint(
    path: str | os.PathLike,
    expect_arch: Optional[str] = None,
    expect_config: Optional[Mapping[str, Any]] = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild the network stored in ``path`` (float32, eval mode, ``net.checkpoint_meta`` set).

    ``expect_arch`` / ``expect_config`` guard against loading the wrong model:
    a mismatch raises ValueError naming the difference.
    """
    path = Path(path)
    arch, config, meta = read_header(path)
    if expect_arch is not None and arch != expect_arch:
        raise ValueError(f"checkpoint {path} holds architecture {arch!r}, expected {expect_arch!r}")
    if expect_config is not None:
        wanted = resolve_config(arch, expect_config)
        stored = resolve_config(arch, config)
        diff = {k: (stored[k], wanted[k]) for k in wanted if stored.get(k) != wanted[k]}
        if diff:
            raise ValueError(f"checkpoint {path} config differs from the expected one (stored, expected): {diff}")
    net = create_model(arch, config)
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt: {exc}") from exc
    own = net.state_dict()
    try:  # strict: missing, unexpected and wrong-shaped keys are all reported
        net.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not match architecture {arch!r} with its config: "
                         f"{short_message(exc)}") from None
    net.checkpoint_meta = meta
    net.checkpoint_path = str(path)
    return net.to(map_location).eval()
