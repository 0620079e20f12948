import pytest
import torch

from model.checkpoint import load_checkpoint, read_header, save_checkpoint
from model.nets.registry import create_model


@pytest.fixture()
def small_net():
    torch.manual_seed(0)
    return create_model("effnet-lite", {"input_size": 64, "decoder_channels": 16})


def test_round_trip_keeps_arch_config_meta_and_weights(tmp_path, small_net):
    path = save_checkpoint(small_net, tmp_path / "a.safetensors", meta={"steps": 12, "metrics": {"noc@90": 3.1}})
    arch, config, meta = read_header(path)
    assert arch == "effnet-lite" and config["input_size"] == 64 and meta["steps"] == 12
    loaded = load_checkpoint(path)
    for k, v in small_net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.checkpoint_meta["metrics"]["noc@90"] == 3.1
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_half_precision_checkpoint_loads_as_float32(tmp_path, small_net):
    path = save_checkpoint(small_net, tmp_path / "h.safetensors", half=True)
    loaded = load_checkpoint(path)
    w = loaded.state_dict()["laterals.0.weight"]
    assert w.dtype == torch.float32
    assert torch.allclose(w, small_net.state_dict()["laterals.0.weight"], atol=1e-3)


def test_mismatched_architecture_or_config_is_rejected(tmp_path, small_net):
    path = save_checkpoint(small_net, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="architecture 'effnet-lite', expected 'plainvit'"):
        load_checkpoint(path, expect_arch="plainvit")
    with pytest.raises(ValueError, match="input_size"):
        load_checkpoint(path, expect_config={"input_size": 320, "decoder_channels": 16})


def test_corrupt_file_error_names_the_file(tmp_path, small_net):
    path = save_checkpoint(small_net, tmp_path / "c.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:200])
    with pytest.raises(ValueError, match="c.safetensors"):
        load_checkpoint(path)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="g.safetensors"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_config_are_rejected(tmp_path, small_net):
    from safetensors.torch import load_file, save_file
    path = save_checkpoint(small_net, tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    state = load_file(str(path))
    state["laterals.0.weight"] = torch.zeros(3, 3, 1, 1)
    save_file(state, str(path), metadata=header)
    with pytest.raises(ValueError, match="does not match architecture 'effnet-lite'.*size mismatch for laterals.0.weight"):
        load_checkpoint(path)
    del state["laterals.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path), metadata=header)
    with pytest.raises(ValueError, match=r'Missing key\(s\).*"laterals.0.weight".*Unexpected key\(s\).*"extra.weight"'):
        load_checkpoint(path)
