import numpy as np
import pytest
import torch

from model.clicks import IGNORE_VALUE, Click, encode_click_maps, validate_clicks
from model.evaluation.protocol import Clicker, iou


def test_disks_have_radius_five_and_go_to_their_channel():
    maps = encode_click_maps([Click(10, 10, True), Click(30, 20, False)], 40, 40)
    assert maps.shape == (1, 3, 40, 40)
    assert maps[0, 0].sum() == 0
    pos = maps[0, 1].numpy()
    assert pos[10, 15] == 1 and pos[10, 16] == 0 and pos[15, 10] == 1 and pos[14, 14] == 0
    # area of a radius-5 integer disk
    assert pos.sum() == 81
    assert maps[0, 2].numpy()[30, 20] == 1 and maps[0, 2].numpy()[10, 10] == 0


def test_previous_mask_is_channel_zero():
    prev = torch.full((8, 8), 0.25)
    maps = encode_click_maps([Click(1, 1)], 8, 8, prev)
    assert torch.all(maps[0, 0] == 0.25)


def test_clicker_first_click_is_farthest_from_boundary_and_border_counts():
    gt = np.zeros((9, 12), np.uint8)
    gt[:, :7] = 1  # touches the top, bottom and left borders
    clicker = Clicker(gt)
    c = clicker.make_next_click()
    # With the border as boundary, column 3 is 4 px from both sides; rows 3..5 tie at distance 4
    # and ties go to the first pixel in row-major order (RITM's np.argwhere(...)[0]).
    assert (c.y, c.x, c.is_positive) == (3, 3, True)
    # Without the border counting, the click would sit at column 0 or row 0 / 8.
    gt2 = np.zeros((11, 11), np.uint8)
    gt2[1:10, 1:10] = 1
    assert (Clicker(gt2).make_next_click().y, Clicker(gt2).make_next_click().x) == (5, 5)


def test_clicker_picks_the_larger_error_region_with_the_right_sign():
    gt = np.zeros((20, 20), np.uint8)
    gt[2:12, 2:12] = 1
    pred = np.zeros((20, 20), bool)
    pred[2:12, 2:6] = True  # misses a 10x6 part of the object
    pred[15:17, 15:17] = True  # small false positive
    c = Clicker(gt).make_next_click(pred)
    assert c.is_positive and 6 <= c.x <= 11
    pred = gt.astype(bool).copy()
    pred[13:20, 0:20] = True  # large false positive band
    c = Clicker(gt).make_next_click(pred)
    assert not c.is_positive and c.y >= 13


def test_ignore_band_is_never_clicked_and_not_counted():
    gt = np.zeros((10, 10), np.uint8)
    gt[2:8, 2:8] = 1
    gt[0:10, 8:10] = IGNORE_VALUE
    pred = np.zeros((10, 10), bool)
    pred[2:8, 2:8] = True
    pred[:, 8:] = True  # predicted inside the ignore band only
    assert iou(pred, gt) == 1.0
    c = Clicker(gt).make_next_click(np.zeros((10, 10), bool))
    assert gt[int(c.y), int(c.x)] == 1


def test_clicker_rejects_empty_objects():
    with pytest.raises(ValueError, match="empty"):
        Clicker(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("clicks, message", [([], "empty"), ([Click(5, 10)], "outside"), ([Click(-1, 0)], "outside")])
def test_click_validation(clicks, message):
    with pytest.raises(ValueError, match=message):
        validate_clicks(clicks, height=5, width=8)
