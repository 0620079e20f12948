"""Object datasets for training and evaluation.

An *object* is one binary mask on one image. Sources:
- ``bsds500:<root>[:split+split]``: BSDS500 human regions (16-bit label maps), regions of at least 1% of the image;
- ``wgisd:<root>``: WGISD grape-cluster instances (8-bit instance maps);
- ``instances:<root>[:train|heldout|all]``: 8- or 16-bit instance maps (coco-mini, pennfudan), with a fixed
  held-out split of 20 % of the images chosen by a salted hash of the image name;
- ``sod:<root>[:split]``: bsds500-sod object masks on the BSDS500 images of one split;
- ``folder:<root>``: ``images/<stem>.<ext>`` + ``masks/<stem>.png`` or ``masks/<stem>_<k>.png``
  (0 background, 128 ignore, any other value object).

Objects are listed lazily as ``ObjectRef`` (paths + label id) and loaded on demand.
Unusable files are reported in ``ObjectList.skipped`` as ``(file, reason)``, never used.
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

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


UNREADABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for missing, truncated or foreign files


def _checked_label_map(out: ObjectList, image_path: Path, label_path: Path, kind: str) -> Optional[np.ndarray]:
    """The label map of ``image_path``, or None (reported in ``out.skipped``) if either file is unusable."""
    try:
        size = _image_size(image_path)
    except UNREADABLE as exc:
        out.skip(image_path, f"unreadable image ({type(exc).__name__}: {exc})")
        return None
    try:
        labels = read_label_map(label_path)
    except UNREADABLE as exc:
        out.skip(label_path, f"unreadable {kind} ({type(exc).__name__}: {exc})")
        return None
    if labels.ndim != 2:
        out.skip(label_path, f"{kind} must be single-channel, got shape {labels.shape}")
        return None
    if labels.shape != size:
        out.skip(label_path, f"{kind} is {labels.shape[1]}x{labels.shape[0]}, image is {size[1]}x{size[0]}")
        return None
    return labels


def _label_ids(labels: np.ndarray, min_area: int, exclude: Iterable[int]) -> List[int]:
    ids, counts = np.unique(labels, return_counts=True)
    excluded = set(exclude)
    return [int(i) for i, n in zip(ids, counts) if n >= max(min_area, 1) and int(i) not in excluded]


# --------------------------------------------------------------------------- held-out splits

HELDOUT_PERCENT = 20
HELDOUT_SALT = "ls-clickseg-heldout-v1"
SPLITS = ("train", "heldout", "all")


def is_heldout(stem: str) -> bool:
    """Whether image ``stem`` belongs to the fixed held-out split (``HELDOUT_PERCENT`` % of names, by hash)."""
    digest = hashlib.sha256(f"{HELDOUT_SALT}:{stem}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def _in_split(stem: str, split: str) -> bool:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split == "all" or is_heldout(stem) == (split == "heldout")


def _images(image_dir: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> List[Path]:
    return sorted(p for p in image_dir.iterdir() if p.suffix.lower() in suffixes)


# --------------------------------------------------------------------------- sources


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
            for label_path in maps if all_annotators else maps[:1]:
                labels = _checked_label_map(out, image_path, label_path, "region map")
                if labels is None:
                    continue
                for label in _label_ids(labels, int(min_area_fraction * labels.size), exclude=(0,)):
                    out.refs.append(ObjectRef(str(image_path), str(label_path), label,
                                              f"{label_path.stem}#{label}", image_path.stem))
    return out


def instance_refs(root: str | Path, split: str = "all", min_area_fraction: float = 0.01,
                  suffixes: Sequence[str] = IMAGE_SUFFIXES) -> ObjectList:
    """``images/<stem>.*`` + ``instances/<stem>.png`` (8- or 16-bit, 0 background, k instance k).

    Every instance of at least ``min_area_fraction`` of its image is an object; ``split`` picks the
    fixed held-out images (``heldout``), the rest (``train``) or every image (``all``).
    """
    _in_split("", split)  # names a bad split before any file is read
    root = Path(root)
    out = ObjectList()
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise ValueError(f"instance dataset {root} needs an images/ subfolder")
    for image_path in _images(image_dir, suffixes):
        if not _in_split(image_path.stem, split):
            continue
        label_path = root / "instances" / f"{image_path.stem}.png"
        if not label_path.is_file():
            out.skip(image_path, "no instance map")
            continue
        labels = _checked_label_map(out, image_path, label_path, "instance map")
        if labels is None:
            continue
        ids = _label_ids(labels, int(min_area_fraction * labels.size), exclude=(0,))
        if not ids:
            out.skip(label_path, "no instance above the size floor")
        for label in ids:
            out.refs.append(ObjectRef(str(image_path), str(label_path), label, f"{image_path.stem}#{label}",
                                      image_path.stem))
    return out


def wgisd_refs(root: str | Path) -> ObjectList:
    """WGISD-dev grape clusters: every instance id > 0."""
    if not (Path(root) / "images").is_dir():
        raise ValueError(f"WGISD folder not found: {Path(root) / 'images'} is not a directory")
    return instance_refs(root, "all", min_area_fraction=0.0, suffixes=(".jpg",))


SOD_OBJECT = 255


def sod_refs(root: str | Path, split: str = "val", bsds500_root: Optional[str | Path] = None,
             min_area_fraction: float = 0.01) -> ObjectList:
    """bsds500-sod: ``masks/<id>.png`` (255 object) on ``<bsds500_root>/<split>/images/<id>.jpg``.

    ``bsds500_root`` defaults to the ``bsds500`` folder beside ``root``. Only masks whose image is in
    ``split`` are listed, so ``val`` is the held-out object set.
    """
    root = Path(root)
    image_dir = Path(bsds500_root or root.parent / "bsds500") / split / "images"
    if not (root / "masks").is_dir():
        raise ValueError(f"SOD folder {root} needs a masks/ subfolder")
    if not image_dir.is_dir():
        raise ValueError(f"SOD images for split {split!r} not found: {image_dir} is not a directory")
    out = ObjectList()
    for mask_path in sorted((root / "masks").glob("*.png")):
        image_path = image_dir / f"{mask_path.stem}.jpg"
        if not image_path.is_file():
            continue  # an image of another split
        labels = _checked_label_map(out, image_path, mask_path, "mask")
        if labels is None:
            continue
        values = set(np.unique(labels).tolist()) - {0}
        if values - {SOD_OBJECT}:
            out.skip(mask_path, f"mask values {sorted(values)[:5]}: expected 0 and {SOD_OBJECT} only")
            continue
        if not _label_ids(labels, int(min_area_fraction * labels.size), exclude=(0,)):
            out.skip(mask_path, "object below the size floor")
            continue
        out.refs.append(ObjectRef(str(image_path), str(mask_path), SOD_OBJECT, mask_path.stem, mask_path.stem))
    return out


def folder_refs(root: str | Path, min_area_fraction: float = 0.0) -> ObjectList:
    """``images/<stem>.*`` with ``masks/<stem>.png`` or ``masks/<stem>_<k>.png``, one object per mask file."""
    root = Path(root)
    out = ObjectList()
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise ValueError(f"folder dataset {root} needs images/ and masks/ subfolders")
    for image_path in _images(image_dir):
        masks = sorted(set(mask_dir.glob(f"{image_path.stem}.png")) | set(mask_dir.glob(f"{image_path.stem}_*.png")))
        if not masks:
            out.skip(image_path, "no mask file")
            continue
        for mask_path in masks:
            labels = _checked_label_map(out, image_path, mask_path, "mask")
            if labels is None:
                continue
            values = set(np.unique(labels).tolist()) - {0, IGNORE_VALUE}
            if not values:
                out.skip(mask_path, "empty object")
                continue
            if len(values) > 1:
                out.skip(mask_path, f"mask has several object values {sorted(values)[:5]}; use one file per object")
                continue
            value = values.pop()
            if np.count_nonzero(labels == value) < max(min_area_fraction * labels.size, 1):
                out.skip(mask_path, "object below the size floor")
                continue
            out.refs.append(ObjectRef(str(image_path), str(mask_path), value, mask_path.stem,
                                      image_path.stem, ignore_label=IGNORE_VALUE))
    return out


DATASET_KINDS = ("bsds500", "wgisd", "instances", "sod", "folder")


def parse_dataset_spec(spec: str) -> ObjectList:
    """A dataset spec -> ObjectList. Specs:

    - ``bsds500:<root>[:split+split[:all]]``: regions of the first annotator per image (``:all``: every annotator's);
    - ``wgisd:<root>``: every grape cluster;
    - ``instances:<root>[:train|heldout|all]``: instance maps (coco-mini, pennfudan), instances >= 1 % of the image;
    - ``sod:<root>[:split]``: bsds500-sod masks on the BSDS500 images of ``split`` (default ``val``);
    - ``folder:<root>``: one object per mask file (duts-tr).
    """
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"dataset spec {spec!r} must look like kind:path (kinds: {', '.join(DATASET_KINDS)})")
    root, _, options = rest.partition(":")
    if kind == "bsds500":
        splits, _, annotators = options.partition(":")
        if annotators not in ("", "all"):
            raise ValueError(f"dataset spec {spec!r}: the last part must be 'all' or absent, got {annotators!r}")
        return bsds500_refs(root, tuple((splits or "val").split("+")), all_annotators=annotators == "all")
    if kind == "instances":
        try:
            return instance_refs(root, options or "all")
        except ValueError as exc:
            raise ValueError(f"dataset spec {spec!r}: {exc}") from None
    if kind == "sod":
        return sod_refs(root, options or "val")
    if kind in ("wgisd", "folder") and options:
        raise ValueError(f"dataset spec {spec!r}: {kind} takes no options")
    if kind == "wgisd":
        return wgisd_refs(root)
    if kind == "folder":
        return folder_refs(root)
    raise ValueError(f"unknown dataset kind {kind!r} in {spec!r}; known: {', '.join(DATASET_KINDS)}")


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
