"""Exemplar recall proposals in the interactive flow: other objects like the accepted ones.

The first click of a new object, on a task with accepted regions of the clicked label, asks the
model (``model.proposals.propose``) for other objects like them; ``ObjectProposals`` keeps
the answer in the object's ``ClickHistory`` so that refining clicks return the same regions
(same ids), minus what accepted regions or the object itself now cover. Proposals never
cover accepted pixels and never take an accepted region's id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, List, Sequence, Set, Tuple

import numpy as np

from model.boxes import Box, BoxMask

MAX_COVERED_FRACTION = 0.3  # a cached proposal covered more than this (accepted regions, the object) is dropped


def proposal_id(object_id: str, index: int) -> str:
    """Region id of the ``index``-th proposal of an object (stable, so Label Studio replaces it)."""
    return f"{object_id}-r{index}"


@dataclass
class AcceptedRegions:
    """The task's accepted brush regions on one image, as seen by one request."""

    height: int
    width: int
    ids: Set[str] = field(default_factory=set)  # every accepted region's id
    exemplar_ids: Set[str] = field(default_factory=set)  # those carrying the clicked label
    exemplar: np.ndarray = field(init=False)  # bool (H, W): union of the clicked label's regions
    covered: np.ndarray = field(init=False)  # bool (H, W): union of all accepted regions (any label)

    def __post_init__(self):
        self.exemplar = np.zeros((self.height, self.width), dtype=bool)
        self.covered = np.zeros((self.height, self.width), dtype=bool)

    def add(self, region_id: str, mask: BoxMask, is_exemplar: bool) -> None:
        if (mask.height, mask.width) != (self.height, self.width):
            raise ValueError(f"region {region_id} is {mask.width}x{mask.height}, the image {self.width}x{self.height}")
        self.ids.add(region_id)
        crop, where = mask.crop(), mask.slices
        self.covered[where] |= crop
        if is_exemplar:
            self.exemplar_ids.add(region_id)
            self.exemplar[where] |= crop


@dataclass
class ObjectProposals:
    """The proposals computed on an object's first click, kept while the object is refined.

    Each is kept as its box (y0, y1, x0, x1) and the bit-packed mask inside it, so keeping and
    re-checking them costs what the objects cost, not the image.
    """

    result_id: str  # the object's region id (proposal ids derive from it)
    start: int  # the object's first prompt (with result_id, identifies the object)
    exemplar_ids: FrozenSet[str]  # the accepted regions they were computed from
    masks: List[BoxMask]  # best first
    scores: List[float]

    @classmethod
    def of(cls, result_id: str, start: int, exemplar_ids: Set[str], proposals: Sequence) -> "ObjectProposals":
        """From ``model.proposals.Proposal``s."""
        return cls(result_id, start, frozenset(exemplar_ids),
                   [p.region for p in proposals], [float(p.score) for p in proposals])

    def belongs_to(self, result_id: str, start: int) -> bool:
        return (self.result_id, self.start) == (result_id, start)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.masks)

    def visible(self, accepted: AcceptedRegions, object_mask: np.ndarray,
                min_area: int) -> List[Tuple[str, np.ndarray, Box, float]]:
        """``(region id, mask inside the box, box (y0, y1, x0, x1), score)`` of the proposals to return now.

        A proposal whose id was accepted, or that accepted regions and the object's mask now
        cover by more than ``MAX_COVERED_FRACTION``, is dropped; the others lose the covered
        pixels (and are dropped below ``min_area``).
        """
        visible = []
        for index, (mask, score) in enumerate(zip(self.masks, self.scores)):
            region_id = proposal_id(self.result_id, index)
            if region_id in accepted.ids:
                continue
            crop, where = mask.crop(), mask.slices
            area = int(crop.sum())
            hidden = crop & (accepted.covered[where] | object_mask[where])
            if area == 0 or int(hidden.sum()) > MAX_COVERED_FRACTION * area:
                continue
            crop &= ~hidden
            if int(crop.sum()) < min_area:
                continue
            visible.append((region_id, crop, mask.box, score))
        return visible
