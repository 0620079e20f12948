"""Which of the prompts Label Studio sends belong to the object being segmented now.

What Label Studio 1.23.2's editor sends (measured in a real browser, ``tests/e2e/test_browser_objects.py``,
and read in its source, ``Annotation.acceptAllSuggestions``): on every click, the smart prompts of
the clicked label on the image (the "dynamic" keypoints and rectangles), in creation order. ✓
(accept) and ✗ (reject) delete all of them; with Auto-Accept on, every answer is accepted at once,
so they are deleted after every answer and each request holds the newest prompt only. The
accepted region reaches the task's draft a few seconds later (the editor saves drafts at most
every 5 s). The rule (also in the README):

1. **The clicks of an object refine it until it is finished.** A request whose prompts extend
   the ones this server applied adds each new click to the current object, wherever it lies
   (mask feedback: the previous probability map is fed back). No mask is guessed from.
2. **What finishes an object** (real signals only):
   - a box: it starts a new object;
   - a label switch: each (image, label) has its own objects;
   - the editor deleted the earlier prompts (✓ or ✗): the next prompt starts a new object;
   - a positive click or box lying inside a saved brush region with the same label (task
     annotations or drafts) belongs to a finished object, and so does every prompt before it;
     the current object starts at the first positive click or box after the last such prompt.
     The region this server returned for the object it is refining does not count.
3. **Auto-Accept on** is the one case without a signal: the editor deletes the prompts after
   every answer, so a lone prompt after a lone prompt may refine the object or start the next.
   A negative click refines it; a positive click inside the current mask refines it; a
   positive click outside it refines it when its own one-click mask (every part, clicked or
   not) overlaps the current mask (half of the smaller) or touches it, and starts a new object
   otherwise (one more model call: the new object's mask keeps its clicked parts only). Once a request of
   the task held two prompts or more, the editor is known to keep them (Auto-Accept off) and
   this case never applies.
4. **Remembered decisions.** Per task, the server remembers the prompts it has applied and
   where each object started; if earlier prompts moved or were deleted, decisions are replayed
   from the last unchanged object start. A replay makes at most ``MAX_REPLAYED_PROMPTS`` + 1
   model calls: earlier prompts are applied without their own call, and the first call made
   takes all the clicks of its object so far.
5. A box prompt becomes clicks: a positive click at the box centre and negative clicks just
   outside its four corners; the object's mask is cropped to the box (grown to include the
   object's later positive clicks).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Set, Tuple

import numpy as np
from scipy import ndimage

from model.boxes import Box, BoxMask
from model.clicks import MASK_THRESHOLD, Click
from model.transforms import continuous_to_click

from .exemplars import Exemplar
from .payload import Prompt
from .proposals import ObjectProposals
from .rle import rle_to_mask

log = logging.getLogger(__name__)

GroupKey = Tuple[str, Optional[str]]  # (Image tag name, label)

MAX_REPLAYED_PROMPTS = 8  # model calls per request at most (plus one), however many prompts must be replayed
SAME_OBJECT_OVERLAP = 0.5  # share of the smaller mask that must overlap to count as the same object
BOX_NEGATIVE_MARGIN = 0.05  # negative clicks sit this fraction of the box's long side outside its corners


@dataclass
class TrackedObject:
    """The object being segmented: its clicks (full-image pixels) and latest probability map."""

    start: int  # index of its first prompt in the group's prompt sequence
    result_id: str
    clicks: List[Click]
    prob: Optional[np.ndarray]  # float32 (H, W); None only while a capped replay defers its model call
    crop: Optional[Box] = None  # box prompts: the mask is zero outside this box
    _mask: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)
    _mask_of: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)

    @property
    def mask(self) -> np.ndarray:
        """Bool (H, W) ``prob > MASK_THRESHOLD`` (as the evaluation binarises), computed once per probability map (read only)."""
        if self._mask_of is not self.prob:
            self._mask, self._mask_of = self.prob > MASK_THRESHOLD, self.prob
            self._mask.flags.writeable = False
        return self._mask


@dataclass
class ClickHistory:
    """What one task remembers about one prompt group (image + label)."""

    keys: List[Tuple] = field(default_factory=list)  # prompt keys applied so far, in order
    starts: List[int] = field(default_factory=list)  # indices into ``keys`` where objects started
    current: Optional[TrackedObject] = None
    keeps_prompts: bool = False  # a request held several prompts: the editor keeps them (Auto-Accept off)
    finished: bool = False  # the current object was finished by a signal outside the prompts (a label switch)
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


def box_prompt_clicks(prompt: Prompt, height: int, width: int) -> Tuple[List[Click], Box]:
    """A box's clicks (positive centre, negatives outside the corners) and its pixel crop."""
    corners = box_corners(prompt, height, width)
    (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    margin = max(2.0, BOX_NEGATIVE_MARGIN * max(right - left, bottom - top))
    clicks = [continuous_to_click(cx, cy, height, width, True)]
    for x in (left - margin, right + margin):
        for y in (top - margin, bottom + margin):
            clicks.append(continuous_to_click(x, y, height, width, False))
    crop = (
        int(np.clip(math.floor(top), 0, height - 1)),
        int(np.clip(math.ceil(bottom), 1, height)),
        int(np.clip(math.floor(left), 0, width - 1)),
        int(np.clip(math.ceil(right), 1, width)),
    )
    return clicks, crop


def grow_crop(crop: Box, click: Click) -> Box:
    y, x = int(round(click.y)), int(round(click.x))
    return min(crop[0], y), max(crop[1], y + 1), min(crop[2], x), max(crop[3], x + 1)


def apply_crop(prob: np.ndarray, crop: Optional[Box]) -> np.ndarray:
    if crop is None:
        return prob
    y0, y1, x0, x1 = crop
    cropped = np.zeros_like(prob)
    cropped[y0:y1, x0:x1] = prob[y0:y1, x0:x1]
    return cropped


def same_object(candidate: np.ndarray, current: np.ndarray) -> bool:
    """Whether two binary masks overlap by ``SAME_OBJECT_OVERLAP`` of the smaller one, or touch."""
    smaller = min(int(candidate.sum()), int(current.sum()))
    if smaller == 0:
        return False
    if int(np.logical_and(candidate, current).sum()) >= SAME_OBJECT_OVERLAP * smaller:
        return True
    return touches(candidate, current)


def touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a pixel of ``a`` is ``b`` or 8-adjacent to one (work bounded by ``a``'s box)."""
    rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
    if rows.size == 0:
        return False
    y0, y1 = max(0, rows[0] - 1), min(a.shape[0], rows[-1] + 2)
    x0, x1 = max(0, cols[0] - 1), min(a.shape[1], cols[-1] + 2)
    grown = ndimage.binary_dilation(a[y0:y1, x0:x1], structure=np.ones((3, 3), bool))
    return bool(np.logical_and(grown, b[y0:y1, x0:x1]).any())


# --- rule 2: saved masks close objects --------------------------------------------------------


RegionKey = Tuple[str, int, int, int]  # (region id, width, height, hash of the RLE)


class RegionMasks:
    """Saved brush regions, decoded on first use into ``BoxMask``s kept in ``cache``.

    ``cache`` (a ``ClickHistory.region_masks``) keeps decoded regions across requests, so a
    click does not decode every saved mask again; entries for regions that are no longer
    in the task are dropped by ``prune``. A corrupt RLE is logged and ignored.
    """

    def __init__(self, regions: Sequence[Exemplar], shape: Tuple[int, int],
                 cache: Optional[Dict[RegionKey, Optional[BoxMask]]] = None):
        """``regions`` of another size than the image's ``shape`` (H, W) are left out, never decoded."""
        self.regions = [r for r in regions if (r.height, r.width) == tuple(shape)]
        other_size = [f"{r.region_id} {r.width}x{r.height}" for r in regions if (r.height, r.width) != tuple(shape)]
        if other_size:
            log.warning("ignoring saved brush regions of another size than the image",
                        extra={"image": f"{shape[1]}x{shape[0]}", "regions": other_size[:10]})
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


class ImagePredictor(Protocol):
    """The model on one task's image (``backend.interactive.ImageModel``)."""

    def predict(self, clicks: List[Click], prev_prob: Optional[np.ndarray], all_components: bool = False) -> np.ndarray:
        """Probability map float32 (H, W) of ``clicks`` (full-image pixels), ``prev_prob`` fed back;
        ``all_components`` keeps the mask's parts without a positive click (boxes, and rule 3's test)."""


def object_id(namespace: Tuple[str, int], prompt: Prompt) -> str:
    """Stable 10-hex-digit region id of the object that ``prompt`` starts in task ``namespace`` (project, task)."""
    project, task = namespace
    digest = hashlib.sha1(repr((project, task, prompt.image, prompt.label, prompt.key)).encode()).hexdigest()
    return digest[:10]


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ObjectTracker:
    """Applies the rule to one request: ``segment(history, prompts, regions)`` -> current object.

    ``model.predict(clicks, prev_prob)`` runs the model on this task's image; ``namespace``
    (project, task) makes region ids stable (``object_id``), so Label Studio replaces a region
    it already holds instead of stacking a new one.
    """

    def __init__(self, height: int, width: int, model: ImagePredictor, namespace: Tuple[str, int]):
        self.height, self.width = height, width
        self._model = model
        self._namespace = namespace
        self.predictions = 0  # model calls made by this tracker (for logs and tests)
        self._deferring = False  # while a capped replay applies prompts without model calls

    def segment(self, history: ClickHistory, prompts: Sequence[Prompt], regions: RegionMasks) -> TrackedObject:
        if not prompts:
            raise ValueError("segment needs at least one prompt")
        keys = [p.key for p in prompts]
        if len(prompts) > 1:
            history.keeps_prompts = True
        current = history.current
        excluded = {current.result_id} if current is not None else set()
        first = first_active_index(prompts, regions, excluded)
        common = _common_prefix(history.keys, keys)

        carried = None  # rule 3: the object that a lone prompt may go on refining (Auto-Accept on)
        if current is not None and common == len(history.keys) and current.start >= first:
            begin = common  # the request extends what was applied: continue the current object
            if history.finished and begin < len(prompts):
                current = None  # a label switch finished it: the next prompt starts a new object
        else:
            if current is not None and common == 0 and first == 0 and not history.keeps_prompts:
                carried = current
            unchanged_starts = [s for s in history.starts if s < common]
            begin = max([first] + unchanged_starts[-1:])
            current = None
        history.finished = False
        history.keys = keys[:begin]
        history.starts = [s for s in history.starts if s < begin]

        # Bounded work: prompts before the last MAX_REPLAYED_PROMPTS are applied without model calls
        # (their objects' clicks are kept); the first replayed call then takes all of its object's clicks.
        deferred_until = max(begin, len(prompts) - MAX_REPLAYED_PROMPTS)
        if deferred_until > begin:
            log.info("replay capped", extra={"prompts": len(prompts) - begin, "replayed": MAX_REPLAYED_PROMPTS})
        for index in range(begin, len(prompts)):
            self._deferring = index < deferred_until
            if carried is not None and index == 0:
                current = self._after_lone_prompt(prompts[0], carried, history)
            else:
                current = self._apply(index, prompts[index], current, history)
            history.keys.append(keys[index])
        history.current = current
        return current

    # one prompt ---------------------------------------------------------------------------

    def _apply(self, index: int, prompt: Prompt, current: Optional[TrackedObject], history: ClickHistory) -> TrackedObject:
        """Rules 1 and 2: a box or the first prompt starts an object; every click refines it."""
        if prompt.kind == "rectangle":
            clicks, crop = box_prompt_clicks(prompt, self.height, self.width)
            return self._start(index, prompt, clicks, crop, history)
        click = continuous_to_click(*anchor_point(prompt, self.height, self.width), self.height, self.width, prompt.is_positive)
        if current is None:
            return self._start(index, prompt, [click], None, history)
        return self._refine(current, click)

    def _after_lone_prompt(self, prompt: Prompt, carried: TrackedObject, history: ClickHistory) -> TrackedObject:
        """Rule 3: the first prompt of a request after the editor deleted all earlier ones (Auto-Accept on)."""
        if prompt.kind == "rectangle":
            return self._apply(0, prompt, None, history)
        click = continuous_to_click(*anchor_point(prompt, self.height, self.width), self.height, self.width, prompt.is_positive)
        mask = carried.mask
        if click.is_positive and mask.any() and not mask[int(round(click.y)), int(round(click.x))]:
            # every part the network gives this click alone, so that a missed part of the current
            # object, apart from it but lit up with it, still counts as the same object
            alone = self._run([click], None, all_components=True)
            if not same_object(alone > MASK_THRESHOLD, mask):
                return self._start(0, prompt, [click], None, history)
        carried.start = 0  # its earlier prompts are gone from the context: it now starts before index 0
        history.starts.append(0)
        return self._refine(carried, click)

    def _start(self, index: int, prompt: Prompt, clicks: List[Click], crop: Optional[Box],
               history: ClickHistory) -> TrackedObject:
        history.starts.append(index)
        prob = None if self._deferring else self._object_prob(clicks, None, crop)
        return TrackedObject(index, object_id(self._namespace, prompt), clicks, prob, crop)

    def _refine(self, current: TrackedObject, click: Click) -> TrackedObject:
        current.clicks = current.clicks + [click]
        if current.crop is not None and click.is_positive:
            current.crop = grow_crop(current.crop, click)
        if self._deferring:
            current.prob = None  # computed, from all its clicks, by the first call that is not deferred
        else:
            current.prob = self._object_prob(current.clicks, current.prob, current.crop)
        return current

    def _object_prob(self, clicks: List[Click], prev_prob: Optional[np.ndarray], crop: Optional[Box]) -> np.ndarray:
        """An object's map: a box's object (``crop``) keeps every part inside the box, and nothing outside."""
        return apply_crop(self._run(clicks, prev_prob, all_components=crop is not None), crop)

    def _run(self, clicks: List[Click], prev_prob: Optional[np.ndarray], all_components: bool = False) -> np.ndarray:
        self.predictions += 1
        return self._model.predict(clicks, prev_prob, all_components)
