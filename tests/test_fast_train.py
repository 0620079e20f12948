"""The accelerator run, dry-run on CPU with a tiny pack and a tiny network."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_checkpoint, save_checkpoint
from model.clicks import Click, encode_click_maps
from model.nets.registry import create_model
from model.training.base import load_config
from model.training.fast_train import (CHECKPOINT_NAME, DeviceClicks, FastConfig, FastTrainer, dilate, erosion_depth,
                                       initial_clicks)
from model.training.fast_train import main as fast_main
from model.training.fast_train import next_clicks
from model.training.pack import build_pack, load_pack
from model.training.train import DatasetConfig, TrainConfig


def _dataset(root, count=6):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "instances").mkdir()
    for i in range(count):
        image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
        labels = np.zeros((90, 120), np.uint8)
        labels[10 + i:50 + i, 20:70] = 1
        labels[60:85, 80:115] = 2
        image[labels == 1] = (220, 40, 40)
        Image.fromarray(image).save(root / "images" / f"im{i}.jpg")
        Image.fromarray(labels).save(root / "instances" / f"im{i}.png")


@pytest.fixture()
def tiny_run(tmp_path):
    _dataset(tmp_path / "data" / "set")
    spec = f"instances:{tmp_path / 'data' / 'set'}"
    datasets = (DatasetConfig(spec, 1.0), DatasetConfig(spec + ":all", 1.0, pack_max_images=3, pack_tile=64))
    pack = tmp_path / "pack.npz"
    counts = build_pack(datasets, pack, side=96, min_area=16)
    net = create_model("effnet-lite", {"input_size": 64, "decoder_channels": 16, "click_channels": 8})
    init = save_checkpoint(net, tmp_path / "init.safetensors")
    return tmp_path, pack, init, counts


def test_pack_round_trip_keeps_images_objects_and_set_weights(tiny_run):
    _, path, _, counts = tiny_run
    assert list(counts.values())[0] == 12 and list(counts.values())[1] > 0
    pack = load_pack(path)
    assert pack.images.shape[1:] == (96, 96, 3) and pack.labels.shape[1:] == (96, 96)
    assert tuple(pack.sizes[0]) == (72, 96)  # 90 x 120 at a long side of 96
    weights = pack.object_weights()
    sets = pack.image_set[pack.object_image]
    assert weights[sets == 0].sum() == pytest.approx(0.5) and weights[sets == 1].sum() == pytest.approx(0.5)
    for image, label in zip(pack.object_image, pack.object_label):
        assert (pack.labels[image] == label).sum() >= 16


def test_pack_over_budget_and_broken_packs_are_refused(tiny_run, tmp_path):
    root, path, _, _ = tiny_run
    with pytest.raises(ValueError, match="over the 0.001 MiB budget"):
        build_pack([DatasetConfig(f"instances:{root / 'data' / 'set'}")], tmp_path / "big.npz", side=96, budget_mib=0.001)
    assert not (tmp_path / "big.npz").exists()
    (tmp_path / "broken.npz").write_bytes(b"not a pack")
    with pytest.raises(ValueError, match="training pack .*broken.npz"):
        load_pack(tmp_path / "broken.npz")


def test_device_distances_and_click_maps_match_the_cpu_definitions():
    region = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    region[0, 0, 2:7, 1:8] = True  # 5 rows x 7 cols: deepest pixel 3 steps from outside
    assert erosion_depth(region).max() == 3
    assert dilate(region, 1).sum() == 7 * 9
    clicks = DeviceClicks(torch.tensor([[[4.0, 4.0], [1.0, 7.0]]]), torch.tensor([[True, False]]), torch.tensor([[True, True]]))
    prev = torch.rand(1, 1, 9, 9)
    expected = encode_click_maps([Click(4, 4, True), Click(1, 7, False)], 9, 9, prev[0, 0])
    assert torch.equal(clicks.maps(prev), expected)


def test_simulated_clicks_land_where_they_should():
    gts = torch.zeros(4, 1, 64, 64)
    gts[:, :, 16:48, 16:48] = 1
    gts[:, :, :, 60:] = 128  # ignore band
    generator = torch.Generator().manual_seed(0)
    clicks = initial_clicks(gts, FastConfig(), generator)
    yx, pos, active = clicks.yx.long(), clicks.positive, clicks.active
    for b in range(4):
        for k in range(yx.shape[1]):
            if active[b, k]:
                value = gts[b, 0, yx[b, k, 0], yx[b, k, 1]]
                assert value == (1 if pos[b, k] else 0)
    pred = gts == 1
    pred[0, 0, 16:32, 16:48] = False  # a false-negative half on sample 0
    pred[1, 0, 0:10, 0:40] = True  # a false-positive strip on sample 1
    more = next_clicks(pred, gts, clicks, generator)
    assert more.yx.shape[1] == clicks.yx.shape[1] + 1
    (y0, x0), (y1, x1) = more.yx[0, -1].long().tolist(), more.yx[1, -1].long().tolist()
    assert more.positive[0, -1] and 16 <= y0 < 32 and 16 <= x0 < 48
    assert not more.positive[1, -1] and y1 < 10 and x1 < 40
    assert not more.active[2, -1]  # no error, no click


def test_a_short_run_trains_writes_its_checkpoint_and_log_and_leaves_init_alone(tiny_run):
    root, pack, init, _ = tiny_run
    before = init.read_bytes()
    out = root / "out"
    assert fast_main(["--pack", str(pack), "--out-dir", str(out), "--set", f"init={init}", "--set", "max_steps=3",
                      "--set", "batch_size=4", "--set", "device=cpu", "--set", "log_every=1",
                      "--set", "checkpoint_seconds=0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 12
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and all(np.isfinite(line["loss"]) for line in lines)
    trained = load_checkpoint(out / CHECKPOINT_NAME)
    original = load_checkpoint(init)
    changed = [k for k, v in trained.state_dict().items() if v.is_floating_point()
               and not torch.allclose(v.float(), original.state_dict()[k].float(), atol=1e-3)]
    assert changed  # the weights moved
    assert init.read_bytes() == before


def test_unknown_keys_and_bad_settings_are_named(tiny_run):
    root, pack, init, _ = tiny_run
    with pytest.raises(SystemExit):
        fast_main(["--pack", str(pack), "--set", "learning_rate=1"])
    with pytest.raises(ValueError, match="loss_rounds"):
        FastTrainer(FastConfig(init=str(init), pack=str(pack), out_dir=str(root / "x"), loss_rounds="first"))


@pytest.mark.slow
def test_the_accelerator_script_runs_end_to_end_on_cpu(tiny_run, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, pack, init, _ = tiny_run
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"  # the device's python3 is the one with torch
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "device-out"
    script = Path(__file__).resolve().parents[1] / "scripts" / "accelerator_train.sh"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "PACK": str(pack)}
    done = subprocess.run([str(script), "--set", f"init={init}", "--set", "max_steps=2", "--set", "batch_size=2",
                           "--set", "device=cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} >= {CHECKPOINT_NAME, "log.jsonl", "summary.json", "train.log"}
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    missing = subprocess.run([str(script)], env={**env, "PACK": str(tmp_path / "none.npz")}, capture_output=True, text=True)
    assert missing.returncode == 2 and "no training pack" in missing.stderr


def test_the_mix_config_loads_and_names_only_training_splits():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "mix.yaml", (), TrainConfig)
    specs = [d.spec for d in config.datasets]
    assert not any("heldout" in s or s.endswith(":val") or ":val+" in s for s in specs)
    assert all(":train" in s or s.startswith(("folder:", "wgisd:")) for s in specs)
