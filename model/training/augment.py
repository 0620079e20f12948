"""Training crops and augmentations, including SUEM copy-paste (CFR-ICL).

All functions work on numpy arrays: images uint8 (H, W, 3), masks uint8 (H, W)
with 1 object, 0 background, 128 ignore. Mask arithmetic is kept in small pure
functions so it can be tested on tiny arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..clicks import IGNORE_VALUE

# --- SUEM mask arithmetic ------------------------------------------------------------------

def paste_object_onto(background: np.ndarray, image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The object (``mask``) of ``image`` pasted onto ``background``; the ground truth is unchanged."""
    m = (mask == 1)[..., None]
    return np.where(m, image, background), mask.copy()


def occlude(image: np.ndarray, gt: np.ndarray, other_image: np.ndarray, other_mask: np.ndarray):
    """Another object pasted over this one hides it: gt minus the pasted object."""
    m = other_mask == 1
    out_gt = gt.copy()
    out_gt[m & (gt != IGNORE_VALUE)] = 0
    return np.where(m[..., None], other_image, image), out_gt


def merge(image: np.ndarray, gt: np.ndarray, other_image: np.ndarray, other_mask: np.ndarray):
    """Another object pasted over this one joins it: gt union the pasted object."""
    m = other_mask == 1
    out_gt = gt.copy()
    out_gt[m] = 1
    return np.where(m[..., None], other_image, image), out_gt


def blend_object(image: np.ndarray, gt: np.ndarray, other_image: np.ndarray, other_mask: np.ndarray, alpha: float):
    """Another object alpha-blended over this one; the ground truth is unchanged."""
    a = (other_mask == 1)[..., None] * alpha
    out = image.astype(np.float32) * (1 - a) + other_image.astype(np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), gt.copy()


def blend_images(image: np.ndarray, gt: np.ndarray, other_image: np.ndarray, alpha: float):
    """The whole image blended with another; the ground truth is unchanged."""
    out = image.astype(np.float32) * (1 - alpha) + other_image.astype(np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), gt.copy()


# --- crops -----------------------------------------------------------------------------------

def resize_pair(image: np.ndarray, mask: np.ndarray, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Image bilinear (antialiased when shrinking), mask nearest."""
    t = torch.tensor(image).permute(2, 0, 1)[None].float()  # a copy: the image may be read-only
    shrink = height < image.shape[0] or width < image.shape[1]
    t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)
    m = torch.from_numpy(mask)[None, None].float()
    m = F.interpolate(m, size=(height, width), mode="nearest")
    return t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy(), m[0, 0].byte().numpy()


def object_crop(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator,
                object_scale: Tuple[float, float] = (0.25, 1.0), max_upscale: float = 3.0):
    """A ``size x size`` crop where the object's box long side is ``object_scale`` x size, jittered.

    The image is zero-padded where the crop leaves it; padding is marked ignore in the mask.
    """
    ys, xs = np.nonzero(mask == 1)
    box = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    scale = rng.uniform(*object_scale) * size / box
    scale = min(scale, max_upscale, size / min(image.shape[:2]) * 2.5)
    scale = max(scale, size / max(image.shape[:2]) * 0.5)  # never shrink the whole image below half a crop
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    image, mask = resize_pair(image, mask, h, w)
    ys, xs = np.nonzero(mask == 1)
    if len(ys) == 0:  # object vanished when shrinking: keep the largest scale's nearest pixel
        ys, xs = np.array([h // 2]), np.array([w // 2])
    i = rng.integers(len(ys))
    cy = ys[i] + rng.integers(-size // 4, size // 4 + 1)
    cx = xs[i] + rng.integers(-size // 4, size // 4 + 1)
    y0, x0 = int(cy - size // 2), int(cx - size // 2)
    out_img = np.zeros((size, size, 3), np.uint8)
    out_mask = np.full((size, size), IGNORE_VALUE, np.uint8)
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(h, y0 + size), min(w, x0 + size)
    if sy1 > sy0 and sx1 > sx0:
        out_img[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
        out_mask[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    return out_img, out_mask


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """Random brightness, contrast and saturation in ``1 +/- strength``."""
    x = image.astype(np.float32)
    x = x * rng.uniform(1 - strength, 1 + strength)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(1 - strength, 1 + strength) + grey
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


@dataclass
class AugmentConfig:
    object_scale: Tuple[float, float] = (0.25, 1.0)
    flip: float = 0.5
    color_jitter: float = 0.2
    # SUEM probabilities, each drawn independently of scale / flip / colour.
    paste_onto_other: float = 0.1
    occlude: float = 0.1
    merge: float = 0.05
    blend_object: float = 0.05
    blend_images: float = 0.05
    blend_alpha: Tuple[float, float] = (0.2, 0.5)


def suem_copy_paste(image, gt, other_image, other_mask, cfg: AugmentConfig, rng: np.random.Generator):
    """Apply at most one SUEM mode with its configured probability (``other_*`` are aligned crops)."""
    modes = [("paste_onto_other", cfg.paste_onto_other), ("occlude", cfg.occlude), ("merge", cfg.merge),
             ("blend_object", cfg.blend_object), ("blend_images", cfg.blend_images)]
    u = rng.uniform()
    for name, p in modes:
        if u < p:
            break
        u -= p
    else:
        return image, gt, None
    alpha = rng.uniform(*cfg.blend_alpha)
    if name == "paste_onto_other":
        out = paste_object_onto(other_image, image, gt)
    elif name == "occlude":
        # keep at least part of the object visible
        if ((other_mask == 1) & (gt == 1)).sum() > 0.7 * (gt == 1).sum():
            return image, gt, None
        out = occlude(image, gt, other_image, other_mask)
    elif name == "merge":
        out = merge(image, gt, other_image, other_mask)
    elif name == "blend_object":
        out = blend_object(image, gt, other_image, other_mask, alpha)
    else:
        out = blend_images(image, gt, other_image, alpha)
    return out[0], out[1], name
