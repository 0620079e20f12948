"""ICL trainer: ``python -m model.training.train --config configs/default.yaml [--set key=value ...]``.

Iterative Click Loss (CFR-ICL): each sample starts from random initial clicks and an
empty mask; then ``t`` rounds (t drawn from 1..max_rounds). Each round predicts, adds
``beta[i] * loss(pred_i, gt)``, simulates the next click from the errors and feeds the
detached prediction back as the mask. The summed loss is back-propagated once.
With ``icl.loss_rounds: last`` only the last round carries a loss (the non-ICL baseline).

Resumable (model, optimiser, scheduler, step; sampling is seeded by step), atomic
checkpoints, CPU or CUDA (with mixed precision).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_checkpoint, save_checkpoint
from ..clicks import IGNORE_VALUE, MASK_THRESHOLD, Click, encode_click_maps, padded_distance
from ..data import ObjectRef, ObjectSample, open_objects, parse_dataset_spec
from ..evaluation.evaluate import evaluate_objects
from ..nets.effnet_lite import load_imagenet_backbone
from ..nets.registry import create_model
from ..predictor import ClickSegPredictor
from .augment import AugmentConfig, color_jitter, object_crop, suem_copy_paste
from .base import TrainerBase, command_line, config_to_dict
from .losses import LOSSES

log = logging.getLogger("model.training.train")


# --- configuration ----------------------------------------------------------------------------

@dataclass
class ICLConfig:
    beta: List[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    max_rounds: int = 3
    loss_rounds: str = "all"  # "all" = ICL; "last" = loss on the last round only (baseline)


@dataclass
class LossConfig:
    name: str = "nfl"
    alpha: float = 0.5
    gamma: float = 2.0


@dataclass
class ClickConfig:
    max_initial_positive: int = 3
    max_initial_negative: int = 2


@dataclass
class DatasetConfig:
    spec: str = ""
    weight: float = 1.0
    pack_max_images: Optional[int] = None  # model.training.pack: at most this many images of the set (seeded choice)
    pack_tile: int = 0  # model.training.pack: cut images into tiles of this many px first (0: whole images)


@dataclass
class ValidationConfig:
    spec: str = ""
    max_objects: int = 40
    every: int = 500
    max_clicks: int = 10


@dataclass
class TrainConfig:
    arch: str = "effnet-lite"
    arch_config: Dict[str, Any] = field(default_factory=dict)
    init: str = "imagenet"  # "imagenet", "scratch" or a checkpoint path
    datasets: List[DatasetConfig] = field(default_factory=list)
    out_dir: str = "runs/default"
    steps: int = 10000
    batch_size: int = 8
    lr: float = 5e-4
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    freeze_backbone: bool = False
    icl: ICLConfig = field(default_factory=ICLConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    clicks: ClickConfig = field(default_factory=ClickConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision, CUDA only
    threads: int = 0  # torch CPU threads, 0 = torch default


# --- object sources ---------------------------------------------------------------------------

class ObjectSource:
    """A sequence of objects: ``len(source)`` and ``source.load(i) -> ObjectSample``."""

    def __init__(self, items: Sequence[ObjectRef | ObjectSample], name: str):
        if len(items) == 0:
            raise ValueError(f"dataset {name!r} has no usable objects")
        self.items, self.name = list(items), name

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> ObjectSample:
        item = self.items[index]
        return item.load() if isinstance(item, ObjectRef) else item


def sources_from_config(config: TrainConfig) -> List[Tuple[ObjectSource, float]]:
    sources = []
    for d in config.datasets:
        objects = parse_dataset_spec(d.spec)
        for path, reason in objects.skipped:
            log.warning("dataset %s: skipped %s (%s)", d.spec, path, reason)
        sources.append((ObjectSource(objects.refs, d.spec), d.weight))
    if not sources:
        raise ValueError("config has no datasets")
    return sources


# --- click simulation -------------------------------------------------------------------------

def sample_initial_clicks(gt: np.ndarray, rng: np.random.Generator, cfg: ClickConfig) -> List[Click]:
    """Random positive clicks inside the object (away from its edge) and negatives near it."""
    obj = gt == 1
    dt = padded_distance(obj)
    inner = dt >= max(1.0, 0.2 * dt.max())
    n_pos = 1 + int(rng.choice(cfg.max_initial_positive, p=_decaying(cfg.max_initial_positive)))
    n_neg = int(rng.choice(cfg.max_initial_negative + 1, p=_decaying(cfg.max_initial_negative + 1)))
    clicks = [Click(float(y), float(x), True) for y, x in _pick(inner, n_pos, rng)]
    background = (gt == 0)
    near = background & (padded_distance(~obj) <= 0.3 * gt.shape[0])
    clicks += [Click(float(y), float(x), False) for y, x in _pick(near if near.any() else background, n_neg, rng)]
    return clicks


def _decaying(n: int) -> np.ndarray:
    p = 0.5 ** np.arange(n)
    return p / p.sum()


def _pick(region: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    coords = np.argwhere(region)
    if len(coords) == 0 or n == 0:
        return np.zeros((0, 2), int)
    return coords[rng.choice(len(coords), size=min(n, len(coords)), replace=False)]


def next_click_from_errors(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> Optional[Click]:
    """Click in the larger error region, at a random point whose distance transform exceeds half its max."""
    valid = gt != IGNORE_VALUE
    fn = (gt == 1) & ~pred & valid
    fp = (gt == 0) & pred & valid
    region, positive = (fn, True) if fn.sum() >= fp.sum() else (fp, False)
    if not region.any():
        return None
    dt = padded_distance(region)
    y, x = _pick(dt > dt.max() / 2, 1, rng)[0] if (dt > dt.max() / 2).any() else np.argwhere(dt == dt.max())[0]
    return Click(float(y), float(x), positive)


def add_error_clicks(clicks: List[List[Click]], pred: np.ndarray, gts: np.ndarray, rng: np.random.Generator) -> None:
    """The next ICL round's clicks: one more for each sample whose bool ``pred`` (B, H, W) has an
    error against ``gts`` (B, H, W), from ``next_click_from_errors``."""
    for i in range(len(clicks)):
        nxt = next_click_from_errors(pred[i], gts[i], rng)
        if nxt is not None:
            clicks[i] = clicks[i] + [nxt]


def batch_iou(pred: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean IoU of bool ``pred`` (B, H, W) against ``targets`` (B, 1, H, W): 1 object, IGNORE_VALUE ignored."""
    valid = targets[:, 0] != IGNORE_VALUE
    obj = (targets[:, 0] == 1) & valid
    inter = (pred & obj).sum((1, 2)).float()
    union = ((pred & valid) | obj).sum((1, 2)).float().clamp(min=1)
    return float((inter / union).mean())


# --- batches ----------------------------------------------------------------------------------

def make_training_pair(sources, rng: np.random.Generator, size: int, aug: AugmentConfig):
    """One augmented ``(image uint8 (S,S,3), gt uint8 (S,S))`` with a non-empty object."""
    weights = np.array([w for _, w in sources], float)
    probabilities = weights / weights.sum()
    for _ in range(20):
        source = sources[rng.choice(len(sources), p=probabilities)][0]
        sample = source.load(int(rng.integers(len(source))))
        if not (sample.mask == 1).any():
            continue
        image, gt = object_crop(sample.image, sample.mask, size, rng, aug.object_scale)
        if not (gt == 1).any():
            continue
        other_source = sources[rng.choice(len(sources), p=probabilities)][0]
        other = other_source.load(int(rng.integers(len(other_source))))
        if (other.mask == 1).any():
            other_image, other_mask = object_crop(other.image, other.mask, size, rng, aug.object_scale)
            image, new_gt, _ = suem_copy_paste(image, gt, other_image, other_mask, aug, rng)
            if (new_gt == 1).sum() >= 16:
                gt = new_gt
        if rng.uniform() < aug.flip:
            image, gt = image[:, ::-1], gt[:, ::-1]
        if aug.color_jitter > 0:
            image = color_jitter(image, rng, aug.color_jitter)
        return np.ascontiguousarray(image), np.ascontiguousarray(gt)
    raise RuntimeError("could not draw a training sample with a non-empty object in 20 tries")


def click_maps_batch(clicks: Sequence[Sequence[Click]], prev: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) click maps for per-sample clicks and previous masks ``prev`` (B, 1, H, W)."""
    b, _, h, w = prev.shape
    return torch.cat([encode_click_maps(c, h, w, prev[i, 0], device=prev.device) for i, c in enumerate(clicks)])


# --- the trainer --------------------------------------------------------------------------------

def build_network(config: TrainConfig) -> nn.Module:
    if config.init in ("imagenet", "scratch"):
        net = create_model(config.arch, config.arch_config)
        if config.init == "imagenet":
            if config.arch != "effnet-lite":
                raise ValueError(f"init 'imagenet' is available for effnet-lite only, not {config.arch!r}")
            load_imagenet_backbone(net)
        return net
    return load_checkpoint(config.init, expect_arch=config.arch).train()


BACKBONE_MODULES = ("conv_stem", "bn1", "blocks", "backbone")  # top-level names of pretrained parts


def backbone_parameters(net: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(backbone, rest): backbone = parameters under the top-level modules in BACKBONE_MODULES."""
    backbone, rest = [], []
    for name, p in net.named_parameters():
        (backbone if name.split(".")[0] in BACKBONE_MODULES else rest).append(p)
    return backbone, rest


def set_train_mode(net: nn.Module, freeze_backbone: bool) -> None:
    """Train mode; a frozen backbone also keeps its BatchNorm statistics fixed."""
    net.train()
    if getattr(net, "recall", None) is not None:
        net.recall.eval()  # not trained here; keeps its BatchNorm statistics
    if freeze_backbone:
        for name, module in net.named_modules():
            if name.split(".")[0] in BACKBONE_MODULES and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class Trainer(TrainerBase):
    """The segmenter's ICL trainer; ``run()`` trains to ``config.steps``."""

    def __init__(self, config: TrainConfig, sources=None, on_progress: Optional[Callable[[Dict], None]] = None):
        super().__init__(config)
        self.sources = sources if sources is not None else sources_from_config(config)
        self.loss_fn = LOSSES.get(config.loss.name)
        if self.loss_fn is None:
            raise ValueError(f"unknown loss {config.loss.name!r}; known: {', '.join(LOSSES)}")
        if config.icl.loss_rounds not in ("all", "last"):
            raise ValueError(f"icl.loss_rounds must be 'all' or 'last', got {config.icl.loss_rounds!r}")
        if len(config.icl.beta) < config.icl.max_rounds:
            raise ValueError(f"icl.beta needs {config.icl.max_rounds} weights, got {config.icl.beta}")
        self.on_progress = on_progress
        self.net = build_network(config).to(self.device)
        self.input_size = int(self.net.arch_config["input_size"])
        recall = getattr(self.net, "recall", None)
        if recall is not None:  # trained separately (model.training.recall); kept as it is here
            recall.requires_grad_(False)
        backbone, rest = backbone_parameters(self.net)
        rest = [p for p in rest if p.requires_grad]
        if config.freeze_backbone:
            for p in backbone:
                p.requires_grad_(False)
            groups = [{"params": rest, "lr": config.lr}]
        else:
            groups = [{"params": backbone, "lr": config.lr * config.backbone_lr_mult}, {"params": rest, "lr": config.lr}]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.best_metric = math.inf
        self.history: List[Dict[str, float]] = []
        self._begin(config_to_dict(config))

    def _state(self) -> Dict[str, Any]:
        return {"model": self.net.state_dict(), "scaler": self.scaler.state_dict(),
                "best_metric": self.best_metric, "history": json.dumps(self.history)}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_metric = float(state["best_metric"])
        self.history = json.loads(state["history"])

    def export(self, name: str, metrics: Optional[Dict] = None) -> Path:
        meta = {
            "training_data": [d.spec for d in self.config.datasets] or [s.name for s, _ in self.sources],
            "steps": self.step,
            "icl": dataclasses.asdict(self.config.icl),
            "metrics": metrics or {},
        }
        return save_checkpoint(self.net, self.out_dir / f"{name}.safetensors", meta=meta, half=True)

    # --- one step ---
    def _batch(self, rng: np.random.Generator):
        pairs = [make_training_pair(self.sources, rng, self.input_size, self.config.augment)
                 for _ in range(self.config.batch_size)]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float().div_(255)
        gts = np.stack([p[1] for p in pairs])
        return images.to(self.device), gts

    def train_step(self) -> Dict[str, float]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.step])  # sampling depends on (seed, step) only: exact resume
        torch.manual_seed(cfg.seed * 100003 + self.step)
        images, gts_np = self._batch(rng)
        gts = torch.from_numpy(gts_np)[:, None].to(self.device)
        clicks = [sample_initial_clicks(g, rng, cfg.clicks) for g in gts_np]
        rounds = int(rng.integers(1, cfg.icl.max_rounds + 1))
        prev = torch.zeros(len(clicks), 1, self.input_size, self.input_size, device=self.device)
        set_train_mode(self.net, cfg.freeze_backbone)
        total = torch.zeros((), device=self.device)
        for r in range(rounds):
            carries_loss = cfg.icl.loss_rounds == "all" or r == rounds - 1
            with torch.set_grad_enabled(carries_loss), torch.autocast(self.device.type, enabled=self.use_amp):
                logits = self.net(images, click_maps_batch(clicks, prev))
                logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
            if carries_loss:
                total = total + cfg.icl.beta[r] * self.loss_fn(logits, gts, **self._loss_kwargs()).mean()
            prob = torch.sigmoid(logits.detach().float())
            if r < rounds - 1:
                add_error_clicks(clicks, (prob[:, 0] > MASK_THRESHOLD).cpu().numpy(), gts_np, rng)
                prev = prob
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return {"loss": float(total.detach()), "iou": batch_iou(prob[:, 0] > MASK_THRESHOLD, gts), "rounds": rounds}

    def _loss_kwargs(self) -> Dict[str, float]:
        return {"alpha": self.config.loss.alpha, "gamma": self.config.loss.gamma} if self.config.loss.name == "nfl" else {}

    # --- validation ---
    def validate(self) -> Optional[Dict[str, float]]:
        v = self.config.validation
        if not v.spec:
            return None
        objects = open_objects(v.spec, max_objects=v.max_objects, seed=0)
        self.net.eval()
        result = evaluate_objects(ClickSegPredictor(self.net, device=self.device), objects,
                                  max_clicks=v.max_clicks, stop_at_iou=0.9)
        set_train_mode(self.net, self.config.freeze_backbone)
        return result.summary()

    def _after_step(self, stats: Dict[str, Any]) -> None:
        cfg = self.config
        if self.on_progress:
            self.on_progress(stats)
        if cfg.validation.spec and (self.step % cfg.validation.every == 0 or self.step == cfg.steps):
            summary = self.validate()
            self.history.append({"step": self.step, **summary})
            self._log({"step": self.step, "validation": summary})
            if summary["noc@90"] <= self.best_metric:
                self.best_metric = summary["noc@90"]
                self.export("best", {"validation": summary, "validation_spec": cfg.validation.spec})

    def run(self) -> Dict[str, Any]:
        self.run_steps()
        return {"step": self.step, "best_noc90": self.best_metric, "history": self.history}


def main(argv: Optional[Sequence[str]] = None) -> None:
    command_line(argv, __doc__.split("\n")[0], TrainConfig, Trainer)


if __name__ == "__main__":
    main()
