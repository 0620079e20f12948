"""Dataset loaders: instance maps (8/16-bit, WebP images), held-out splits, SOD masks, bad files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model.data import is_heldout, parse_dataset_spec


def _write_instances(root, stem, labels, suffix=".webp"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "instances").mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 255, labels.shape + (3,), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "images" / f"{stem}{suffix}")
    Image.fromarray(labels).save(root / "instances" / f"{stem}.png")


def test_heldout_split_is_a_fixed_fifth_of_the_names():
    names = [f"img{i:05d}" for i in range(5000)]
    held = [n for n in names if is_heldout(n)]
    assert 0.18 < len(held) / len(names) < 0.22
    assert held == [n for n in names if is_heldout(n)]  # no state, no randomness


def test_instance_maps_16_bit_webp_size_floor_and_splits(tmp_path):
    labels = np.zeros((60, 80), np.uint16)
    labels[0:30, 0:40] = 1
    labels[40:60, 40:80] = 700  # a 16-bit id
    labels[0, 79] = 3  # one pixel: below the 1 % floor
    stems = [f"im{i}" for i in range(20)]
    for stem in stems:
        _write_instances(tmp_path, stem, labels)
    every = parse_dataset_spec(f"instances:{tmp_path}")
    assert {r.label for r in every.refs} == {1, 700}
    assert len(every.refs) == 2 * len(stems)
    train = parse_dataset_spec(f"instances:{tmp_path}:train")
    heldout = parse_dataset_spec(f"instances:{tmp_path}:heldout")
    assert {r.image_id for r in heldout.refs} == {s for s in stems if is_heldout(s)}
    assert not {r.image_id for r in train.refs} & {r.image_id for r in heldout.refs}
    assert len(train.refs) + len(heldout.refs) == len(every.refs)
    sample = every.refs[1].load()
    assert sample.image.shape == (60, 80, 3) and sample.mask.sum() == 20 * 40


def test_instance_sets_report_bad_files_by_name(tmp_path):
    good = np.zeros((40, 40), np.uint8)
    good[5:30, 5:30] = 1
    _write_instances(tmp_path, "good", good)
    _write_instances(tmp_path, "mismatch", np.ones((20, 20), np.uint8))
    (tmp_path / "instances" / "mismatch.png").unlink()
    Image.fromarray(np.ones((10, 10), np.uint8)).save(tmp_path / "instances" / "mismatch.png")
    _write_instances(tmp_path, "broken", good)
    (tmp_path / "images" / "broken.webp").write_bytes(b"RIFF\x00\x00not an image")
    _write_instances(tmp_path, "orphan", good)
    (tmp_path / "instances" / "orphan.png").unlink()
    _write_instances(tmp_path, "empty", np.zeros((40, 40), np.uint8))
    objects = parse_dataset_spec(f"instances:{tmp_path}")
    assert [r.image_id for r in objects.refs] == ["good"]
    reasons = {path.rsplit("/", 1)[1]: reason for path, reason in objects.skipped}
    assert "is 10x10, image is 20x20" in reasons["mismatch.png"]
    assert reasons["broken.webp"].startswith("unreadable image")
    assert reasons["orphan.webp"] == "no instance map"
    assert reasons["empty.png"] == "no instance above the size floor"


def test_sod_masks_pair_with_bsds500_images_of_one_split(tmp_path):
    for split, stem in (("val", "101"), ("train", "202")):
        (tmp_path / "bsds500" / split / "images").mkdir(parents=True)
        Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(tmp_path / "bsds500" / split / "images" / f"{stem}.jpg")
    (tmp_path / "bsds500-sod" / "masks").mkdir(parents=True)
    mask = np.zeros((30, 20), np.uint8)
    mask[10:20, 5:15] = 255
    for stem in ("101", "202"):
        Image.fromarray(mask).save(tmp_path / "bsds500-sod" / "masks" / f"{stem}.png")
    val = parse_dataset_spec(f"sod:{tmp_path / 'bsds500-sod'}")
    assert [r.image_id for r in val.refs] == ["101"]
    assert val.refs[0].load().mask.sum() == 100
    assert [r.image_id for r in parse_dataset_spec(f"sod:{tmp_path / 'bsds500-sod'}:train").refs] == ["202"]


def test_bad_specs_are_named():
    with pytest.raises(ValueError, match="split must be one of"):
        parse_dataset_spec("instances:/nonexistent-but-checked-later:nope")
    with pytest.raises(ValueError, match="unknown dataset kind 'coco'"):
        parse_dataset_spec("coco:/x")
    with pytest.raises(ValueError, match="takes no options"):
        parse_dataset_spec("wgisd:/x:val")


@pytest.mark.shared
def test_shared_sets_and_their_heldout_splits(shared_dir):
    data = shared_dir / "data"
    sod = parse_dataset_spec(f"sod:{data / 'bsds500-sod'}:val")
    assert len(sod.refs) == 89 and not sod.skipped
    for name in ("coco-mini", "pennfudan"):
        held = parse_dataset_spec(f"instances:{data / name}:heldout")
        train = parse_dataset_spec(f"instances:{data / name}:train")
        images = {r.image_id for r in held.refs} | {r.image_id for r in train.refs}
        assert 0.12 < len({r.image_id for r in held.refs}) / len(images) < 0.28
        assert not {r.image_id for r in held.refs} & {r.image_id for r in train.refs}
