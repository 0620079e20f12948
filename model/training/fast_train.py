"""ICL fine-tuning in one short accelerator run, with every step's data work on the device.

    python -m model.training.fast_train --pack runs/pack/train-pack.npz --out-dir $OUT [--set minutes=8.5 ...]

The pack (``model.training.pack``) is decoded once and kept on the device. Each step then draws objects
by set weight and does, as batched tensor work on the device: the object-centric crop (scale
jitter, flip) with ``affine_grid``, SUEM copy-paste (paste onto another image, occlude, merge,
blend), colour jitter, the initial clicks, the ICL rounds (β-weighted loss per round, the next
click at the inside of the larger error region) and the click maps. Distances are Chebyshev
distances from repeated 3x3 erosions, which is all the click sampling needs.

The run stops after ``minutes`` (the learning rate follows a cosine over that time), in bf16
autocast with channels-last on CUDA, and writes ``fast-last.safetensors`` (fp16) every
``checkpoint_seconds`` and at the end, atomically, plus ``log.jsonl``. It writes nothing else:
a run that fails or times out leaves the shipped model untouched.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_checkpoint, resolve_device, save_checkpoint
from ..clicks import DISK_RADIUS, IGNORE_VALUE, MASK_THRESHOLD
from .augment import AugmentConfig
from .base import load_config
from .losses import normalized_focal_loss
from .pack import Pack, load_pack
from .train import backbone_parameters, set_train_mode

log = logging.getLogger("model.training.fast_train")


@dataclass
class FastConfig:
    init: str = "model/weights/default.safetensors"
    pack: str = "runs/pack/train-pack.npz"
    out_dir: str = "runs/fast"
    minutes: float = 8.5  # wall-clock training time, after the pack is loaded
    max_steps: int = 0  # stop earlier after this many steps (0: time only)
    batch_size: int = 48
    lr: float = 3e-4
    backbone_lr_mult: float = 0.2
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    beta: List[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    max_rounds: int = 3
    loss_rounds: str = "all"  # "last": the loss on the last round only (the paper's baseline)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the CPU trainer's, applied on the device
    max_upscale: float = 3.0
    max_initial_positive: int = 3
    max_initial_negative: int = 2
    checkpoint_seconds: float = 60.0
    log_every: int = 20
    device: str = "auto"
    seed: int = 0


CHECKPOINT_NAME = "fast-last.safetensors"


# --------------------------------------------------------------------------- distances and sampling


def erosion_depth(region: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool -> float Chebyshev distance to the nearest pixel outside (image border outside)."""
    x = region.float()
    depth = torch.zeros_like(x)
    while True:
        depth += x
        x = -F.max_pool2d(-F.pad(x, (1, 1, 1, 1), value=0.0), 3, stride=1)
        if not bool(x.any()):
            return depth


def dilate(region: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 1, H, W) bool dilated by a square of half-side ``radius`` (separable max-pools)."""
    x = region.float()
    k = 2 * radius + 1
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, radius))
    x = F.max_pool2d(x, (k, 1), stride=1, padding=(radius, 0))
    return x > 0


def sample_points(weights: torch.Tensor, count: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` pixels per row of ``weights`` (B, 1, H, W) -> (yx (B, count, 2) float, found (B,) bool)."""
    b, _, h, w = weights.shape
    flat = weights.reshape(b, h * w).float()
    found = flat.sum(1) > 0
    flat = torch.where(found[:, None], flat, torch.ones_like(flat))
    index = torch.multinomial(flat, count, replacement=True, generator=generator)
    return torch.stack([index // w, index % w], -1).float(), found


# --------------------------------------------------------------------------- the batch, on the device


class DeviceBatches:
    """The pack on the device; ``draw(n)`` -> images (n, 3, C, C) in [0, 1] and gts (n, 1, C, C) (1/0/ignore)."""

    def __init__(self, pack: Pack, crop: int, config: FastConfig, device: torch.device, generator: torch.Generator):
        self.images = torch.from_numpy(pack.images).to(device).permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
        self.labels = torch.from_numpy(pack.labels).to(device)
        side = pack.images.shape[1]
        ys = torch.arange(side, device=device).view(1, -1, 1)
        xs = torch.arange(side, device=device).view(1, 1, -1)
        sizes = torch.from_numpy(pack.sizes).to(device)
        self.valid = (ys < sizes[:, 0].view(-1, 1, 1)) & (xs < sizes[:, 1].view(-1, 1, 1))  # (N, S, S)
        self.sizes = sizes.float()
        self.object_image = torch.from_numpy(pack.object_image).to(device)
        self.object_label = torch.from_numpy(pack.object_label).to(device)
        self.weights = torch.from_numpy(pack.object_weights()).float().to(device)
        self.side, self.crop, self.config, self.device, self.generator = side, crop, config, device, generator

    def _uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=self.device, generator=self.generator)

    def _crops(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """n object-centric crops: images (n, 3, C, C) float [0, 1], gts (n, 1, C, C) float."""
        cfg, aug, s, c = self.config, self.config.augment, self.side, self.crop
        objects = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        image_index = self.object_image[objects]
        obj = self.labels[image_index] == self.object_label[objects].view(-1, 1, 1)  # (n, S, S)
        rows, cols = obj.any(2), obj.any(1)
        ar = torch.arange(s, device=self.device).float()
        top = torch.where(rows, ar, torch.full_like(ar, s)).amin(1)
        bottom = torch.where(rows, ar, torch.full_like(ar, -1)).amax(1)
        left = torch.where(cols, ar, torch.full_like(ar, s)).amin(1)
        right = torch.where(cols, ar, torch.full_like(ar, -1)).amax(1)
        box = torch.maximum(bottom - top + 1, right - left + 1).clamp(min=1)
        size = self.sizes[image_index]
        low, high = aug.object_scale
        scale = (low + (high - low) * self._uniform(n)) * c / box
        scale = torch.minimum(scale, torch.minimum(torch.full_like(scale, cfg.max_upscale), c / size.amin(1) * 2.5))
        scale = torch.maximum(scale, c / size.amax(1) * 0.5)
        centre, _ = sample_points(obj[:, None], 1, self.generator)  # a random object pixel
        jitter = (self._uniform(n, 2) - 0.5) * (c / 2) / scale[:, None]
        cy, cx = (centre[:, 0] + jitter).unbind(1)
        span = c / scale / s  # crop side over canvas side
        flip = torch.where(self._uniform(n) < aug.flip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=self.device)
        theta[:, 0, 0] = span * flip
        theta[:, 0, 2] = (2 * cx + 1) / s - 1
        theta[:, 1, 1] = span
        theta[:, 1, 2] = (2 * cy + 1) / s - 1
        grid = F.affine_grid(theta, (n, 1, c, c), align_corners=False)
        images = F.grid_sample(self.images[image_index].float() / 255, grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)
        planes = torch.stack([obj, self.valid[image_index]], 1).float()
        planes = F.grid_sample(planes, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        gts = torch.where(planes[:, 1:] > 0, planes[:, :1], torch.full_like(planes[:, :1], IGNORE_VALUE))
        return images, gts

    def _jitter(self, images: torch.Tensor) -> torch.Tensor:
        strength = self.config.augment.color_jitter
        if strength <= 0:
            return images
        n = images.shape[0]
        factors = 1 + strength * (2 * self._uniform(3, n, 1, 1, 1) - 1)
        images = images * factors[0]
        mean = images.mean((1, 2, 3), keepdim=True)
        images = (images - mean) * factors[1] + mean
        grey = images.mean(1, keepdim=True)
        return ((images - grey) * factors[2] + grey).clamp(0, 1)

    def draw(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        aug = self.config.augment
        images, gts = self._crops(n)
        other_images, other_gts = self._crops(n)
        obj, other = gts == 1, other_gts == 1
        u = self._uniform(n).view(n, 1, 1, 1)
        low, high = aug.blend_alpha
        alpha = low + (high - low) * self._uniform(n).view(n, 1, 1, 1)
        edges = np.cumsum([aug.paste_onto_other, aug.occlude, aug.merge, aug.blend_object, aug.blend_images])
        onto, hide, join, blend_obj, blend_all = ((u >= lo) & (u < hi) for lo, hi in zip([0, *edges[:-1]], edges))
        overlap = (other & obj).sum((1, 2, 3), keepdim=True) > 0.7 * obj.sum((1, 2, 3), keepdim=True)
        hide = hide & ~overlap  # keep at least part of the object visible
        new_images = torch.where(onto & ~obj, other_images, images)
        new_images = torch.where((hide | join) & other, other_images, new_images)
        new_images = torch.where(blend_obj & other, images * (1 - alpha) + other_images * alpha, new_images)
        new_images = torch.where(blend_all, images * (1 - alpha) + other_images * alpha, new_images)
        new_gts = torch.where(hide & other & (gts != IGNORE_VALUE), torch.zeros_like(gts), gts)
        new_gts = torch.where(join & other, torch.ones_like(gts), new_gts)
        kept = (new_gts == 1).sum((1, 2, 3), keepdim=True) >= 16
        images = torch.where(kept, new_images, images)
        gts = torch.where(kept, new_gts, gts)
        return self._jitter(images), gts


# --------------------------------------------------------------------------- clicks on the device


class DeviceClicks:
    """Clicks of a batch: ``yx`` (B, K, 2), ``positive`` (B, K) bool, ``active`` (B, K) bool."""

    def __init__(self, yx: torch.Tensor, positive: torch.Tensor, active: torch.Tensor):
        self.yx, self.positive, self.active = yx, positive, active

    def add(self, yx: torch.Tensor, positive: torch.Tensor, active: torch.Tensor) -> "DeviceClicks":
        return DeviceClicks(torch.cat([self.yx, yx[:, None]], 1), torch.cat([self.positive, positive[:, None]], 1),
                            torch.cat([self.active, active[:, None]], 1))

    def maps(self, prev: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) = [prev, positive disks, negative disks], as ``model.clicks.encode_click_maps``."""
        b, _, h, w = prev.shape
        ys = torch.arange(h, device=prev.device, dtype=torch.float32).view(1, 1, h, 1)
        xs = torch.arange(w, device=prev.device, dtype=torch.float32).view(1, 1, 1, w)
        d2 = (ys - self.yx[..., 0, None, None]) ** 2 + (xs - self.yx[..., 1, None, None]) ** 2  # (B, K, H, W)
        disks = (d2 <= DISK_RADIUS * DISK_RADIUS) & self.active[..., None, None]
        pos = (disks & self.positive[..., None, None]).any(1, keepdim=True)
        neg = (disks & ~self.positive[..., None, None]).any(1, keepdim=True)
        return torch.cat([prev, pos.float(), neg.float()], 1)


def initial_clicks(gts: torch.Tensor, config: FastConfig, generator: torch.Generator) -> DeviceClicks:
    """Positives inside the object (depth >= 20 % of its max), negatives in the background near it."""
    b, _, h, _ = gts.shape
    obj = gts == 1
    depth = erosion_depth(obj)
    inner = depth >= torch.clamp(0.2 * depth.amax((1, 2, 3), keepdim=True), min=1.0)
    pos_yx, _ = sample_points(inner, config.max_initial_positive, generator)
    near = (gts == 0) & dilate(obj, max(1, int(0.3 * h)))
    neg_yx, neg_found = sample_points(near, config.max_initial_negative, generator)
    decaying = lambda k: torch.tensor([0.5 ** i for i in range(k)], device=gts.device)
    n_pos = 1 + torch.multinomial(decaying(config.max_initial_positive), b, replacement=True, generator=generator)
    n_neg = torch.multinomial(decaying(config.max_initial_negative + 1), b, replacement=True, generator=generator)
    kp, kn = config.max_initial_positive, config.max_initial_negative
    pos_active = torch.arange(kp, device=gts.device) < n_pos[:, None]
    neg_active = (torch.arange(kn, device=gts.device) < n_neg[:, None]) & neg_found[:, None]
    positive = torch.cat([torch.ones(b, kp, dtype=torch.bool, device=gts.device),
                          torch.zeros(b, kn, dtype=torch.bool, device=gts.device)], 1)
    return DeviceClicks(torch.cat([pos_yx, neg_yx], 1), positive, torch.cat([pos_active, neg_active], 1))


def next_clicks(pred: torch.Tensor, gts: torch.Tensor, clicks: DeviceClicks, generator: torch.Generator) -> DeviceClicks:
    """One click per sample inside the larger error region (depth above half its max); none if no error."""
    valid = gts != IGNORE_VALUE
    fn = (gts == 1) & ~pred & valid
    fp = (gts == 0) & pred & valid
    positive = fn.sum((1, 2, 3)) >= fp.sum((1, 2, 3))
    region = torch.where(positive.view(-1, 1, 1, 1), fn, fp)
    depth = erosion_depth(region)
    deep = depth > depth.amax((1, 2, 3), keepdim=True) / 2
    yx, found = sample_points(deep & region, 1, generator)
    return clicks.add(yx[:, 0], positive, found)


# --------------------------------------------------------------------------- the run


class FastTrainer:
    def __init__(self, config: FastConfig):
        if config.loss_rounds not in ("all", "last"):
            raise ValueError(f"loss_rounds must be 'all' or 'last', got {config.loss_rounds!r}")
        if len(config.beta) < config.max_rounds:
            raise ValueError(f"beta needs {config.max_rounds} weights, got {config.beta}")
        self.config = config
        self.device = resolve_device(config.device)
        self.cuda = self.device.type == "cuda"
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.net = load_checkpoint(config.init).to(self.device)
        if self.cuda:
            self.net = self.net.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        recall = getattr(self.net, "recall", None)
        if recall is not None:
            recall.requires_grad_(False)
        self.crop = int(self.net.arch_config["input_size"])
        started = time.perf_counter()
        pack = load_pack(config.pack)
        self.batches = DeviceBatches(pack, self.crop, config, self.device, self.generator)
        log.info("pack %s: %d images, %d objects, sets %s, decoded in %.1f s", config.pack, len(pack.images),
                 len(pack.object_image), pack.set_names, time.perf_counter() - started)
        backbone, rest = backbone_parameters(self.net)
        groups = [{"params": backbone, "lr": config.lr * config.backbone_lr_mult, "base_lr": config.lr * config.backbone_lr_mult},
                  {"params": [p for p in rest if p.requires_grad], "lr": config.lr, "base_lr": config.lr}]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=self.cuda)
        self.step = 0

    def _set_lr(self, progress: float) -> float:
        factor = min(1.0, (self.step + 1) / max(1, self.config.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor * self.config.lr

    def train_step(self, progress: float) -> Dict[str, float]:
        cfg = self.config
        lr = self._set_lr(progress)
        images, gts = self.batches.draw(cfg.batch_size)
        if self.cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        clicks = initial_clicks(gts, cfg, self.generator)
        rounds = int(torch.randint(1, cfg.max_rounds + 1, (1,), generator=self.generator, device=self.device))
        prev = torch.zeros_like(gts)
        set_train_mode(self.net, False)
        total = torch.zeros((), device=self.device)
        for r in range(rounds):
            carries_loss = cfg.loss_rounds == "all" or r == rounds - 1
            with torch.set_grad_enabled(carries_loss), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                logits = self.net(images, clicks.maps(prev))
                logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
            if carries_loss:
                total = total + cfg.beta[r] * normalized_focal_loss(logits, gts).mean()
            prob = torch.sigmoid(logits.detach().float())
            if r < rounds - 1:
                clicks = next_clicks(prob > MASK_THRESHOLD, gts, clicks, self.generator)
                prev = prob
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.step += 1
        valid = gts != IGNORE_VALUE
        pred, obj = (prob > MASK_THRESHOLD) & valid, (gts == 1)
        iou = ((pred & obj).sum((1, 2, 3)).float() / (pred | obj).sum((1, 2, 3)).clamp(min=1).float()).mean()
        return {"loss": float(total.detach()), "iou": float(iou), "rounds": rounds, "lr": lr}

    def save(self, elapsed: float) -> Path:
        meta = {"trainer": "model.training.fast_train", "steps": self.step, "seconds": round(elapsed, 1),
                "config": asdict(self.config), "init": self.config.init}
        return save_checkpoint(self.net, self.out_dir / CHECKPOINT_NAME, meta=meta, half=True)

    def run(self) -> Dict[str, float]:
        cfg = self.config
        budget = cfg.minutes * 60
        start = last_save = time.perf_counter()
        log_path = self.out_dir / "log.jsonl"
        stats: Dict[str, float] = {}
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= budget or (cfg.max_steps and self.step >= cfg.max_steps):
                break
            stats = self.train_step(elapsed / budget)
            if self.step % cfg.log_every == 0 or self.step == 1:
                stats.update(step=self.step, seconds=round(time.perf_counter() - start, 1))
                with open(log_path, "a") as f:
                    f.write(json.dumps(stats) + "\n")
                log.info("step %d  loss %.4f  iou %.3f  %.1f s", self.step, stats["loss"], stats["iou"], stats["seconds"])
            if time.perf_counter() - last_save >= cfg.checkpoint_seconds:
                self.save(time.perf_counter() - start)
                last_save = time.perf_counter()
        elapsed = time.perf_counter() - start
        path = self.save(elapsed)
        summary = {"steps": self.step, "seconds": round(elapsed, 1), "samples": self.step * cfg.batch_size,
                   "checkpoint": str(path), **{k: v for k, v in stats.items() if k in ("loss", "iou")}}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.fast_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (keys of FastConfig)")
    parser.add_argument("--pack", help="the training pack (model.training.pack)")
    parser.add_argument("--out-dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.set) + ([f"pack={args.pack}"] if args.pack else []) + ([f"out_dir={args.out_dir}"] if args.out_dir else [])
    try:
        config = load_config(args.config, overrides, FastConfig)
        summary = FastTrainer(config).run()
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
