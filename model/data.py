"""Object datasets for training and evaluation.

An *object* is one binary mask on one image. Sources:
- ``bsds500:<root>[:split+split]``: BSDS500 human regions (16-bit label maps), regions of at least 1% of the image;
- ``wgisd:<root>``: WGISD grape-cluster instances (8-bit instance maps);
- ``folder:<root>``: ``images/<stem>.<ext>`` + ``masks/<stem>.png`` or ``masks/<stem>_<k>.png``
  (0 background, 128 ignore, any other value object).

Objects are listed lazily as ``ObjectRef`` (paths + label id) and loaded on demand.
Unusable files are reported in ``ObjectList.skipped`` as ``(file, reason)``, never used.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .clicks import IGNORE_VALUE

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class ObjectSample:
    """image uint8 (H, W, 3); mask uint8 (H, W): 1 object, 0 background, 128 ignore."""

    image: np.ndarray
    mask: np.ndarray
    name: str
    image_id: str


@dataclass(frozen=True)
class ObjectRef:
    """Where one object lives: ``mask = label_map == label`` (ignore where label_map == ignore_label)."""

    image_path: str
    label_path: str
    label: int
    name: str
    image_id: str
    ignore_label: Optional[int] = None

    def load_mask(self) -> np.ndarray:
        labels = read_label_map(self.label_path)
        mask = (labels == self.label).astype(np.uint8)
        if self.ignore_label is not None:
            mask[labels == self.ignore_label] = IGNORE_VALUE
        return mask

    def load(self) -> ObjectSample:
        return ObjectSample(read_rgb(self.image_path), self.load_mask(), self.name, self.image_id)


@dataclass
class ObjectList:
    refs: List[ObjectRef] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def skip(self, path: Path | str, reason: str) -> None:
        log.warning("skipping %s: %s", path, reason)
        self.skipped.append((str(path), reason))

    def extend(self, other: "ObjectList") -> None:
        self.refs.extend(other.refs)
        self.skipped.extend(other.skipped)

    def sample(self, max_objects: Optional[int], seed: int) -> "ObjectList":
        """A fixed random subset (all objects when ``max_objects`` is None), in a seed-determined order."""
        refs = list(self.refs)
        random.Random(seed).shuffle(refs)
        if max_objects is not None:
            refs = refs[:max_objects]
        return ObjectList(refs, list(self.skipped))


def read_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def read_label_map(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im).astype(np.int32)


def _image_size(path: Path) -> Tuple[int, int]:
    """(height, width) from the file header."""
    with Image.open(path) as im:
        return im.height, im.width


def _label_ids(labels: np.ndarray, min_area: int, exclude: Iterable[int]) -> List[int]:
    ids, counts = np.unique(labels, return_counts=True)
    excluded = set(exclude)
    return [int(i) for i, n in zip(ids, counts) if n >= min_area and int(i) not in excluded]


def bsds500_refs(root: str | Path, splits: Sequence[str] = ("val",), min_area_fraction: float = 0.01,
                 all_annotators: bool = False) -> ObjectList:
    """BSDS500 regions; by default only the first annotator's map per image (no near-duplicates)."""
    root = Path(root)
    out = ObjectList()
    for split in splits:
        image_dir, region_dir = root / split / "images", root / split / "regions"
        if not image_dir.is_dir():
            raise ValueError(f"BSDS500 split {split!r} not found: {image_dir} is not a directory")
        for image_path in sorted(image_dir.glob("*.jpg")):
            maps = sorted(region_dir.glob(f"{image_path.stem}_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
            if not maps:
                out.skip(image_path, "no region map")
                continue
            size = _image_size(image_path)
            for label_path in maps if all_annotators else maps[:1]:
                labels = read_label_map(label_path)
                if labels.shape != size:
                    out.skip(label_path, f"region map is {labels.shape}, image is {size}")
                    continue
                for label in _label_ids(labels, int(min_area_fraction * labels.size), exclude=(0,)):
                    out.refs.append(ObjectRef(str(image_path), str(label_path), label,
                                              f"{label_path.stem}#{label}", image_path.stem))
    return out


def wgisd_refs(root: str | Path, min_area: int = 1) -> ObjectList:
    """WGISD-dev grape clusters: every instance id > 0."""
    root = Path(root)
    out = ObjectList()
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise ValueError(f"WGISD folder not found: {image_dir} is not a directory")
    for image_path in sorted(image_dir.glob("*.jpg")):
        label_path = root / "instances" / f"{image_path.stem}.png"
        if not label_path.is_file():
            out.skip(image_path, "no instance map")
            continue
        labels = read_label_map(label_path)
        size = _image_size(image_path)
        if labels.shape != size:
            out.skip(label_path, f"instance map is {labels.shape}, image is {size}")
            continue
        ids = _label_ids(labels, min_area, exclude=(0,))
        if not ids:
            out.skip(label_path, "no instances")
        for label in ids:
            out.refs.append(ObjectRef(str(image_path), str(label_path), label, f"{image_path.stem}#{label}", image_path.stem))
    return out


def folder_refs(root: str | Path) -> ObjectList:
    """``images/<stem>.*`` with ``masks/<stem>.png`` or ``masks/<stem>_<k>.png``, one object per mask file."""
    root = Path(root)
    out = ObjectList()
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise ValueError(f"folder dataset {root} needs images/ and masks/ subfolders")
    for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        masks = sorted(set(mask_dir.glob(f"{image_path.stem}.png")) | set(mask_dir.glob(f"{image_path.stem}_*.png")))
        if not masks:
            out.skip(image_path, "no mask file")
            continue
        size = _image_size(image_path)
        for mask_path in masks:
            labels = read_label_map(mask_path)
            if labels.ndim != 2:
                out.skip(mask_path, f"mask must be single-channel, got shape {labels.shape}")
                continue
            if labels.shape != size:
                out.skip(mask_path, f"mask is {labels.shape[1]}x{labels.shape[0]}, image is {size[1]}x{size[0]}")
                continue
            values = set(np.unique(labels).tolist()) - {0, IGNORE_VALUE}
            if not values:
                out.skip(mask_path, "empty object")
                continue
            if len(values) > 1:
                out.skip(mask_path, f"mask has several object values {sorted(values)[:5]}; use one file per object")
                continue
            out.refs.append(ObjectRef(str(image_path), str(mask_path), values.pop(), mask_path.stem,
                                      image_path.stem, ignore_label=IGNORE_VALUE))
    return out


def parse_dataset_spec(spec: str) -> ObjectList:
    """``bsds500:<root>[:split+split[:all]]``, ``wgisd:<root>`` or ``folder:<root>`` -> ObjectList.

    BSDS500 uses the first annotator's regions per image; ``:all`` uses every annotator's.
    """
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"dataset spec {spec!r} must look like kind:path (kinds: bsds500, wgisd, folder)")
    if kind == "bsds500":
        root, _, options = rest.partition(":")
        splits, _, annotators = options.partition(":")
        if annotators not in ("", "all"):
            raise ValueError(f"dataset spec {spec!r}: the last part must be 'all' or absent, got {annotators!r}")
        return bsds500_refs(root, tuple((splits or "val").split("+")), all_annotators=annotators == "all")
    if kind == "wgisd":
        return wgisd_refs(rest)
    if kind == "folder":
        return folder_refs(rest)
    raise ValueError(f"unknown dataset kind {kind!r} in {spec!r}; known: bsds500, wgisd, folder")


def open_objects(spec: str, max_objects: Optional[int] = None, seed: int = 0) -> List[ObjectSample]:
    """Load a fixed, seed-determined sample of a dataset's objects (images shared between objects)."""
    refs = parse_dataset_spec(spec).sample(max_objects, seed).refs
    images: Dict[str, np.ndarray] = {}
    samples = []
    for ref in refs:
        if ref.image_path not in images:
            images[ref.image_path] = read_rgb(ref.image_path)
        samples.append(ObjectSample(images[ref.image_path], ref.load_mask(), ref.name, ref.image_id))
    return samples
