"""Multi-object scenes for training the exemplar recall branch.

A ``Scene`` is an image with the instances of *one category* (the objects recall must find):
- ``wgisd_scene``: a crop of a WGISD image (every grape cluster is an instance);
- ``synthetic_scene``: several copies of one BSDS500 region pasted onto another BSDS500
  image, plus copies of a different region as distractors (not instances).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data import ObjectRef, read_label_map, read_rgb
from .augment import color_jitter, resize_pair

IGNORE_INSTANCE = -1  # instance map value: do not train on this pixel


@dataclass
class Scene:
    """image uint8 (S, S, 3); instances int32 (S, S): 0 background, k >= 1 instance k, -1 ignore."""

    image: np.ndarray
    instances: np.ndarray

    def instance_ids(self, min_area: int = 1) -> List[int]:
        ids, counts = np.unique(self.instances, return_counts=True)
        return [int(i) for i, n in zip(ids, counts) if i > 0 and n >= min_area]


def _scale_pair(image: np.ndarray, labels: np.ndarray, scale: float) -> Tuple[np.ndarray, np.ndarray]:
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    out_image, _ = resize_pair(image, np.zeros(image.shape[:2], np.uint8), h, w)
    ys = (np.arange(h) * labels.shape[0] / h).astype(int)
    xs = (np.arange(w) * labels.shape[1] / w).astype(int)
    return out_image, labels[ys][:, xs]


def random_crop(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator,
                fill_label: int = IGNORE_INSTANCE) -> Tuple[np.ndarray, np.ndarray]:
    """A ``size x size`` crop; where the image is smaller it is zero-padded and labelled ``fill_label``."""
    h, w = labels.shape
    y0 = int(rng.integers(0, max(1, h - size + 1)))
    x0 = int(rng.integers(0, max(1, w - size + 1)))
    out_image = np.zeros((size, size, 3), np.uint8)
    out_labels = np.full((size, size), fill_label, np.int32)
    crop_h, crop_w = min(size, h - y0), min(size, w - x0)
    out_image[:crop_h, :crop_w] = image[y0:y0 + crop_h, x0:x0 + crop_w]
    out_labels[:crop_h, :crop_w] = labels[y0:y0 + crop_h, x0:x0 + crop_w]
    return out_image, out_labels


class WgisdScenes:
    """Crops of WGISD images at the recall branch's working scale (long side ~``long_side``)."""

    def __init__(self, root: str | Path, long_side: int = 512, stems: Optional[Sequence[str]] = None):
        root = Path(root)
        paths = sorted((root / "images").glob("*.jpg"))
        if stems is not None:
            paths = [p for p in paths if p.stem in set(stems)]
        if not paths:
            raise ValueError(f"no WGISD images under {root / 'images'}")
        self.items: List[Tuple[np.ndarray, np.ndarray]] = []
        for path in paths:  # kept in memory at twice the working scale (20 images: ~30 MB)
            image = read_rgb(path)
            labels = read_label_map(root / "instances" / f"{path.stem}.png")
            self.items.append(_scale_pair(image, labels, 2 * long_side / max(image.shape[:2])))
        self.long_side = long_side

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, size: int, rng: np.random.Generator, min_instances: int = 2, min_area: int = 40) -> Optional[Scene]:
        image, labels = self.items[int(rng.integers(len(self.items)))]
        scale = rng.uniform(0.7, 1.4) * self.long_side / max(image.shape[:2])
        image, labels = _scale_pair(image, labels, scale)
        for _ in range(5):
            crop_image, crop_labels = random_crop(image, labels, size, rng)
            scene = Scene(crop_image, crop_labels)
            if len(scene.instance_ids(min_area)) >= min_instances:
                if rng.uniform() < 0.5:
                    scene = Scene(np.ascontiguousarray(scene.image[:, ::-1]), np.ascontiguousarray(scene.instances[:, ::-1]))
                return scene
        return None


def _object_cutout(ref: ObjectRef, cache: Dict[str, np.ndarray]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The region's bounding-box crop (image, bool mask), or None for a poor, sprawling region."""
    if ref.image_path not in cache:
        cache.clear()
        cache[ref.image_path] = read_rgb(ref.image_path)
    mask = ref.load_mask() == 1
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_mask = mask[y0:y1, x0:x1]
    if box_mask.mean() < 0.3 or box_mask.size > 0.25 * mask.size:  # sprawling or background-sized
        return None
    return cache[ref.image_path][y0:y1, x0:x1], box_mask


def _paste(image: np.ndarray, labels: np.ndarray, cutout: np.ndarray, mask: np.ndarray, value: int,
           long_side: float, rng: np.random.Generator) -> None:
    """Paste one randomly scaled / flipped / recoloured copy in place; ``value`` marks its pixels."""
    scale = long_side / max(mask.shape)
    h, w = max(2, round(mask.shape[0] * scale)), max(2, round(mask.shape[1] * scale))
    piece, piece_mask = resize_pair(cutout, mask.astype(np.uint8), h, w)
    piece_mask = piece_mask.astype(bool)
    if rng.uniform() < 0.5:
        piece, piece_mask = piece[:, ::-1], piece_mask[:, ::-1]
    piece = color_jitter(piece, rng, 0.1)
    size = labels.shape[0]
    y0 = int(rng.integers(-h // 3, size - 2 * h // 3))
    x0 = int(rng.integers(-w // 3, size - 2 * w // 3))
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(size, y0 + h), min(size, x0 + w)
    if sy1 <= sy0 or sx1 <= sx0:
        return
    m = piece_mask[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    image[sy0:sy1, sx0:sx1][m] = piece[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0][m]
    labels[sy0:sy1, sx0:sx1][m] = value


class SyntheticScenes:
    """Copies of one BSDS500 region pasted onto another BSDS500 image, with distractor copies."""

    def __init__(self, refs: Sequence[ObjectRef], max_copies: int = 6, max_distractors: int = 4):
        if len(refs) < 3:
            raise ValueError(f"synthetic scenes need at least 3 object regions, got {len(refs)}")
        self.refs = list(refs)
        self.max_copies = max_copies
        self.max_distractors = max_distractors
        self._cache: Dict[str, np.ndarray] = {}

    def _cutout(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        for _ in range(20):
            found = _object_cutout(self.refs[int(rng.integers(len(self.refs)))], self._cache)
            if found is not None:
                return found
        raise RuntimeError("no usable object region in 20 tries (regions too large or sprawling)")

    def sample(self, size: int, rng: np.random.Generator, min_instances: int = 2, min_area: int = 40) -> Optional[Scene]:
        background_ref = self.refs[int(rng.integers(len(self.refs)))]
        background = read_rgb(background_ref.image_path)
        scale = size / min(background.shape[:2]) * rng.uniform(1.0, 1.6)
        background, _ = _scale_pair(background, np.zeros(background.shape[:2], np.int32), scale)
        image, labels = random_crop(background, np.zeros(background.shape[:2], np.int32), size, rng, fill_label=0)
        image = image.copy()
        target_image, target_mask = self._cutout(rng)
        distractor = self._cutout(rng)
        base = rng.uniform(size / 10, size / 3.5)
        copies = int(rng.integers(2, self.max_copies + 1))
        distractors = int(rng.integers(0, self.max_distractors + 1))
        order = [1] * copies + [0] * distractors
        rng.shuffle(order)
        next_id = 1
        for is_target in order:
            if is_target:
                _paste(image, labels, target_image, target_mask, next_id, base * rng.uniform(0.75, 1.3), rng)
                next_id += 1
            else:
                _paste(image, labels, distractor[0], distractor[1], 0, base * rng.uniform(0.6, 1.5), rng)
        scene = Scene(image, labels)
        # Mostly hidden copies are ambiguous: do not train on them.
        for k, n in zip(*np.unique(labels, return_counts=True)):
            if k > 0 and n < min_area:
                labels[labels == k] = IGNORE_INSTANCE
        return scene if len(scene.instance_ids(min_area)) >= min_instances else None
