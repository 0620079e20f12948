"""``plainvit``: official SimpleClick / CFR-ICL state-dict compatibility, safe loading of
official checkpoints, numerical agreement with the official forward, checkpoint round trip.

Tests that need ../shared/reference skip when it is absent (override with LS_CLICKSEG_SHARED).
"""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Optional

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.clicks import Click, encode_click_maps
from model.nets.plainvit import PLAINVIT_PRESETS
from model.official import (PickledObjectPlaceholder, RestrictedUnpickler, config_from_official, load_official_checkpoint,
                            load_official_file)
from model.nets.registry import create_model, resolve_config

SHARED = Path(os.environ.get("LS_CLICKSEG_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
REFERENCE = SHARED / "reference"
KEYS_JSON = REFERENCE / "official_checkpoint_keys.json"
XTINY_CKPT = REFERENCE / "simpleclick_xtiny448_official_format.pth"
XTINY_IO = REFERENCE / "simpleclick_xtiny448_io.pt"


def official_points_to_click_maps(points: torch.Tensor, prev_mask: Optional[torch.Tensor],
                                  height: int, width: int, radius: float = 5) -> torch.Tensor:
    """Official ``points`` (B, 2N, 3) rows ``(y, x, click_index)`` -> click maps (B, 3, H, W).

    The first N rows are positive clicks, the last N negative; rows whose y and x are both
    negative are padding (official ``DistMaps``: ``max(y, x) < 0``). Disks are
    ``(row - y)^2 + (col - x)^2 <= radius^2``, exactly as ``DistMaps(use_disks=True)``.
    """
    if points.ndim != 3 or points.shape[2] != 3 or points.shape[1] % 2:
        raise ValueError(f"points: expected shape (B, 2N, 3), got {tuple(points.shape)}")
    half = points.shape[1] // 2
    maps = []
    for b in range(points.shape[0]):
        clicks = [Click(float(y), float(x), i < half)
                  for i, (y, x, _) in enumerate(points[b].tolist()) if max(y, x) >= 0]
        mask = None if prev_mask is None else prev_mask[b]
        maps.append(encode_click_maps(clicks, height, width, mask, radius=radius, device=points.device))
    return torch.cat(maps, dim=0)


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"reference file {path} is absent")
    return path


@pytest.fixture(scope="module")
def xtiny_official():
    return load_official_checkpoint(_need(XTINY_CKPT))


# --------------------------------------------------------------------------- state-dict layout


@pytest.mark.parametrize("preset, json_name", [
    ("vit_huge", "cocolvis_icl_vit_huge.pth (CFR-ICL ViT-H, 448)"),
    ("vit_base", "SimpleClick/CFR-ICL ViT-B 448"),
])
def test_keys_and_shapes_equal_the_official_checkpoints(preset, json_name):
    official = json.loads(_need(KEYS_JSON).read_text())[json_name]
    with torch.device("meta"):  # no memory, no init cost: ViT-H has 600M+ parameters
        net = create_model("plainvit", PLAINVIT_PRESETS[preset])
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert sorted(set(ours) - set(official)) == []
    assert sorted(set(official) - set(ours)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


# --------------------------------------------------------------------------- official checkpoint


def test_official_xtiny_checkpoint_loads_with_its_config(xtiny_official):
    assert xtiny_official.arch_name == "plainvit"
    assert xtiny_official.arch_config == resolve_config("plainvit", PLAINVIT_PRESETS["xtiny"])
    raw = load_official_file(XTINY_CKPT)["state_dict"]
    own = xtiny_official.state_dict()
    assert set(own) == set(raw)
    assert all(torch.equal(own[k], raw[k]) for k in raw)
    assert not xtiny_official.training


def test_bare_official_state_dict_gives_the_same_architecture(tmp_path, xtiny_official):
    raw = load_official_file(_need(XTINY_CKPT))["state_dict"]
    bare = tmp_path / "bare.pth"
    torch.save(raw, bare)
    net = load_official_checkpoint(bare)
    assert net.arch_config == xtiny_official.arch_config


def test_non_plainvit_official_config_is_refused():
    with pytest.raises(ValueError, match="not a PlainVitModel"):
        config_from_official({"class": "isegm.model.is_hrnet_model.HRNetModel", "params": {}})


# --------------------------------------------------------------------------- no code execution

CALLS = []


def record_call(*args):
    """Would mark that unpickling ran a function stored in the pickle."""
    CALLS.append(args)
    return args


class RunsFunction:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class ConfigDict(dict):
    """A dict subclass, as easydict configs are."""


def test_restricted_unpickler_never_calls_pickled_globals(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({
        "shell": RunsFunction(os.system, (f"touch {marker}",)),
        "python": RunsFunction(record_call, ("pwned",)),
        "config": ConfigDict(radius=5),
        "kept": [1, 2.5, "x"],
    }, protocol=2)
    unpickler = RestrictedUnpickler(io.BytesIO(payload))
    loaded = unpickler.load()
    assert not marker.exists()
    assert CALLS == []
    assert isinstance(loaded["shell"], PickledObjectPlaceholder)
    assert loaded["shell"].pickled_name == "system"
    assert loaded["python"].pickled_args == ("pwned",)
    assert loaded["config"].pickled_items == [("radius", 5)]
    assert loaded["kept"] == [1, 2.5, "x"]
    assert f"{__name__}.record_call" in unpickler.replaced


def test_official_loader_refuses_a_malicious_checkpoint_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": RunsFunction(os.system, (f"touch {marker}",))},
                "config": RunsFunction(record_call, ("pwned",))}, evil)
    with pytest.raises(ValueError, match="no state dict of tensors"):
        load_official_checkpoint(evil)
    assert not marker.exists()
    assert CALLS == []


def test_official_checkpoint_config_class_is_a_placeholder():
    content = load_official_file(_need(XTINY_CKPT))
    loss = content["config"]["params"]["head_params"]["value"]["loss_decode"]
    assert isinstance(loss, PickledObjectPlaceholder)
    assert loss.pickled_name == "CrossEntropyLoss"


# --------------------------------------------------------------------------- official forward


def official_disk_maps(points: torch.Tensor, height: int, width: int, radius: float) -> torch.Tensor:
    """Independent port of isegm ``DistMaps(use_disks=True)`` (GPU branch): (B, 2, H, W)."""
    num_points = points.shape[1] // 2
    pts = points.reshape(-1, 3)[:, :2]
    invalid = pts.max(dim=1).values < 0
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                                torch.arange(width, dtype=torch.float32), indexing="ij")
    d2 = (rows[None] - pts[:, 0, None, None]) ** 2 + (cols[None] - pts[:, 1, None, None]) ** 2
    d2[invalid] = 1e6
    d2 = d2.view(-1, num_points, height, width).min(dim=1).values.view(-1, 2, height, width)
    return (d2 <= radius ** 2).float()


def test_click_maps_reproduce_official_disks():
    points = torch.tensor([[[10.0, 12.0, 0], [30.5, 3.25, 2], [0.0, 39.0, 4], [-1, -1, -1],
                            [20.0, 20.0, 1], [-1.0, 6.0, 3], [-1, -1, -1], [-1, -1, -1]]])
    prev = torch.rand(1, 1, 40, 48)
    maps = official_points_to_click_maps(points, prev, 40, 48, radius=5)
    assert torch.equal(maps[:, 0:1], prev)
    assert torch.equal(maps[:, 1:], official_disk_maps(points, 40, 48, 5))


def test_xtiny_logits_match_the_official_model(xtiny_official):
    ref = torch.load(_need(XTINY_IO), weights_only=True)
    maps = official_points_to_click_maps(ref["points"], ref["prev_mask"], 448, 448)
    with torch.no_grad():
        logits = xtiny_official(ref["image"], maps)
    assert logits.shape == ref["logits"].shape
    max_diff = (logits - ref["logits"]).abs().max().item()
    print(f"plainvit xtiny vs official logits: max abs diff {max_diff:.3g}")
    assert max_diff < 1e-4


# --------------------------------------------------------------------------- own checkpoints, inputs


def test_checkpoint_round_trip_keeps_weights_and_outputs(tmp_path):
    torch.manual_seed(0)
    net = create_model("plainvit", PLAINVIT_PRESETS["xtiny"]).eval()
    path = save_checkpoint(net, tmp_path / "xtiny.safetensors", meta={"note": "round trip"})
    loaded = load_checkpoint(path, expect_arch="plainvit", expect_config=PLAINVIT_PRESETS["xtiny"])
    assert loaded.arch_config == net.arch_config
    assert loaded.checkpoint_meta == {"note": "round trip"}
    image, maps = torch.rand(1, 3, 200, 176), torch.zeros(1, 3, 200, 176)
    maps[0, 1, 90:100, 80:90] = 1
    with torch.no_grad():
        expected = net(image, maps)
        got = loaded.forward_prepared(loaded.prepare_image(image), maps)
    # 200x176 is no multiple of the patch and not the training grid: padding + pos-embed resize.
    assert got.shape == (1, 1, 200, 176)
    assert torch.equal(got, expected)


def test_bad_inputs_and_configs_raise_value_error():
    net = create_model("plainvit", {**PLAINVIT_PRESETS["xtiny"], "depth": 4}).eval()
    with pytest.raises(ValueError, match="image"):
        net(torch.rand(1, 4, 64, 64), torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="click_maps"):
        net(torch.rand(1, 3, 64, 64), torch.zeros(1, 2, 64, 64))
    with pytest.raises(ValueError, match="tokens"):
        net.forward_prepared(net.prepare_image(torch.rand(1, 3, 64, 64)), torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("plainvit", {**PLAINVIT_PRESETS["xtiny"], "input_size": 450})
    with pytest.raises(ValueError, match="depth"):
        create_model("plainvit", {**PLAINVIT_PRESETS["xtiny"], "depth": 6})
    with pytest.raises(ValueError, match="points"):
        official_points_to_click_maps(torch.zeros(1, 3, 3), None, 8, 8)
