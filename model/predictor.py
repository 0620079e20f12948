"""Clicks -> probability map, with Cascade-Forward Refinement (CFR) and zoom-in.

    predictor = ClickSegPredictor.from_checkpoint(DEFAULT_CHECKPOINT)
    state = predictor.encode_image(image)            # uint8 (H, W, 3), cache per image
    prob = predictor.predict(state, clicks)           # float32 (H, W) in [0, 1]
    prob = predictor.predict(state, clicks + [c], prev_mask=prob)

All work happens on a *working* copy of the image whose long side is at most
``max_working_side``; the result is resized back to the image's full size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from .boxes import bounding_box
from .checkpoint import load_checkpoint
from .clicks import MASK_THRESHOLD, Click, encode_click_maps, validate_clicks
from .recall import RECALL_CLICK_RADIUS, RECALL_STRIDE, Proposal, RecallFeatures, propose_objects

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default.safetensors"


@dataclass(frozen=True)
class Box:
    """Half-open pixel box ``[y0, y1) x [x0, x1)`` in working-image pixels."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


@dataclass
class ImageState:
    """Per-image work cached between clicks on the same image."""

    height: int  # original image size
    width: int
    working: torch.Tensor  # (1, 3, h, w) float in [0, 1]
    full_view_prepared: object = None  # net.prepare_image of the full-view input
    full_view_flipped: object = None
    recall_features: Optional[RecallFeatures] = field(default=None, repr=False)  # see ClickSegPredictor.encode_recall
    # The last returned full-size map and its working-size twin, so feeding it back costs nothing.
    last_output: Optional[np.ndarray] = field(default=None, repr=False)
    last_output_working: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def working_size(self) -> Tuple[int, int]:
        return int(self.working.shape[-2]), int(self.working.shape[-1])

    @property
    def nbytes(self) -> int:
        total = self.working.numel() * self.working.element_size()
        for t in (self.full_view_prepared, self.full_view_flipped, self.last_output_working):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        if self.recall_features is not None:
            total += self.recall_features.nbytes
        if self.last_output is not None:
            total += self.last_output.nbytes
        return total


def validate_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has zero size {image.shape[1]}x{image.shape[0]}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return image


def _network_shape(height: int, width: int, input_size: int, multiple: int) -> Tuple[int, int]:
    """Input shape for a ``height x width`` view: long side about ``input_size``, sides multiples of ``multiple``."""
    scale = input_size / max(height, width)
    return (max(multiple, int(round(height * scale / multiple)) * multiple),
            max(multiple, int(round(width * scale / multiple)) * multiple))


def _shrink_map(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bool or [0, 1] map (H, W) -> float32 ``size`` (box filter; PIL is much faster than torch here).

    A bool mask is resized only around its bounding box (zeros elsewhere), so a small object on
    a large image costs what the object costs.
    """
    mask = np.asarray(mask)
    if mask.shape == tuple(size):
        return mask.astype(np.float32)
    if mask.dtype != bool:
        small = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32), mode="F").resize((size[1], size[0]), Image.BOX)
        return np.array(small, dtype=np.float32)
    out = np.zeros(size, dtype=np.float32)
    box = bounding_box(mask)
    if box is None:
        return out
    top, bottom, left, right = box[0], box[1] - 1, box[2], box[3] - 1  # inclusive
    height, width = mask.shape
    sy, sx = height / size[0], width / size[1]  # input pixels per output pixel
    # output pixels whose box window can reach the mask (one of margin), and the input they read
    oy0, oy1 = max(0, int(top / sy) - 1), min(size[0], int(bottom / sy) + 2)
    ox0, ox1 = max(0, int(left / sx) - 1), min(size[1], int(right / sx) + 2)
    iy0, iy1 = max(0, int(oy0 * sy) - 1), min(height, math.ceil(oy1 * sy) + 1)
    ix0, ix1 = max(0, int(ox0 * sx) - 1), min(width, math.ceil(ox1 * sx) + 1)
    crop = Image.fromarray(mask[iy0:iy1, ix0:ix1].view(np.uint8) * np.uint8(255))
    source = (ox0 * sx - ix0, oy0 * sy - iy0, ox1 * sx - ix0, oy1 * sy - iy0)
    small = crop.resize((ox1 - ox0, oy1 - oy0), Image.BOX, box=source)
    out[oy0:oy1, ox0:ox1] = np.asarray(small, dtype=np.float32) / 255.0
    return out


OUTSIDE_LOGIT = -30.0  # logit given to the grid pixels beyond a proposal's one-pixel ring


def _upscale_proposal(proposal: Proposal, logits: np.ndarray, size: Tuple[int, int], exclude: np.ndarray,
                      object_prob: Optional[np.ndarray] = None) -> Proposal:
    """A proposal found on the grid of the logit map ``logits`` (h, w) -> the same object at full
    ``size``: the logits of the component and of one pixel around it, bilinearly upscaled and
    cut at 0 (probability 0.5), computed in its box only, without the pixels of bool ``exclude``
    (``size``) or of the object ``object_prob >= 0.49`` (``size``)."""

    def blocked(rows: slice, cols: slice) -> np.ndarray:
        out = exclude[rows, cols]
        return out if object_prob is None else out | (object_prob[rows, cols] >= MASK_THRESHOLD)

    h, w = proposal.shape
    if logits.shape != (h, w):
        raise ValueError(f"logits have shape {logits.shape}, the proposal's grid is {(h, w)}")
    if proposal.shape == tuple(size):
        return Proposal(proposal.crop & ~blocked(*proposal.slices), proposal.box, proposal.shape, proposal.score)
    sy, sx = size[0] / h, size[1] / w
    y0, y1, x0, x1 = proposal.box
    py0, py1, px0, px1 = max(0, y0 - 1), min(h, y1 + 1), max(0, x0 - 1), min(w, x1 + 1)  # a pixel of context
    around = np.zeros((py1 - py0, px1 - px0), dtype=bool)
    around[y0 - py0:y1 - py0, x0 - px0:x1 - px0] = proposal.crop
    around = ndimage.binary_dilation(around, structure=np.ones((3, 3), bool))  # its fall-off, not its neighbours
    padded = np.where(around, logits[py0:py1, px0:px1], OUTSIDE_LOGIT).astype(np.float32)
    # map the crop exactly: align pixel grids by resizing the crop to its full-size extent
    up = F.interpolate(torch.from_numpy(padded)[None, None], size=(round((py1 - py0) * sy), round((px1 - px0) * sx)),
                       mode="bilinear", align_corners=False)[0, 0].numpy() >= 0
    Y0, X0 = int(np.floor(py0 * sy)), int(np.floor(px0 * sx))
    Y1, X1 = min(size[0], Y0 + up.shape[0], math.ceil(py1 * sy)), min(size[1], X0 + up.shape[1], math.ceil(px1 * sx))
    crop = up[:Y1 - Y0, :X1 - X0] & ~blocked(slice(Y0, Y1), slice(X0, X1))
    return Proposal(crop, (Y0, Y1, X0, X1), tuple(size), proposal.score)


def _resize(t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    shrinking = size[0] < t.shape[-2] or size[1] < t.shape[-1]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


class ClickSegPredictor:
    """CFR inference around any registered network.

    Args:
        net: a network from ``model.registry.create_model`` (in eval mode).
        cfr_steps: extra passes that feed the prediction back as the mask input (0 = CFR off).
        cfr_min_change: stop the CFR loop once at most this many input pixels flip at 0.49.
        cfr_clicks: CFR runs only while the number of clicks is at most this (None = always).
        zoom_in: from the second click on, predict on a crop around the mask and clicks.
        flip: average with the prediction on the horizontally flipped input.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        cfr_steps: int = 2,
        cfr_min_change: int = 20,
        cfr_clicks: Optional[int] = None,
        zoom_in: bool = True,
        zoom_expansion: float = 1.4,
        zoom_min_crop: int = 64,
        flip: bool = False,
        max_working_side: int = 1280,
        device: Union[str, torch.device] = "cpu",
    ):
        if cfr_steps < 0:
            raise ValueError(f"cfr_steps must be >= 0, got {cfr_steps}")
        self.device = torch.device(device)
        # channels-last convolutions: ≈ 15 % faster per click and per recall on CPU (same outputs)
        self.net = net.to(self.device, memory_format=torch.channels_last).eval()
        self.input_size = int(net.arch_config["input_size"])
        self.size_multiple = int(net.size_multiple)
        self.click_radius = float(net.click_radius)
        self.cfr_steps = cfr_steps
        self.cfr_min_change = cfr_min_change
        self.cfr_clicks = cfr_clicks
        self.zoom_in = zoom_in
        self.zoom_expansion = zoom_expansion
        self.zoom_min_crop = zoom_min_crop
        self.flip = flip
        self.max_working_side = max_working_side
        self.last_cfr_passes = 0  # passes run by the last predict(), for benchmarks and tests
        self._last_state: Optional[ImageState] = None
        self._last_image: Optional[np.ndarray] = None

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path] = DEFAULT_CHECKPOINT, device: str = "cpu", **options) -> "ClickSegPredictor":
        return cls(load_checkpoint(path, map_location=device), device=device, **options)

    @property
    def model_version(self) -> str:
        meta = getattr(self.net, "checkpoint_meta", {}) or {}
        if meta.get("version"):
            return str(meta["version"])
        path = getattr(self.net, "checkpoint_path", None)
        return f"{self.net.arch_name}:{Path(path).stem}" if path else self.net.arch_name

    # --- per-image work --------------------------------------------------------------------

    @torch.inference_mode()
    def encode_image(self, image: np.ndarray) -> ImageState:
        """Decode-side work done once per image: working copy + full-view features."""
        image = validate_image(image)
        h, w = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        scale = min(1.0, self.max_working_side / max(h, w))
        if scale < 1.0:
            tensor = _resize(tensor, (max(1, round(h * scale)), max(1, round(w * scale))))
        state = ImageState(height=h, width=w, working=tensor)
        full_view = _resize(tensor, _network_shape(*state.working_size, self.input_size, self.size_multiple))
        state.full_view_prepared = self.net.prepare_image(full_view)
        if self.flip:
            state.full_view_flipped = self.net.prepare_image(full_view.flip(-1))
        return state

    # --- exemplar recall ----------------------------------------------------------------------

    @property
    def has_recall(self) -> bool:
        """True when the network carries an exemplar recall branch (``model.recall``)."""
        return getattr(self.net, "recall", None) is not None

    @torch.inference_mode()
    def encode_recall(self, state: ImageState) -> RecallFeatures:
        """Click-independent recall features of the image, computed once per image."""
        if not self.has_recall:
            raise ValueError(f"model {self.model_version} has no exemplar recall branch")
        if state.recall_features is None:
            size = _network_shape(*state.working_size, int(self.net.arch_config["recall_input_size"]),
                                  self.net.recall.size_multiple)
            state.recall_features = self.net.recall.encode(_resize(state.working, size))
        return state.recall_features

    def recall(self, state: ImageState, exemplar_mask: np.ndarray, clicks: Sequence[Click],
               object_prob: np.ndarray) -> np.ndarray:
        """Probability (h, w) at working size that a pixel belongs to an object like the exemplar.

        exemplar_mask bool (H, W): union of the accepted objects of the label; clicks and
        object_prob (H, W): the current object's clicks and probability map (full-size pixels).
        """
        logits = self.recall_logits(state, exemplar_mask, clicks, object_prob)
        return torch.sigmoid(_resize(logits, state.working_size))[0, 0].cpu().numpy()

    def recall_logits(self, state: ImageState, exemplar_mask: np.ndarray, clicks: Sequence[Click],
                      object_prob: np.ndarray) -> torch.Tensor:
        """``recall``'s logits (1, 1, h', w') float32 on the recall branch's output grid."""
        self._check_recall_inputs(state, exemplar_mask, clicks, object_prob)
        return self._recall_logits(state, _shrink_map(exemplar_mask, state.working_size), clicks, object_prob)

    def _check_recall_inputs(self, state: ImageState, exemplar_mask, clicks, object_prob) -> None:
        validate_clicks(list(clicks), state.height, state.width)
        for name, m in (("exemplar_mask", exemplar_mask), ("object_prob", object_prob)):
            if np.shape(m) != (state.height, state.width):
                raise ValueError(f"{name} has shape {np.shape(m)}, expected the image's (H, W) = "
                                 f"({state.height}, {state.width})")
        if not np.any(exemplar_mask):
            raise ValueError("exemplar_mask is empty: recall needs at least one accepted object")

    @torch.inference_mode()
    def _recall_logits(self, state: ImageState, exemplar_working: np.ndarray, clicks: Sequence[Click],
                       object_prob: np.ndarray) -> torch.Tensor:
        """Recall logits (1, 1, h', w') float32 on the recall branch's output grid."""
        features = self.encode_recall(state)
        input_h, input_w = (side * RECALL_STRIDE for side in features.coarse.shape[-2:])
        exemplar = _resize(torch.from_numpy(exemplar_working).to(self.device)[None, None], (input_h, input_w))
        obj = self._object_prob_at(state, object_prob, (input_h, input_w))
        sy, sx = input_h / state.height, input_w / state.width
        scaled = [Click((c.y + 0.5) * sy - 0.5, (c.x + 0.5) * sx - 0.5, c.is_positive) for c in clicks]
        maps = encode_click_maps(scaled, input_h, input_w, radius=RECALL_CLICK_RADIUS, device=self.device)[:, 1:]
        return self.net.recall(features, exemplar, obj, maps, torch.zeros_like(obj)).float()

    def propose(self, state: ImageState, exemplar_mask: np.ndarray, clicks: Sequence[Click],
                object_prob: np.ndarray, exclude: Optional[np.ndarray] = None, **options) -> List[Proposal]:
        """Other objects like the exemplar, as ``Proposal``s in full-size pixels (best first).

        No proposal covers the current object (``object_prob >= 0.49``) or bool ``exclude``
        (H, W), the other pixels to keep free (accepted objects; defaults to the exemplar mask).
        ``options`` go to ``model.recall.propose_objects`` (``min_score``, ``min_area`` in
        full-size pixels, ...).
        """
        if exclude is None:
            exclude = exemplar_mask
        elif np.shape(exclude) != (state.height, state.width):
            raise ValueError(f"exclude has shape {np.shape(exclude)}, expected ({state.height}, {state.width})")
        exclude = np.asarray(exclude, dtype=bool)
        logits = self.recall_logits(state, exemplar_mask, clicks, object_prob)
        # components on the recall output grid; each is upscaled from its logits to full size
        logits_grid = logits[0, 0].cpu().numpy()
        prob_grid = 1.0 / (1.0 + np.exp(-logits_grid))
        grid = prob_grid.shape
        if "min_area" in options:
            scale = (grid[0] * grid[1]) / (state.height * state.width)
            options["min_area"] = max(1, int(round(options["min_area"] * scale)))
        object_grid = self._object_prob_at(state, object_prob, grid)[0, 0].cpu().numpy()
        blocked = (_shrink_map(exclude, grid) > 0.5) | (object_grid >= MASK_THRESHOLD)
        found = propose_objects(prob_grid, blocked, **options)
        return [_upscale_proposal(p, logits_grid, (state.height, state.width), exclude, object_prob) for p in found]

    @torch.inference_mode()
    def _object_prob_at(self, state: ImageState, object_prob: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
        """``object_prob`` (H, W) as float32 (1, 1, *size) on the device; from the working-size map
        when it is the last output (no full-size resize)."""
        if object_prob is state.last_output and state.last_output_working is not None:
            return _resize(state.last_output_working, size).float()
        return torch.from_numpy(_shrink_map(object_prob, size)).to(self.device)[None, None]

    # --- prediction ------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(
        self,
        image: Union[np.ndarray, ImageState],
        clicks: Sequence[Click],
        prev_mask: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Probability map (H, W) float32 for ``clicks`` (full-image pixels) on ``image``.

        ``image`` is an ``ImageState`` from ``encode_image`` or a uint8 array (re-encoded
        unless it is the array of the previous call). ``prev_mask`` is the previous
        probability map (H, W) of this object, or None.
        """
        state = self._state_for(image)
        clicks = list(clicks)
        validate_clicks(clicks, state.height, state.width)
        prev_working = self._prev_mask_working(state, prev_mask)

        box = self._zoom_box(state, clicks, prev_working) if self.zoom_in and len(clicks) > 1 else None
        use_cfr = self.cfr_clicks is None or len(clicks) <= self.cfr_clicks
        prob_view = self._predict_view(state, box, clicks, prev_working, self.cfr_steps if use_cfr else 0)

        wh, ww = state.working_size
        if box is None:
            prob_working = _resize(prob_view, (wh, ww))
        else:
            prob_working = torch.zeros(1, 1, wh, ww, device=self.device)
            prob_working[..., box.y0:box.y1, box.x0:box.x1] = _resize(prob_view, (box.height, box.width))
        full = _resize(prob_working, (state.height, state.width))[0, 0].clamp_(0, 1).float().cpu().numpy()
        state.last_output, state.last_output_working = full, prob_working
        return full

    def _state_for(self, image: Union[np.ndarray, ImageState]) -> ImageState:
        if isinstance(image, ImageState):
            return image
        if self._last_image is not image or self._last_state is None:
            self._last_state = self.encode_image(image)
            self._last_image = image
        return self._last_state

    def _prev_mask_working(self, state: ImageState, prev_mask: Optional[np.ndarray]) -> Optional[torch.Tensor]:
        if prev_mask is None:
            return None
        if prev_mask is state.last_output:
            return state.last_output_working
        prev_mask = np.asarray(prev_mask)
        if prev_mask.shape != (state.height, state.width):
            raise ValueError(
                f"prev_mask has shape {prev_mask.shape}, expected the image's (H, W) = ({state.height}, {state.width})"
            )
        t = torch.from_numpy(np.ascontiguousarray(prev_mask, dtype=np.float32)).to(self.device)[None, None]
        return _resize(t, state.working_size).clamp_(0, 1)

    def _zoom_box(self, state: ImageState, clicks: Sequence[Click], prev: Optional[torch.Tensor]) -> Optional[Box]:
        """RITM-style zoom-in: box around the current mask and all clicks, expanded; None = full view."""
        wh, ww = state.working_size
        sy, sx = wh / state.height, ww / state.width
        ys = [c.y * sy for c in clicks]
        xs = [c.x * sx for c in clicks]
        if prev is not None:
            rows = torch.nonzero((prev[0, 0] > MASK_THRESHOLD).any(dim=1)).flatten()
            cols = torch.nonzero((prev[0, 0] > MASK_THRESHOLD).any(dim=0)).flatten()
            if len(rows):
                ys += [float(rows[0]), float(rows[-1])]
                xs += [float(cols[0]), float(cols[-1])]
        cy, cx = (min(ys) + max(ys)) / 2, (min(xs) + max(xs)) / 2
        min_crop = min(self.zoom_min_crop, wh, ww)
        bh = max((max(ys) - min(ys) + 1) * self.zoom_expansion, min_crop)
        bw = max((max(xs) - min(xs) + 1) * self.zoom_expansion, min_crop)
        if bh >= 0.8 * wh and bw >= 0.8 * ww:
            return None
        bh, bw = min(bh, wh), min(bw, ww)
        y0 = int(np.clip(round(cy - bh / 2), 0, wh - math.ceil(bh)))
        x0 = int(np.clip(round(cx - bw / 2), 0, ww - math.ceil(bw)))
        return Box(y0, min(wh, y0 + math.ceil(bh)), x0, min(ww, x0 + math.ceil(bw)))

    def _predict_view(self, state: ImageState, box: Optional[Box], clicks: Sequence[Click],
                      prev_working: Optional[torch.Tensor], cfr_steps: int) -> torch.Tensor:
        """CFR loop on one view (full image or zoom box). Returns prob (1, 1, ih, iw) at input size."""
        wh, ww = state.working_size
        if box is None:
            view_h, view_w, oy, ox = wh, ww, 0, 0
            prepared, prepared_flipped = state.full_view_prepared, state.full_view_flipped
        else:
            view_h, view_w, oy, ox = box.height, box.width, box.y0, box.x0
        ih, iw = _network_shape(view_h, view_w, self.input_size, self.size_multiple)
        if box is not None:
            crop = _resize(state.working[..., box.y0:box.y1, box.x0:box.x1], (ih, iw))
            prepared = self.net.prepare_image(crop)
            prepared_flipped = self.net.prepare_image(crop.flip(-1)) if self.flip else None
        if self.flip and prepared_flipped is None:  # flip switched on after encode_image
            prepared_flipped = self.net.prepare_image(_resize(state.working, (ih, iw)).flip(-1))
            state.full_view_flipped = prepared_flipped

        # full image pixel -> working pixel -> input pixel (pixel centres preserved)
        sy, sx = wh / state.height, ww / state.width
        ry, rx = ih / view_h, iw / view_w
        view_clicks = [
            Click(((c.y + 0.5) * sy - oy) * ry - 0.5, ((c.x + 0.5) * sx - ox) * rx - 0.5, c.is_positive) for c in clicks
        ]
        mask = None
        if prev_working is not None:
            mask = _resize(prev_working[..., oy:oy + view_h, ox:ox + view_w], (ih, iw))

        prob = self._forward(prepared, prepared_flipped, view_clicks, mask, ih, iw)
        self.last_cfr_passes = 1
        for _ in range(cfr_steps):
            new_prob = self._forward(prepared, prepared_flipped, view_clicks, prob, ih, iw)
            self.last_cfr_passes += 1
            flipped = ((new_prob > MASK_THRESHOLD) != (prob > MASK_THRESHOLD)).sum().item()
            prob = new_prob
            if flipped <= self.cfr_min_change:
                break
        return prob

    def _forward(self, prepared, prepared_flipped, clicks: Sequence[Click], mask: Optional[torch.Tensor],
                 ih: int, iw: int) -> torch.Tensor:
        maps = encode_click_maps(clicks, ih, iw, mask, radius=self.click_radius, device=self.device)
        prob = self._prob(prepared, maps, ih, iw)
        if prepared_flipped is not None:
            prob = 0.5 * (prob + self._prob(prepared_flipped, maps.flip(-1), ih, iw).flip(-1))
        return prob

    def _prob(self, prepared, maps: torch.Tensor, ih: int, iw: int) -> torch.Tensor:
        logits = self.net.forward_prepared(prepared, maps)
        return torch.sigmoid(_resize(logits.float(), (ih, iw)))
