import numpy as np

from model.clicks import IGNORE_VALUE
from model.training.augment import (AugmentConfig, blend_images, blend_object, merge, object_crop, occlude,
                                    paste_object_onto, suem_copy_paste)

IMG = np.full((4, 4, 3), 10, np.uint8)
OTHER = np.full((4, 4, 3), 200, np.uint8)
GT = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8)
OTHER_MASK = np.array([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], np.uint8)


def test_paste_onto_other_image_keeps_the_object_and_changes_the_background():
    image, gt = paste_object_onto(OTHER, IMG, GT)
    assert np.array_equal(gt, GT)
    assert (image[GT == 1] == 10).all() and (image[GT == 0] == 200).all()


def test_occlusion_subtracts_the_pasted_object():
    image, gt = occlude(IMG, GT, OTHER, OTHER_MASK)
    assert np.array_equal(gt, np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]))
    assert (image[OTHER_MASK == 1] == 200).all() and (image[OTHER_MASK == 0] == 10).all()


def test_occlusion_keeps_ignore_pixels_ignored():
    gt = GT.copy()
    gt[1, 2] = IGNORE_VALUE
    _, out = occlude(IMG, gt, OTHER, OTHER_MASK)
    assert out[1, 2] == IGNORE_VALUE and out[2, 2] == 0


def test_merge_is_the_union():
    image, gt = merge(IMG, GT, OTHER, OTHER_MASK)
    assert np.array_equal(gt, np.array([[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]))
    assert (image[OTHER_MASK == 1] == 200).all()


def test_blend_object_keeps_ground_truth_and_mixes_pixels():
    image, gt = blend_object(IMG, GT, OTHER, OTHER_MASK, alpha=0.5)
    assert np.array_equal(gt, GT)
    assert (image[OTHER_MASK == 1] == 105).all() and (image[OTHER_MASK == 0] == 10).all()


def test_blend_images_mixes_everything_and_keeps_ground_truth():
    image, gt = blend_images(IMG, GT, OTHER, alpha=0.25)
    assert np.array_equal(gt, GT) and (image == 58).all()


def test_suem_modes_are_drawn_with_their_probabilities():
    cfg = AugmentConfig(paste_onto_other=0.0, occlude=0.0, merge=1.0, blend_object=0.0, blend_images=0.0)
    _, gt, mode = suem_copy_paste(IMG, GT, OTHER, OTHER_MASK, cfg, np.random.default_rng(0))
    assert mode == "merge" and gt.sum() == 6
    none = AugmentConfig(paste_onto_other=0, occlude=0, merge=0, blend_object=0, blend_images=0)
    _, gt, mode = suem_copy_paste(IMG, GT, OTHER, OTHER_MASK, none, np.random.default_rng(0))
    assert mode is None and np.array_equal(gt, GT)


def test_object_crop_has_the_requested_size_and_keeps_the_object():
    rng = np.random.default_rng(1)
    image = np.zeros((100, 150, 3), np.uint8)
    mask = np.zeros((100, 150), np.uint8)
    mask[40:60, 70:90] = 1
    for _ in range(5):
        img, gt = object_crop(image, mask, 64, rng)
        assert img.shape == (64, 64, 3) and gt.shape == (64, 64)
        assert (gt == 1).any()
        assert set(np.unique(gt)) <= {0, 1, IGNORE_VALUE}
