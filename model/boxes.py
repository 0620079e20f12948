"""The one box type: pixel boxes (y0, y1, x0, x1) with half-open rows and columns, and masks kept
as their box (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

Box = Tuple[int, int, int, int]


def bounding_box(mask: np.ndarray) -> Optional[Box]:
    """The smallest box holding every True pixel of bool ``mask`` (H, W); None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def box_slices(box: Sequence[int]) -> Tuple[slice, slice]:
    y0, y1, x0, x1 = box
    return slice(y0, y1), slice(x0, x1)


def check_box(box: Sequence[int], crop_shape: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` as ints, after checking that it lies in an image of ``shape`` (H, W) and that a
    crop of ``crop_shape`` fills it; ValueError naming all three otherwise."""
    y0, y1, x0, x1 = (int(v) for v in box)
    height, width = (int(v) for v in shape)
    if not (0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width) or tuple(crop_shape) != (y1 - y0, x1 - x0):
        raise ValueError(f"box {tuple(box)} with a mask of shape {tuple(crop_shape)} does not fit a "
                         f"({height}, {width}) mask")
    return y0, y1, x0, x1


def pack_mask(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool), axis=None)


def unpack_mask(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.unpackbits(packed, count=height * width).reshape(height, width).astype(bool)


@dataclass(frozen=True)
class BoxMask:
    """A bool mask of a (height, width) image kept as its box and the bit-packed pixels inside
    it: keeping, testing and encoding it costs what the object costs, not the image."""

    height: int
    width: int
    box: Box
    packed: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray) -> "BoxMask":
        """From a whole (H, W) mask (its bounding box; an empty mask gets an empty box)."""
        mask = np.asarray(mask, dtype=bool)
        box = bounding_box(mask) or (0, 0, 0, 0)
        return cls.from_crop(mask[box_slices(box)], box, mask.shape)

    @classmethod
    def from_crop(cls, crop: np.ndarray, box: Sequence[int], shape: Sequence[int]) -> "BoxMask":
        """From the mask inside ``box`` of an image of ``shape`` (H, W)."""
        height, width = (int(v) for v in shape)
        return cls(height, width, check_box(box, np.shape(crop), shape), pack_mask(crop))

    @property
    def slices(self) -> Tuple[slice, slice]:
        return box_slices(self.box)

    def crop(self) -> np.ndarray:
        """The bool mask inside ``box``."""
        y0, y1, x0, x1 = self.box
        return unpack_mask(self.packed, y1 - y0, x1 - x0)

    def mask(self) -> np.ndarray:
        """The whole bool (H, W) mask."""
        full = np.zeros((self.height, self.width), dtype=bool)
        full[self.slices] = self.crop()
        return full

    def contains(self, row: int, col: int) -> bool:
        y0, y1, x0, x1 = self.box
        if not (y0 <= row < y1 and x0 <= col < x1):
            return False
        index = (row - y0) * (x1 - x0) + (col - x0)
        return bool((self.packed[index >> 3] >> (7 - (index & 7))) & 1)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes
