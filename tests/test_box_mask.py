"""BoxMask (a mask kept as its box) and the end-to-end recall benchmark's row."""
from __future__ import annotations

import numpy as np
import pytest

from backend.proposals import AcceptedRegions, BoxMask


def test_box_mask_keeps_the_bounding_box_and_answers_like_the_whole_mask():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = np.zeros((37, 53), bool)
        y, x = rng.integers(0, 37), rng.integers(0, 53)
        mask[y:y + rng.integers(1, 20), x:x + rng.integers(1, 20)] = True
        mask &= rng.random(mask.shape) < 0.8
        boxed = BoxMask.of(mask)
        whole = np.zeros_like(mask)
        whole[boxed.slices] = boxed.crop()
        assert np.array_equal(whole, mask)
        if mask.any():
            rows, cols = np.nonzero(mask)
            assert boxed.box == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
        assert all(boxed.contains(r, c) == mask[r, c] for r in range(37) for c in range(53))
    empty = BoxMask.of(np.zeros((4, 5), bool))
    assert empty.box == (0, 0, 0, 0) and empty.crop().shape == (0, 0) and not empty.contains(0, 0)


def test_box_mask_rejects_a_box_that_does_not_fit_and_accepted_regions_a_wrong_size():
    with pytest.raises(ValueError, match="does not fit"):
        BoxMask.from_crop(np.ones((2, 2), bool), (0, 2, 3, 5), (4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        BoxMask.from_crop(np.ones((2, 3), bool), (0, 2, 0, 2), (4, 4))
    accepted = AcceptedRegions(4, 4)
    with pytest.raises(ValueError, match="5x4, the image 4x4"):
        accepted.add("r1", BoxMask.of(np.ones((4, 5), bool)), True)
    part = np.zeros((4, 4), bool)
    part[1:3, 2:4] = True
    accepted.add("r1", BoxMask.of(part), False)
    accepted.add("r2", BoxMask.of(part.T), True)
    assert np.array_equal(accepted.covered, part | part.T) and np.array_equal(accepted.exemplar, part.T)
    assert accepted.ids == {"r1", "r2"} and accepted.exemplar_ids == {"r2"}


@pytest.mark.slow
def test_backend_benchmark_times_the_triggering_click_with_and_without_recall():
    from backend.benchmark import benchmark_size, format_table
    from model.evaluation.benchmark import RECALL_SCENE_OBJECTS

    row = benchmark_size((320, 240), repeats=2)  # the shipped model on the synthetic scene
    assert row.size == "320x240" and row.samples == 2
    assert row.proposals == RECALL_SCENE_OBJECTS - 2  # every blob but the accepted and the clicked one
    assert row.click_p50_ms > 0 and row.recall_click_p50_ms > 0
    assert "320x240" in format_table([row])
