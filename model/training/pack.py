"""A training pack: a subset of a training mix in one small ``.npz`` that travels to an accelerator.

The sets and their weights are a training config's ``datasets`` (``configs/mix.yaml``, the same
mix ``model.training.train`` uses on CPU); ``pack_max_images`` and ``pack_tile`` say how each is cut down.
Every image is resized to a long side of ``side`` px and stored as JPEG; its objects as one PNG
label map (8- or 16-bit, 0 background). The mix holds training splits only (never a held-out image).
Large images (WGISD) are cut into tiles first, so that their objects keep a useful size.
The pack is built here, from ``../shared``, and is never committed: it is data.

    python -m model.training.pack --config configs/mix.yaml --out runs/pack/train-pack.npz

Arrays (``numpy.load(path)``, no pickles):
- ``image_bytes`` uint8 (total,), ``image_offsets`` int64 (N + 1,): JPEG of image i at offsets[i]:offsets[i+1];
- ``label_bytes``, ``label_offsets``: PNG label map of image i, the same way;
- ``image_set`` int16 (N,): index into ``set_names`` / ``set_weights``;
- ``object_image`` int32 (M,), ``object_label`` int32 (M,): object j is ``labels(object_image[j]) == object_label[j]``.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..data import ObjectRef, parse_dataset_spec, read_label_map, read_rgb
from .base import load_config
from .train import DatasetConfig, TrainConfig


def _resized(image: np.ndarray, labels: np.ndarray, side: int) -> Tuple[np.ndarray, np.ndarray]:
    scale = side / max(image.shape[:2])
    if scale >= 1.0:
        return image, labels
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return (cv2.resize(image, size, interpolation=cv2.INTER_AREA),
            cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST))


def _tiles(image: np.ndarray, labels: np.ndarray, tile: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    if tile <= 0:
        yield image, labels
        return
    height, width = labels.shape
    for y in range(0, max(1, height - tile // 2), tile):
        for x in range(0, max(1, width - tile // 2), tile):
            yield image[y:y + tile, x:x + tile], labels[y:y + tile, x:x + tile]


def _image_groups(refs: Sequence[ObjectRef]) -> Dict[Tuple[str, str], List[ObjectRef]]:
    groups: Dict[Tuple[str, str], List[ObjectRef]] = {}
    for ref in refs:
        groups.setdefault((ref.image_path, ref.label_path), []).append(ref)
    return groups


def build_pack(datasets: Sequence[DatasetConfig], out: Path, side: int = 320, quality: int = 75,
               budget_mib: float = 46.0, min_area: int = 64, seed: int = 0) -> Dict[str, int]:
    """Write the pack of a training config's ``datasets`` to ``out`` (atomically); returns objects per set.

    ValueError if it would exceed ``budget_mib``.
    """
    rng = np.random.default_rng(seed)
    images, labels, image_set, object_image, object_label = [], [], [], [], []
    counts: Dict[str, int] = {}
    for set_index, source in enumerate(datasets):
        listing = parse_dataset_spec(source.spec)
        groups = list(_image_groups(listing.refs).items())
        if source.pack_max_images is not None and len(groups) > source.pack_max_images:
            groups = [groups[i] for i in sorted(rng.choice(len(groups), source.pack_max_images, replace=False))]
        counts[source.spec] = 0
        for (image_path, label_path), refs in groups:
            full_image, full_labels = read_rgb(image_path), read_label_map(label_path)
            wanted = {ref.label for ref in refs}
            for image, label_map in _tiles(full_image, full_labels, source.pack_tile):
                image, label_map = _resized(image, label_map, side)
                ids, areas = np.unique(label_map, return_counts=True)
                kept = [int(i) for i, a in zip(ids, areas) if int(i) in wanted and a >= min_area]
                if not kept:
                    continue
                index = len(images)
                images.append(_encode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]))
                dtype = np.uint8 if label_map.max() < 256 else np.uint16
                labels.append(_encode(".png", label_map.astype(dtype), [cv2.IMWRITE_PNG_COMPRESSION, 9]))
                image_set.append(set_index)
                object_image += [index] * len(kept)
                object_label += kept
                counts[source.spec] += len(kept)
    arrays = {
        "image_bytes": np.concatenate(images), "image_offsets": _offsets(images),
        "label_bytes": np.concatenate(labels), "label_offsets": _offsets(labels),
        "image_set": np.asarray(image_set, np.int16),
        "object_image": np.asarray(object_image, np.int32), "object_label": np.asarray(object_label, np.int32),
        "set_names": np.asarray([s.spec for s in datasets]), "set_weights": np.asarray([float(s.weight) for s in datasets]),
        "side": np.asarray(side),
    }
    size_mib = sum(a.nbytes for a in arrays.values()) / 2 ** 20
    if size_mib > budget_mib:
        raise ValueError(f"the pack would take {size_mib:.1f} MiB, over the {budget_mib} MiB budget: "
                         "lower max_images, side or quality")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    return counts


def _encode(ext: str, array: np.ndarray, params: List[int]) -> np.ndarray:
    ok, buffer = cv2.imencode(ext, array, params)
    if not ok:
        raise ValueError(f"could not encode a {array.shape} {array.dtype} array as {ext}")
    return buffer.reshape(-1)


def _offsets(chunks: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)


@dataclass
class Pack:
    """A decoded pack: ``images`` (N, S, S, 3) uint8 and ``labels`` (N, S, S) int32, top-left aligned,
    ``sizes`` (N, 2) = real (height, width); objects as (``object_image``, ``object_label``)."""

    images: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    image_set: np.ndarray
    object_image: np.ndarray
    object_label: np.ndarray
    set_names: List[str]
    set_weights: np.ndarray

    def object_weights(self) -> np.ndarray:
        """Sampling probability of each object: its set's weight, shared by the set's objects."""
        sets = self.image_set[self.object_image]
        per_set = np.bincount(sets, minlength=len(self.set_names)).astype(np.float64)
        weights = self.set_weights[sets] / per_set[sets]
        return weights / weights.sum()


def load_pack(path: str | Path, workers: Optional[int] = None) -> Pack:
    """Decode every image and label map of the pack at ``path`` (threads); ValueError names what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}  # each npz access re-reads: read once
        side = int(arrays["side"])
        image_bytes, image_offsets = arrays["image_bytes"], arrays["image_offsets"]
        label_bytes, label_offsets = arrays["label_bytes"], arrays["label_offsets"]
        count = len(image_offsets) - 1
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"training pack {path}: {exc}") from None
    images = np.zeros((count, side, side, 3), np.uint8)
    labels = np.zeros((count, side, side), np.int32)
    sizes = np.zeros((count, 2), np.int32)

    def decode(i: int) -> None:
        bgr = cv2.imdecode(image_bytes[image_offsets[i]:image_offsets[i + 1]], cv2.IMREAD_COLOR)
        label_map = cv2.imdecode(label_bytes[label_offsets[i]:label_offsets[i + 1]], cv2.IMREAD_UNCHANGED)
        if bgr is None or label_map is None or bgr.shape[:2] != label_map.shape or max(label_map.shape) > side:
            raise ValueError(f"training pack {path}: image {i} does not decode to an image and a label map of one size")
        h, w = label_map.shape
        images[i, :h, :w] = bgr[:, :, ::-1]
        labels[i, :h, :w] = label_map
        sizes[i] = (h, w)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(decode, range(count)))
    return Pack(images, labels, sizes, arrays["image_set"].astype(np.int64), arrays["object_image"].astype(np.int64),
                arrays["object_label"].astype(np.int64), [str(n) for n in arrays["set_names"]],
                arrays["set_weights"].astype(np.float64))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.training.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/mix.yaml", help="a training config: its datasets are packed")
    p.add_argument("--out", default="runs/pack/train-pack.npz")
    p.add_argument("--side", type=int, default=320)
    p.add_argument("--quality", type=int, default=75)
    p.add_argument("--budget-mib", type=float, default=46.0)
    args = p.parse_args(argv)
    try:
        counts = build_pack(load_config(args.config, (), TrainConfig).datasets, Path(args.out), args.side, args.quality, args.budget_mib)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    size = Path(args.out).stat().st_size / 2 ** 20
    print(f"wrote {args.out}: {size:.1f} MiB, objects per set: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
