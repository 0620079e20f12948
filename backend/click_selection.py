"""Which of the resent clicks belong to the object being segmented now.

Label Studio's editor sends, on every click, *all* smart prompts of the label on the
image in creation order, including those of objects the annotator already finished
(label-studio-ml-backend issue #588). The rule (also in the README):

1. The clicks of one object are contiguous in creation order and an object starts with
   a positive click or a box. The newest prompt always belongs to the current object.
2. **Saved masks close objects.** A positive click or box (other than the newest
   prompt) lying inside a brush region with the same label in the task's annotations or
   drafts belongs to a finished object, and so does everything before it. The current
   object starts at the first positive click or box after the last such prompt (the
   negative clicks right after it refined that finished object). The region that this
   server returned for the object it is still refining does not count, so an
   auto-accepted intermediate mask does not end its own object.
3. **Remembered decisions.** Per task, the server remembers the prompt sequence it has
   seen and where each object started. A request that extends that sequence is applied
   click by click on top of the remembered current object (mask feedback: the previous
   probability map is fed back). If earlier prompts changed (moved or deleted), the
   decisions are replayed from the last unchanged object start.
4. **Each new prompt**, in order:
   - a box starts a new object;
   - a negative click refines the current object;
   - a positive click inside the current mask (or while that mask is empty) refines it;
   - a positive click outside the current mask is segmented on its own first; if that
     mask overlaps the current mask by at least half of the smaller of the two, the
     click hit the same object and refines it, otherwise it starts a new object (its
     own mask is the answer, so no prediction is wasted).
5. A box prompt becomes clicks: a positive click at the box centre and negative clicks
   just outside its four corners; the object's mask is cropped to the box (grown to
   include the object's later positive clicks).

The decisions depend only on the prompts, the saved regions and the model, so a server
that lost its memory (restart, LRU eviction) replays them and reaches the same objects.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from model.clicks import Click
from model.predictor import MASK_THRESHOLD

from .payload import BrushRegion, Prompt
from .proposals import BoxMask, ObjectProposals
from .rle import rle_to_mask

log = logging.getLogger(__name__)

GroupKey = Tuple[str, Optional[str]]  # (Image tag name, label)
PredictFn = Callable[[List[Click], Optional[np.ndarray]], np.ndarray]  # (clicks, prev prob) -> prob (H, W)
PixelBox = Tuple[int, int, int, int]  # half-open (y0, y1, x0, x1)

SAME_OBJECT_OVERLAP = 0.5  # share of the smaller mask that must overlap to count as the same object
BOX_NEGATIVE_MARGIN = 0.05  # negative clicks sit this fraction of the box's long side outside its corners


@dataclass
class TrackedObject:
    """The object being segmented: its clicks (full-image pixels) and latest probability map."""

    start: int  # index of its first prompt in the group's prompt sequence
    result_id: str
    clicks: List[Click]
    prob: np.ndarray  # float32 (H, W)
    crop: Optional[PixelBox] = None  # box prompts: the mask is zero outside this box
    _mask: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)
    _mask_of: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)

    @property
    def mask(self) -> np.ndarray:
        """Bool (H, W) ``prob >= MASK_THRESHOLD``, computed once per probability map (read only)."""
        if self._mask_of is not self.prob:
            self._mask, self._mask_of = self.prob >= MASK_THRESHOLD, self.prob
            self._mask.flags.writeable = False
        return self._mask


@dataclass
class ClickHistory:
    """What one task remembers about one prompt group (image + label)."""

    keys: List[Tuple] = field(default_factory=list)  # prompt keys applied so far, in order
    starts: List[int] = field(default_factory=list)  # indices into ``keys`` where objects started
    current: Optional[TrackedObject] = None
    region_masks: Dict["RegionKey", Optional[BoxMask]] = field(default_factory=dict)  # see RegionMasks
    proposals: Optional[ObjectProposals] = None  # the current object's recall proposals (backend.proposals)


# --- geometry ------------------------------------------------------------------------------


def box_corners(prompt: Prompt, height: int, width: int) -> np.ndarray:
    """The four corners ``(x, y)`` of a rectangle prompt in continuous pixel coordinates.

    Label Studio rotates a rectangle by ``rotation`` degrees (clockwise on screen) around
    its top-left corner.
    """
    x0, y0 = prompt.x / 100 * width, prompt.y / 100 * height
    w, h = prompt.width / 100 * width, prompt.height / 100 * height
    theta = math.radians(prompt.rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    local = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=np.float64)
    return np.stack([x0 + local[:, 0] * cos - local[:, 1] * sin, y0 + local[:, 0] * sin + local[:, 1] * cos], axis=1)


def anchor_point(prompt: Prompt, height: int, width: int) -> Tuple[float, float]:
    """``(x, y)`` continuous pixel coordinates of a click, or of a box's centre."""
    if prompt.kind == "keypoint":
        return prompt.x / 100 * width, prompt.y / 100 * height
    cx, cy = box_corners(prompt, height, width).mean(axis=0)
    return float(cx), float(cy)


def to_click(x: float, y: float, height: int, width: int, is_positive: bool) -> Click:
    """Click at continuous coordinates (pixel i spans [i, i+1)) in the predictor's pixel-centre convention."""
    return Click(float(np.clip(y - 0.5, 0, height - 1)), float(np.clip(x - 0.5, 0, width - 1)), is_positive)


def box_prompt_clicks(prompt: Prompt, height: int, width: int) -> Tuple[List[Click], PixelBox]:
    """A box's clicks (positive centre, negatives outside the corners) and its pixel crop."""
    corners = box_corners(prompt, height, width)
    (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    margin = max(2.0, BOX_NEGATIVE_MARGIN * max(right - left, bottom - top))
    clicks = [to_click(cx, cy, height, width, True)]
    for x in (left - margin, right + margin):
        for y in (top - margin, bottom + margin):
            clicks.append(to_click(x, y, height, width, False))
    crop = (
        int(np.clip(math.floor(top), 0, height - 1)),
        int(np.clip(math.ceil(bottom), 1, height)),
        int(np.clip(math.floor(left), 0, width - 1)),
        int(np.clip(math.ceil(right), 1, width)),
    )
    return clicks, crop


def grow_crop(crop: PixelBox, click: Click) -> PixelBox:
    y, x = int(round(click.y)), int(round(click.x))
    return min(crop[0], y), max(crop[1], y + 1), min(crop[2], x), max(crop[3], x + 1)


def apply_crop(prob: np.ndarray, crop: Optional[PixelBox]) -> np.ndarray:
    if crop is None:
        return prob
    y0, y1, x0, x1 = crop
    cropped = np.zeros_like(prob)
    cropped[y0:y1, x0:x1] = prob[y0:y1, x0:x1]
    return cropped


def same_object(candidate: np.ndarray, current: np.ndarray) -> bool:
    """Whether two binary masks overlap by at least ``SAME_OBJECT_OVERLAP`` of the smaller one."""
    smaller = min(int(candidate.sum()), int(current.sum()))
    if smaller == 0:
        return False
    return int(np.logical_and(candidate, current).sum()) >= SAME_OBJECT_OVERLAP * smaller


# --- rule 2: saved masks close objects --------------------------------------------------------


RegionKey = Tuple[str, int, int, int]  # (region id, width, height, hash of the RLE)


class RegionMasks:
    """Saved brush regions, decoded on first use into ``BoxMask``s kept in ``cache``.

    ``cache`` (a ``ClickHistory.region_masks``) keeps decoded regions across requests, so a
    click does not decode every saved mask again; entries for regions that are no longer
    in the task are dropped by ``prune``. A corrupt RLE is logged and ignored.
    """

    def __init__(self, regions: Sequence[BrushRegion], cache: Optional[Dict[RegionKey, Optional[BoxMask]]] = None):
        self.regions = list(regions)
        self.cache = {} if cache is None else cache
        self._keys = [(r.region_id, r.width, r.height, hash(r.rle)) for r in self.regions]

    def mask(self, index: int) -> Optional[BoxMask]:
        """The decoded mask of region ``index``, or None when its RLE is corrupt."""
        key = self._keys[index]
        if key not in self.cache:
            region = self.regions[index]
            try:
                self.cache[key] = BoxMask.of(rle_to_mask(list(region.rle), region.height, region.width))
            except ValueError as exc:
                log.warning("ignoring a saved brush region with a corrupt RLE",
                            extra={"region_id": region.region_id, "reason": str(exc)})
                self.cache[key] = None
        return self.cache[key]

    def contains(self, prompt: Prompt, excluded_ids: Set[str]) -> bool:
        for i, region in enumerate(self.regions):
            if region.region_id in excluded_ids:
                continue
            mask = self.mask(i)
            if mask is None:
                continue
            x, y = anchor_point(prompt, region.height, region.width)
            if mask.contains(min(int(y), region.height - 1), min(int(x), region.width - 1)):
                return True
        return False

    def prune(self) -> None:
        """Forget decoded regions that this request's task no longer has."""
        for key in set(self.cache) - set(self._keys):
            del self.cache[key]


def first_active_index(prompts: Sequence[Prompt], regions: RegionMasks, excluded_ids: Set[str]) -> int:
    """Index of the first prompt not known to belong to a finished object (rule 2)."""
    if not regions.regions:
        return 0
    finished = [i for i, p in enumerate(prompts[:-1]) if p.starts_object and regions.contains(p, excluded_ids)]
    for last in reversed(finished):
        after = next((j for j in range(last + 1, len(prompts)) if prompts[j].starts_object), None)
        if after is not None:
            return after
    return 0


# --- rules 3 and 4 ---------------------------------------------------------------------------


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ObjectTracker:
    """Applies the rule to one request: ``segment(history, prompts, regions)`` -> current object.

    ``predict(clicks, prev_prob)`` runs the model on this task's image; ``object_id(prompt)``
    names the object that ``prompt`` starts (stable, so Label Studio replaces a region it
    already holds instead of stacking a new one).
    """

    def __init__(self, height: int, width: int, predict: PredictFn, object_id: Callable[[Prompt], str]):
        self.height, self.width = height, width
        self._predict = predict
        self._object_id = object_id
        self.predictions = 0  # model calls made by this tracker (for logs and tests)

    def segment(self, history: ClickHistory, prompts: Sequence[Prompt], regions: RegionMasks) -> TrackedObject:
        if not prompts:
            raise ValueError("segment needs at least one prompt")
        keys = [p.key for p in prompts]
        current = history.current
        excluded = {current.result_id} if current is not None else set()
        first = first_active_index(prompts, regions, excluded)
        common = _common_prefix(history.keys, keys)

        if current is not None and common == len(history.keys) and current.start >= first:
            begin = common  # the request extends what was applied: continue the current object
        else:
            unchanged_starts = [s for s in history.starts if s < common]
            begin = max([first] + unchanged_starts[-1:])
            current = None
        history.keys = keys[:begin]
        history.starts = [s for s in history.starts if s < begin]

        for index in range(begin, len(prompts)):
            current = self._apply(index, prompts[index], current, history)
            history.keys.append(keys[index])
        history.current = current
        return current

    # one prompt ---------------------------------------------------------------------------

    def _apply(self, index: int, prompt: Prompt, current: Optional[TrackedObject], history: ClickHistory) -> TrackedObject:
        if prompt.kind == "rectangle":
            clicks, crop = box_prompt_clicks(prompt, self.height, self.width)
            return self._start(index, prompt, clicks, crop, history)
        click = to_click(*anchor_point(prompt, self.height, self.width), self.height, self.width, prompt.is_positive)
        if current is None:
            return self._start(index, prompt, [click], None, history)
        if not click.is_positive:
            return self._refine(current, click)
        mask = current.mask
        if not mask.any() or mask[int(round(click.y)), int(round(click.x))]:
            return self._refine(current, click)
        alone = self._run([click], None)
        if same_object(alone >= MASK_THRESHOLD, mask):
            return self._refine(current, click)
        return self._start(index, prompt, [click], None, history, prob=alone)

    def _start(self, index: int, prompt: Prompt, clicks: List[Click], crop: Optional[PixelBox],
               history: ClickHistory, prob: Optional[np.ndarray] = None) -> TrackedObject:
        history.starts.append(index)
        if prob is None:
            prob = self._run(clicks, None)
        return TrackedObject(index, self._object_id(prompt), clicks, apply_crop(prob, crop), crop)

    def _refine(self, current: TrackedObject, click: Click) -> TrackedObject:
        current.clicks = current.clicks + [click]
        if current.crop is not None and click.is_positive:
            current.crop = grow_crop(current.crop, click)
        current.prob = apply_crop(self._run(current.clicks, current.prob), current.crop)
        return current

    def _run(self, clicks: List[Click], prev_prob: Optional[np.ndarray]) -> np.ndarray:
        self.predictions += 1
        return self._predict(clicks, prev_prob)
