import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_checkpoint
from model.data import ObjectSample, folder_refs
from model.training.base import load_config
from model.training.train import (ClickConfig, ObjectSource, TrainConfig, Trainer, next_click_from_errors,
                                  sample_initial_clicks)


def synthetic_objects(n=4, size=96):
    rng = np.random.default_rng(0)
    objects = []
    for i in range(n):
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(20, size - 20, 2)
        mask[y - 12:y + 12, x - 12:x + 12] = 1
        image[mask == 1] = (220, 40, 40)
        objects.append(ObjectSample(image, mask, f"obj{i}", f"img{i}"))
    return objects


def tiny_config(tmp_path, **extra):
    overrides = [f"out_dir={tmp_path / 'run'}", "arch_config={input_size: 64, decoder_channels: 16}",
                 "init=scratch", "batch_size=2", "steps=2", "checkpoint_every=1", "warmup_steps=1", "threads=1"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()], TrainConfig)


def test_unknown_config_keys_are_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match="'icl.betta'"):
        load_config(None, ["icl.betta=[1, 2]"], TrainConfig)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 5\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="'learning_rate'"):
        load_config(cfg_file, (), TrainConfig)


def test_icl_training_runs_saves_config_and_resumes(tmp_path):
    cfg = tiny_config(tmp_path)
    sources = [(ObjectSource(synthetic_objects(), "synthetic"), 1.0)]
    trainer = Trainer(cfg, sources=sources)
    result = trainer.run()
    assert result["step"] == 2
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "last.pt").exists()
    logged = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in logged if "loss" in r)
    net = load_checkpoint(run / "last.safetensors")
    assert net.checkpoint_meta["steps"] == 2

    # Resume: a new trainer with more steps continues from step 2 with the same weights.
    resumed = Trainer(tiny_config(tmp_path, steps=3), sources=sources)
    assert resumed.step == 2
    for k, v in trainer.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[k], v), k
    assert resumed.run()["step"] == 3


def test_baseline_mode_puts_the_loss_on_the_last_round_only(tmp_path):
    cfg = tiny_config(tmp_path, **{"icl.loss_rounds": "last", "icl.max_rounds": 3})
    trainer = Trainer(cfg, sources=[(ObjectSource(synthetic_objects(), "synthetic"), 1.0)])
    stats = trainer.train_step()
    assert np.isfinite(stats["loss"]) and 1 <= stats["rounds"] <= 3


def test_click_simulation():
    rng = np.random.default_rng(0)
    gt = np.zeros((40, 40), np.uint8)
    gt[10:30, 10:30] = 1
    clicks = sample_initial_clicks(gt, rng, ClickConfig())
    assert clicks[0].is_positive and gt[int(clicks[0].y), int(clicks[0].x)] == 1
    assert all(gt[int(c.y), int(c.x)] == (1 if c.is_positive else 0) for c in clicks)
    pred = np.zeros((40, 40), bool)
    pred[10:30, 10:15] = True
    c = next_click_from_errors(pred, gt, rng)
    assert c.is_positive and 15 <= c.x < 30
    assert next_click_from_errors(gt.astype(bool), gt, rng) is None


def test_folder_dataset_reports_bad_files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = np.zeros((20, 30, 3), np.uint8)
    for name in ("good", "nomask", "wrongsize", "empty"):
        Image.fromarray(img).save(tmp_path / "images" / f"{name}.png")
    good = np.zeros((20, 30), np.uint8)
    good[5:10, 5:10] = 255
    Image.fromarray(good).save(tmp_path / "masks" / "good.png")
    Image.fromarray(np.zeros((10, 10), np.uint8) + 255).save(tmp_path / "masks" / "wrongsize.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "masks" / "empty.png")
    objects = folder_refs(tmp_path)
    assert [r.name for r in objects.refs] == ["good"]
    reasons = {p.split("/")[-1]: r for p, r in objects.skipped}
    assert reasons["nomask.png"] == "no mask file"
    assert "image is 30x20" in reasons["wrongsize.png"]
    assert reasons["empty.png"] == "empty object"
    sample = objects.refs[0].load()
    assert sample.mask.sum() == 25 and sample.image.shape == (20, 30, 3)


def test_shared_datasets_list_objects(shared_dir):
    from model.data import parse_dataset_spec
    val = parse_dataset_spec(f"bsds500:{shared_dir}/data/bsds500:val")
    assert len(val.refs) >= 300 and not val.skipped
    wgisd = parse_dataset_spec(f"wgisd:{shared_dir}/data/wgisd-dev")
    assert len(wgisd.refs) > 20
    sample = wgisd.refs[0].load()
    assert sample.mask.shape == sample.image.shape[:2] and sample.mask.max() == 1


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(tmp_path):
    cfg = tiny_config(tmp_path, freeze_backbone="true", steps=1)
    trainer = Trainer(cfg, sources=[(ObjectSource(synthetic_objects(), "synthetic"), 1.0)])
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.train_step()
    after = trainer.net.state_dict()
    frozen = [k for k in before if k.split(".")[0] in ("conv_stem", "bn1", "blocks") and "num_batches" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["head.2.weight"], after["head.2.weight"])
