"""What every trainer shares: configs (YAML + dotted overrides, unknown keys rejected by name), the
warm-up + cosine schedule, atomic resume state, JSON-lines logs, the step loop and the command
line. ``train.Trainer`` (the segmenter, ICL) and ``recall.RecallTrainer`` are its subclasses."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
import typing
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import yaml
from tqdm import tqdm

from ..checkpoint import resolve_device

log = logging.getLogger(__name__)


# --- configuration ----------------------------------------------------------------------------


def _list_item_type(hint: Any) -> Optional[type]:
    """The dataclass of the items of a field annotated ``List[<dataclass>]``, else None."""
    args = typing.get_args(hint) if typing.get_origin(hint) is list else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def _build_dataclass(cls, data: Dict[str, Any], path: str = ""):
    """``cls(**data)`` recursively, rejecting unknown keys by their full name."""
    if not isinstance(data, dict):
        raise ValueError(f"config {path or 'root'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{path}.{key}" if path else key
        if key not in fields:
            raise ValueError(f"unknown config key {name!r}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else fields[key].default
        if dataclasses.is_dataclass(default):
            value = _build_dataclass(type(default), value, name)
        elif (item := _list_item_type(hints.get(key))) is not None:
            value = [_build_dataclass(item, d, f"{name}[{i}]") for i, d in enumerate(value)]
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _set_dotted(data: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
    data[keys[-1]] = value


def load_config(path: Optional[str | Path], overrides: Sequence[str], cls: type):
    """A ``cls`` config from a YAML file (optional) + ``key.sub=value`` overrides (values parsed as YAML)."""
    data: Dict[str, Any] = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(value))
    return _build_dataclass(cls, data)


def config_to_dict(config: Any) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


# --- the trainer ------------------------------------------------------------------------------


class TrainerBase:
    """What every trainer shares: device and threads, the warm-up + cosine schedule, atomic resume
    state (``out_dir/last.pt``), log lines and the step loop.

    A subclass builds ``self.net`` and ``self.optimizer``, then calls ``_begin()``; it implements
    ``train_step()``, ``export(name)``, ``_state()`` / ``_load_state(state)`` (what ``last.pt`` holds
    besides the optimiser, schedule and step), and may hook ``_after_step(stats)``.
    """

    progress_name = "train"

    def __init__(self, config: Any):
        self.config = config
        self.device = resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.step = 0

    def _begin(self, config_dict: Dict[str, Any]) -> None:
        """With the network and optimiser built: the schedule, the config file, and resume."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
        self._resume()

    def _lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.config.warmup_steps))
        progress = min(1.0, step / max(1, self.config.steps))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))

    # --- checkpoints ---
    @property
    def state_path(self) -> Path:
        return self.out_dir / "last.pt"

    def _state(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _load_state(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _resume(self) -> None:
        if not self.state_path.exists():
            return
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        self._load_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", self.state_path, self.step)

    def save_state(self) -> None:
        state = {**self._state(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step}
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def export(self, name: str) -> Path:
        raise NotImplementedError

    # --- the loop ---
    def train_step(self) -> Dict[str, float]:
        raise NotImplementedError

    def _after_step(self, stats: Dict[str, Any]) -> None:
        """Called after every step (logged or not): progress callbacks, validation."""

    def _log(self, record: Dict[str, Any]) -> None:
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run_steps(self) -> None:
        """Train to ``config.steps``: log every ``log_every``, save state and ``last`` every ``checkpoint_every``."""
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.progress_name, dynamic_ncols=True, disable=None)
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            stats = self.train_step()
            stats.update(sec_per_step=time.perf_counter() - t0, step=self.step, lr=self.scheduler.get_last_lr()[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", iou=f"{stats['iou']:.3f}", s=f"{stats['sec_per_step']:.2f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(stats)
            self._after_step(stats)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_state()
                self.export("last")
        bar.close()


def command_line(argv: Optional[Sequence[str]], description: str, config_cls: type, trainer_cls: type) -> None:
    """``--config FILE --set key=value ...``: build the trainer of ``config_cls``, run it, print its summary."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, value parsed as YAML); repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set, cls=config_cls)
    except ValueError as exc:
        parser.error(str(exc))
    result = trainer_cls(config).run()
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
