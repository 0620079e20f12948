"""Train the exemplar recall branch with ICL: ``python -m model.training.recall --config configs/recall.yaml``.

The segmenter (``init`` checkpoint) is kept as it is; only ``net.recall`` (minus its frozen
ImageNet backbone) is trained. Each sample is a multi-object ``Scene`` (``model.training.scenes``):
one or two instances are the accepted exemplars, another instance gets one positive click and
a simulated mask, and the target is *every* instance. Then t in 1..max_rounds rounds: predict,
add ``beta[r] * loss``, simulate the next click from the recall errors and feed the detached
prediction back. The result is a full checkpoint (segmenter + recall) in ``out_dir``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from ..checkpoint import load_checkpoint, save_checkpoint
from ..clicks import IGNORE_VALUE, Click, encode_click_maps
from ..data import bsds500_refs
from ..nets.effnet_lite import imagenet_state_dict
from ..nets.recall import RECALL_CLICK_RADIUS
from ..nets.registry import create_model
from .base import TrainerBase, command_line, load_config
from .losses import LOSSES
from .scenes import IGNORE_INSTANCE, Scene, SyntheticScenes, WgisdScenes
from .train import add_error_clicks, batch_iou

log = logging.getLogger("model.training.recall")


@dataclass
class RecallTrainConfig:
    init: str = "model/weights/default.safetensors"  # the segmenter the branch is added to
    recall_channels: int = 64
    recall_refine_channels: int = 0
    recall_input_size: int = 512
    recall_init: Optional[str] = None  # warm-start the branch from this checkpoint's recall weights
    wgisd: Optional[str] = "../shared/data/wgisd-dev"
    wgisd_holdout: List[str] = field(default_factory=list)  # image stems kept out of training
    bsds500: Optional[str] = "../shared/data/bsds500"
    bsds500_splits: List[str] = field(default_factory=lambda: ["train", "test"])
    wgisd_weight: float = 1.0
    synthetic_weight: float = 1.0
    out_dir: str = "runs/recall"
    steps: int = 1500
    batch_size: int = 8
    crop_size: int = 320
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    beta: List[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    max_rounds: int = 3
    loss: str = "nfl"
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int = 2


def load_recall_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RecallTrainConfig:
    return load_config(path, overrides, RecallTrainConfig)


# --- samples -------------------------------------------------------------------------------------


def simulated_object_prob(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible first-click prediction of ``mask``: eroded or dilated, softened, sometimes leaking."""
    radius = int(rng.integers(0, 4))
    out = mask
    if radius:
        op = ndimage.binary_dilation if rng.uniform() < 0.5 else ndimage.binary_erosion
        out = op(mask, iterations=radius)
        if not out.any():
            out = mask
    prob = ndimage.gaussian_filter(out.astype(np.float32), sigma=rng.uniform(0.5, 2.0))
    if rng.uniform() < 0.2:  # a leak into the surroundings
        grown = ndimage.binary_dilation(mask, iterations=int(rng.integers(3, 10)))
        prob = np.maximum(prob, grown * rng.uniform(0.3, 0.7))
    return np.clip(prob, 0, 1)


def first_click(mask: np.ndarray, rng: np.random.Generator) -> Click:
    """A positive click well inside ``mask`` (distance to the edge at least half the maximum)."""
    dt = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(dt >= 0.5 * dt.max())
    i = int(rng.integers(len(ys)))
    return Click(float(ys[i]), float(xs[i]), True)


@dataclass
class RecallSample:
    image: np.ndarray  # uint8 (S, S, 3)
    exemplar: np.ndarray  # float32 (S, S)
    object_prob: np.ndarray  # float32 (S, S)
    click: Click
    target: np.ndarray  # uint8 (S, S): 1 instance, 0 background, IGNORE_VALUE ignored


def sample_from_scene(scene: Scene, rng: np.random.Generator) -> RecallSample:
    ids = scene.instance_ids(min_area=40)
    rng.shuffle(ids)
    n_exemplars = 2 if len(ids) >= 4 and rng.uniform() < 0.3 else 1
    exemplar = np.isin(scene.instances, ids[:n_exemplars])
    clicked = scene.instances == ids[n_exemplars]
    target = (scene.instances > 0).astype(np.uint8)
    target[scene.instances == IGNORE_INSTANCE] = IGNORE_VALUE
    return RecallSample(scene.image, exemplar.astype(np.float32), simulated_object_prob(clicked, rng),
                        first_click(clicked, rng), target)


# --- trainer -------------------------------------------------------------------------------------


class RecallTrainer(TrainerBase):
    """The recall branch's ICL trainer (the segmenter frozen); ``run()`` trains to ``config.steps``."""

    progress_name = "recall"

    def __init__(self, config: RecallTrainConfig, scene_sources=None):
        super().__init__(config)
        if config.max_rounds < 1 or len(config.beta) < config.max_rounds:
            raise ValueError(f"beta needs max_rounds={config.max_rounds} weights, got {config.beta}")
        self.loss_fn = LOSSES.get(config.loss)
        if self.loss_fn is None:
            raise ValueError(f"unknown loss {config.loss!r}; known: {', '.join(LOSSES)}")
        self.net = self._build_network().to(self.device)
        self.recall = self.net.recall
        frozen = {id(p) for m in self.recall.backbone_modules() for p in m.parameters()}
        for p in self.net.parameters():
            p.requires_grad_(id(p) not in frozen and any(p is q for q in self.recall.parameters()))
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.sources = scene_sources if scene_sources is not None else self._scene_sources()
        self._begin(vars(config))

    def _build_network(self) -> nn.Module:
        """The ``init`` segmenter with a freshly initialised recall branch (ImageNet backbone)."""
        base = load_checkpoint(self.config.init)
        if base.arch_name != "effnet-lite":
            raise ValueError(f"the recall branch exists for effnet-lite only, {self.config.init} is {base.arch_name}")
        arch_config = {**base.arch_config, "recall_channels": self.config.recall_channels,
                       "recall_refine_channels": self.config.recall_refine_channels,
                       "recall_input_size": self.config.recall_input_size}
        net = create_model("effnet-lite", arch_config)
        own = net.state_dict()
        own.update({k: v for k, v in base.state_dict().items() if not k.startswith("recall.")})
        mapped = imagenet_state_dict(arch_config["variant"])
        for key in own:
            if key.startswith("recall.") and key.split(".", 1)[1].split(".")[0] in ("conv_stem", "bn1", "blocks"):
                own[key] = mapped[key.split(".", 1)[1]]
        if self.config.recall_init:
            donor = load_checkpoint(self.config.recall_init)
            if getattr(donor, "recall", None) is None:
                raise ValueError(f"recall_init {self.config.recall_init} has no recall branch")
            shapes = {k: v.shape for k, v in own.items()}
            for key, value in donor.state_dict().items():
                if key.startswith("recall.") and key in shapes and shapes[key] == value.shape:
                    own[key] = value.float()
        net.load_state_dict(own)
        net.checkpoint_meta = dict(getattr(base, "checkpoint_meta", {}) or {})
        return net

    def _scene_sources(self):
        cfg = self.config
        sources = []
        if cfg.wgisd and cfg.wgisd_weight > 0:
            stems = None
            if cfg.wgisd_holdout:
                all_stems = [p.stem for p in sorted((Path(cfg.wgisd) / "images").glob("*.jpg"))]
                unknown = sorted(set(cfg.wgisd_holdout) - set(all_stems))
                if unknown:
                    raise ValueError(f"wgisd_holdout names images that {cfg.wgisd} lacks: {', '.join(unknown)}")
                stems = [s for s in all_stems if s not in cfg.wgisd_holdout]
            sources.append((WgisdScenes(cfg.wgisd, long_side=cfg.recall_input_size, stems=stems), cfg.wgisd_weight))
        if cfg.bsds500 and cfg.synthetic_weight > 0:
            refs = bsds500_refs(cfg.bsds500, tuple(cfg.bsds500_splits)).refs
            sources.append((SyntheticScenes(refs), cfg.synthetic_weight))
        if not sources:
            raise ValueError("no training scenes: set wgisd and/or bsds500")
        return sources

    def _state(self) -> Dict[str, Any]:
        return {"recall": self.recall.state_dict()}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.recall.load_state_dict(state["recall"])

    def export(self, name: str = "last") -> Path:
        meta = dict(self.net.checkpoint_meta)
        meta["recall"] = {"steps": self.step, "beta": self.config.beta[: self.config.max_rounds],
                          "training_data": [f"wgisd:{self.config.wgisd}" if self.config.wgisd else None,
                                            f"synthetic:bsds500:{'+'.join(self.config.bsds500_splits)}"
                                            if self.config.bsds500 else None],
                          "wgisd_holdout": self.config.wgisd_holdout}
        return save_checkpoint(self.net, self.out_dir / f"{name}.safetensors", meta=meta, half=True)

    def _samples(self, rng: np.random.Generator) -> List[RecallSample]:
        weights = np.array([w for _, w in self.sources], float)
        samples = []
        while len(samples) < self.config.batch_size:
            source = self.sources[rng.choice(len(self.sources), p=weights / weights.sum())][0]
            scene = source.sample(self.config.crop_size, rng)
            if scene is not None:
                samples.append(sample_from_scene(scene, rng))
        return samples

    def train_step(self) -> Dict[str, float]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.step])
        torch.manual_seed(cfg.seed * 100003 + self.step)
        samples = self._samples(rng)
        dev = self.device
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div_(255).to(dev)
        exemplar = torch.from_numpy(np.stack([s.exemplar for s in samples]))[:, None].to(dev)
        obj = torch.from_numpy(np.stack([s.object_prob for s in samples]))[:, None].to(dev)
        targets_np = np.stack([s.target for s in samples])
        targets = torch.from_numpy(targets_np)[:, None].to(dev)
        clicks = [[s.click] for s in samples]
        size = cfg.crop_size

        self.net.eval()  # frozen segmenter and backbone BatchNorm
        for name, module in self.recall.named_children():
            if module not in self.recall.backbone_modules():
                module.train()
        with torch.no_grad():
            stages = self.recall.backbone_stages(images)
        features = self.recall.embed_stages(stages)
        prev = torch.zeros_like(obj)
        rounds = int(rng.integers(1, cfg.max_rounds + 1))
        total = torch.zeros((), device=dev)
        for r in range(rounds):
            maps = torch.cat([encode_click_maps(c, size, size, radius=RECALL_CLICK_RADIUS, device=dev)[:, 1:]
                              for c in clicks])
            logits = self.recall(features, exemplar, obj, maps, prev)
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
            total = total + cfg.beta[r] * self.loss_fn(logits, targets).mean()
            prob = torch.sigmoid(logits.detach())
            if r < rounds - 1:
                add_error_clicks(clicks, (prob[:, 0] > 0.5).cpu().numpy(), targets_np, rng)
                prev = prob
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": float(total.detach()), "iou": batch_iou(prob[:, 0] > 0.5, targets), "rounds": rounds}

    def run(self) -> Dict[str, Any]:
        self.run_steps()
        self.export("last")  # also re-attaches a finished branch to a new ``init`` segmenter
        return {"step": self.step, "checkpoint": str(self.out_dir / "last.safetensors")}


def main(argv: Optional[Sequence[str]] = None) -> None:
    command_line(argv, __doc__.split("\n")[0], RecallTrainConfig, RecallTrainer)


if __name__ == "__main__":
    main()
