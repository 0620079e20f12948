"""Clicks -> probability map, with Cascade-Forward Refinement (CFR) and zoom-in.

    predictor = ClickSegPredictor.from_checkpoint(DEFAULT_CHECKPOINT)
    state = predictor.encode_image(image)            # uint8 (H, W, 3), cache per image
    prob = predictor.predict(state, clicks)           # float32 (H, W) in [0, 1]
    prob = predictor.predict(state, clicks + [c], prev_mask=prob)

All work happens on a *working* copy of the image whose long side is at most
``max_working_side``; the result is resized back to the image's full size.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import load_checkpoint
from .click_refinement import clicks_disagree, refine_for_clicks
from .clicked_components import keep_clicked_components
from .clicks import MASK_THRESHOLD, Click, encode_click_maps, validate_clicks
from .nets.recall import RECALL_CLICK_RADIUS, RECALL_STRIDE, RecallFeatures
from .transforms import ZoomIn, flip, map_click, map_clicks, network_shape, resize, shrink_map, working_shape

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default.safetensors"
# L-BFGS iterations of click refinement by default: on the suite it lowered NoC@90 on every set
# (model card, "Click-consistency refinement"); 5 gained less, 20 no more.
DEFAULT_CLICK_REFINEMENT_ITERATIONS = 10

# encode_image reads decoded images through torch.from_numpy without copying them; they are
# read-only and only read. Set once here, not per call: warning filters are process-wide.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)


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
    def working_scale(self) -> Tuple[float, float]:
        """(sy, sx): working pixels per image pixel."""
        wh, ww = self.working_size
        return wh / self.height, ww / self.width

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


class ClickSegPredictor:
    """CFR inference around any registered network.

    Args:
        net: a network from ``model.nets.registry.create_model`` (in eval mode).
        cfr_steps: extra passes that feed the prediction back as the mask input (0 = CFR off).
        cfr_min_change: stop the CFR loop once at most this many input pixels flip at 0.49.
        cfr_clicks: CFR runs only while the number of clicks is at most this (None = always).
        zoom_in: from the second click on, predict on a crop around the mask and clicks.
        flip: average with the prediction on the horizontally flipped input.
        click_refinement_iterations: when the final prediction contradicts a click, this many
            L-BFGS iterations of f-BRS-style click-consistency refinement (``model.click_refinement``);
            0 = off; None = ``DEFAULT_CLICK_REFINEMENT_ITERATIONS`` where the network has
            ``decoder_features`` and flip is off, else off.
        clicked_components_only: the mask keeps only its connected parts that hold a positive click
            (``model.clicked_components``); the others drop just below the threshold.
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
        click_refinement_iterations: Optional[int] = None,
        clicked_components_only: bool = True,
        max_working_side: int = 1280,
        device: Union[str, torch.device] = "cpu",
    ):
        if cfr_steps < 0:
            raise ValueError(f"cfr_steps must be >= 0, got {cfr_steps}")
        refinable = hasattr(net, "decoder_features")
        if click_refinement_iterations is None:
            click_refinement_iterations = DEFAULT_CLICK_REFINEMENT_ITERATIONS if refinable and not flip else 0
        if click_refinement_iterations < 0:
            raise ValueError(f"click_refinement_iterations must be >= 0, got {click_refinement_iterations}")
        if click_refinement_iterations and not refinable:
            raise ValueError(f"click_refinement_iterations={click_refinement_iterations}: {net.arch_name} has no "
                             "decoder_features to refine (use 0)")
        if click_refinement_iterations and flip:
            raise ValueError("click refinement and flip do not combine: choose one")
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
        self.click_refinement_iterations = click_refinement_iterations
        self.clicked_components_only = clicked_components_only
        self.max_working_side = max_working_side
        self.last_cfr_passes = 0  # passes run by the last predict(), for benchmarks and tests
        self.last_click_refined = False  # whether the last predict() ran click refinement
        self._last_state: Optional[ImageState] = None
        self._last_image: Optional[np.ndarray] = None
        self._last_pass: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (decoder features, click maps)

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
    def encode_image(self, image: np.ndarray, size: Optional[Tuple[int, int]] = None) -> ImageState:
        """Decode-side work done once per image: working copy + full-view features.

        ``size`` (H, W) is the image's true size when ``image`` is a reduced copy of it (a JPEG
        decoded at a reduced DCT scale, of the same field of view); clicks and outputs stay in
        the true size's pixels. None: ``image`` is full size.
        """
        image = validate_image(image)
        h, w = image.shape[:2] if size is None else (int(size[0]), int(size[1]))
        if h < image.shape[0] or w < image.shape[1]:
            raise ValueError(f"size {w}x{h} is smaller than the image itself ({image.shape[1]}x{image.shape[0]}); "
                             "size is the true size of a reduced copy")
        # Shrunk while still uint8 (on the CPU, where uint8 antialiasing is implemented), so a
        # 50-megapixel image never gets a float copy (600 MB); within 1/255 of shrinking in float.
        pixels = torch.from_numpy(np.ascontiguousarray(image))
        tensor = resize(pixels.permute(2, 0, 1)[None], working_shape(h, w, self.max_working_side))
        tensor = tensor.to(self.device).float().div_(255.0)
        state = ImageState(height=h, width=w, working=tensor)
        full_view = resize(tensor, network_shape(*state.working_size, self.input_size, self.size_multiple))
        state.full_view_prepared = self.net.prepare_image(full_view)
        if self.flip:
            state.full_view_flipped = self.net.prepare_image(flip(full_view))
        return state

    # --- exemplar recall ----------------------------------------------------------------------

    @property
    def has_recall(self) -> bool:
        """True when the network carries an exemplar recall branch (``model.nets.recall``)."""
        return getattr(self.net, "recall", None) is not None

    @torch.inference_mode()
    def encode_recall(self, state: ImageState) -> RecallFeatures:
        """Click-independent recall features of the image, computed once per image."""
        if not self.has_recall:
            raise ValueError(f"model {self.model_version} has no exemplar recall branch")
        if state.recall_features is None:
            size = network_shape(*state.working_size, int(self.net.arch_config["recall_input_size"]),
                                  self.net.recall.size_multiple)
            state.recall_features = self.net.recall.encode(resize(state.working, size))
        return state.recall_features

    def recall(self, state: ImageState, exemplar_mask: np.ndarray, clicks: Sequence[Click],
               object_prob: np.ndarray) -> np.ndarray:
        """Probability (h, w) at working size that a pixel belongs to an object like the exemplar.

        exemplar_mask bool (H, W): union of the accepted objects of the label; clicks and
        object_prob (H, W): the current object's clicks and probability map (full-size pixels).
        """
        logits = self.recall_logits(state, exemplar_mask, clicks, object_prob)
        return torch.sigmoid(resize(logits, state.working_size))[0, 0].cpu().numpy()

    def recall_logits(self, state: ImageState, exemplar_mask: np.ndarray, clicks: Sequence[Click],
                      object_prob: np.ndarray) -> torch.Tensor:
        """``recall``'s logits (1, 1, h', w') float32 on the recall branch's output grid."""
        self._check_recall_inputs(state, exemplar_mask, clicks, object_prob)
        return self._recall_logits(state, shrink_map(exemplar_mask, state.working_size), clicks, object_prob)

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
        exemplar = resize(torch.from_numpy(exemplar_working).to(self.device)[None, None], (input_h, input_w))
        obj = self.object_prob_at(state, object_prob, (input_h, input_w))
        scaled = map_clicks(clicks, (state.height, state.width), (input_h, input_w))
        maps = encode_click_maps(scaled, input_h, input_w, radius=RECALL_CLICK_RADIUS, device=self.device)[:, 1:]
        return self.net.recall(features, exemplar, obj, maps, torch.zeros_like(obj)).float()

    @torch.inference_mode()
    def object_prob_at(self, state: ImageState, object_prob: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
        """``object_prob`` (H, W) as float32 (1, 1, *size) on the device; from the working-size map
        when it is the last output (no full-size resize)."""
        if object_prob is state.last_output and state.last_output_working is not None:
            return resize(state.last_output_working, size).float()
        return torch.from_numpy(shrink_map(object_prob, size)).to(self.device)[None, None]

    # --- prediction ------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(
        self,
        image: Union[np.ndarray, ImageState],
        clicks: Sequence[Click],
        prev_mask: Optional[np.ndarray] = None,
        clicked_components_only: Optional[bool] = None,
    ) -> np.ndarray:
        """Probability map (H, W) float32 for ``clicks`` (full-image pixels) on ``image``.

        ``image`` is an ``ImageState`` from ``encode_image`` or a uint8 array (re-encoded
        unless it is the array of the previous call). ``prev_mask`` is the previous
        probability map (H, W) of this object, or None. ``clicked_components_only`` overrides
        the predictor's setting for this call (False for a box's clicks: the box, not its
        centre click, says where the object is).
        """
        state = self._state_for(image)
        clicks = list(clicks)
        validate_clicks(clicks, state.height, state.width)
        prev_working = self._prev_mask_working(state, prev_mask)

        zoom = None
        if self.zoom_in and len(clicks) > 1:
            zoom = ZoomIn.around(state.working_size, state.working_scale, clicks, prev_working, self.zoom_expansion,
                                 self.zoom_min_crop)
        use_cfr = self.cfr_clicks is None or len(clicks) <= self.cfr_clicks
        prob_view = self._predict_view(state, zoom, clicks, prev_working, self.cfr_steps if use_cfr else 0)
        if zoom is None:
            prob_working = resize(prob_view, state.working_size)
        else:
            prob_working = zoom.paste(resize(prob_view, zoom.shape))
        if clicked_components_only is None:
            clicked_components_only = self.clicked_components_only
        if clicked_components_only:
            prob_working = keep_clicked_components(prob_working, [map_click(c, state.working_scale) for c in clicks])
        full = resize(prob_working, (state.height, state.width))[0, 0].clamp_(0, 1).float().cpu().numpy()
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
        return resize(t, state.working_size).clamp_(0, 1)

    def _predict_view(self, state: ImageState, zoom: Optional[ZoomIn], clicks: Sequence[Click],
                      prev_working: Optional[torch.Tensor], cfr_steps: int) -> torch.Tensor:
        """CFR loop on one view (full image or zoom box). Returns prob (1, 1, ih, iw) at input size."""
        wh, ww = state.working_size
        if zoom is None:
            (view_h, view_w), offset = (wh, ww), (0, 0)
            prepared, prepared_flipped = state.full_view_prepared, state.full_view_flipped
        else:
            (view_h, view_w), offset = zoom.shape, zoom.offset
        ih, iw = network_shape(view_h, view_w, self.input_size, self.size_multiple)
        if zoom is not None:
            crop = resize(zoom.crop(state.working), (ih, iw))
            prepared = self.net.prepare_image(crop)
            prepared_flipped = self.net.prepare_image(flip(crop)) if self.flip else None
        if self.flip and prepared_flipped is None:  # flip switched on after encode_image
            prepared_flipped = self.net.prepare_image(flip(resize(state.working, (ih, iw))))
            state.full_view_flipped = prepared_flipped

        # full image pixel -> working pixel -> input pixel (pixel centres preserved)
        rescale = (ih / view_h, iw / view_w)
        view_clicks = [map_click(c, state.working_scale, offset, rescale) for c in clicks]
        mask = None
        if prev_working is not None:
            mask = resize(prev_working if zoom is None else zoom.crop(prev_working), (ih, iw))

        prob = self._forward(prepared, prepared_flipped, view_clicks, mask, ih, iw)
        self.last_cfr_passes = 1
        for _ in range(cfr_steps):
            new_prob = self._forward(prepared, prepared_flipped, view_clicks, prob, ih, iw)
            self.last_cfr_passes += 1
            flipped = ((new_prob > MASK_THRESHOLD) != (prob > MASK_THRESHOLD)).sum().item()
            prob = new_prob
            if flipped <= self.cfr_min_change:
                break
        self.last_click_refined = self._refining and clicks_disagree(prob, view_clicks)
        if self.last_click_refined:  # the last pass's head again, on decoder features refined for the clicks
            features, maps = self._last_pass
            prob = refine_for_clicks(self.net, features, maps, view_clicks, self.click_refinement_iterations)
        return prob

    def _forward(self, prepared, prepared_flipped, clicks: Sequence[Click], mask: Optional[torch.Tensor],
                 ih: int, iw: int) -> torch.Tensor:
        maps = encode_click_maps(clicks, ih, iw, mask, radius=self.click_radius, device=self.device)
        prob = self._prob(prepared, maps, ih, iw)
        if prepared_flipped is not None:
            prob = 0.5 * (prob + flip(self._prob(prepared_flipped, flip(maps), ih, iw)))
        return prob

    @property
    def _refining(self) -> bool:
        """Click refinement is on (it runs on the unflipped pass only, so flip switched on later stops it)."""
        return bool(self.click_refinement_iterations) and not self.flip

    def _prob(self, prepared, maps: torch.Tensor, ih: int, iw: int) -> torch.Tensor:
        if self._refining:  # keep what click refinement starts from
            self._last_pass = (self.net.decoder_features(prepared, maps), maps)
            logits = self.net.head_logits(*self._last_pass)
        else:
            logits = self.net.forward_prepared(prepared, maps)
        return torch.sigmoid(resize(logits.float(), (ih, iw)))
