"""Architecture registry: one name -> one builder, configuration is data.

The architectures (``effnet_lite``, ``plainvit``) register themselves when ``model`` is imported.

    @register_model("effnet-lite", defaults={"input_size": 320, ...})
    def build(config): ...

    net = create_model("effnet-lite", {"decoder_channels": 64})
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[[Dict[str, Any]], nn.Module]
    defaults: Mapping[str, Any]


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, defaults: Mapping[str, Any]):
    """Decorator registering ``builder(config) -> nn.Module`` under ``name``."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, dict(defaults))
        return builder

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def resolve_config(name: str, config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Defaults of ``name`` updated with ``config``; unknown keys raise ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    entry = _REGISTRY[name]
    config = dict(config or {})
    unknown = sorted(set(config) - set(entry.defaults))
    if unknown:
        raise ValueError(f"unknown config key(s) for architecture {name!r}: {', '.join(unknown)}")
    return {**entry.defaults, **config}


def create_model(name: str, config: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Build architecture ``name``; the resolved config is stored on ``module.arch_config``."""
    resolved = resolve_config(name, config)
    net = _REGISTRY[name].builder(resolved)
    net.arch_name = name
    net.arch_config = resolved
    return net
