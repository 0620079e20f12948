import numpy as np
import pytest
import torch

from model.clicks import Click
from model.nets.registry import create_model
from model.predictor import ClickSegPredictor


class DiskNet(torch.nn.Module):
    """A fake network with the registry interface: logits = +8 inside disks of radius 12 around
    positive clicks (read from the click maps), -8 elsewhere; output at stride 4. Counts passes."""

    arch_name = "disk-net"
    arch_config = {"input_size": 128}
    size_multiple = 32
    click_radius = 5

    def __init__(self):
        super().__init__()
        self.passes = 0
        self.prepared = 0

    def prepare_image(self, image):
        self.prepared += 1
        return image

    def forward_prepared(self, prepared, maps):
        self.passes += 1
        pos = maps[:, 1:2]
        grown = torch.nn.functional.max_pool2d(pos, 15, stride=1, padding=7)
        logits = grown * 16 - 8 - maps[:, 2:3] * 16
        return torch.nn.functional.avg_pool2d(logits, 4)


def image(h=96, w=128):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_output_is_full_resolution_probability_around_the_click():
    p = ClickSegPredictor(DiskNet(), cfr_steps=0, zoom_in=False)
    prob = p.predict(image(), [Click(40, 60)])
    assert prob.shape == (96, 128) and prob.dtype == np.float32
    assert prob[40, 60] > 0.9 and prob[5, 5] < 0.1
    assert 0 <= prob.min() and prob.max() <= 1


def test_image_work_is_cached_between_clicks():
    net = DiskNet()
    p = ClickSegPredictor(net, cfr_steps=0, zoom_in=False)
    img = image()
    state = p.encode_image(img)
    prob = p.predict(state, [Click(40, 60)])
    p.predict(state, [Click(40, 60), Click(10, 10, False)], prev_mask=prob)
    assert net.prepared == 1
    p.predict(img, [Click(40, 60)])
    p.predict(img, [Click(40, 60), Click(50, 70)])
    assert net.prepared == 2  # the plain-array path re-encodes only for a new array


def test_cfr_stops_early_once_the_mask_is_stable():
    net = DiskNet()  # ignores the mask input, so the second pass changes nothing
    p = ClickSegPredictor(net, cfr_steps=5, cfr_min_change=20, zoom_in=False)
    p.predict(image(), [Click(40, 60)])
    assert p.last_cfr_passes == 2
    p = ClickSegPredictor(DiskNet(), cfr_steps=5, cfr_clicks=1, zoom_in=False)
    p.predict(image(), [Click(40, 60), Click(41, 61)])
    assert p.last_cfr_passes == 1  # CFR only on the leading click


def test_zoom_in_and_flip_still_place_the_mask_correctly():
    p = ClickSegPredictor(DiskNet(), cfr_steps=1, zoom_in=True, flip=True)
    img = image(300, 400)
    state = p.encode_image(img)
    prob = p.predict(state, [Click(150, 200)])
    prob = p.predict(state, [Click(150, 200), Click(160, 215)], prev_mask=prob)
    assert prob[150, 200] > 0.9 and prob[160, 215] > 0.9 and prob[20, 20] < 0.1


def test_large_images_work_at_working_resolution():
    p = ClickSegPredictor(DiskNet(), cfr_steps=0, max_working_side=200)
    prob = p.predict(image(600, 900), [Click(300, 450)])
    assert prob.shape == (600, 900) and prob[300, 450] > 0.9


def test_a_reduced_copy_with_its_true_size_answers_in_the_true_size_pixels():
    p = ClickSegPredictor(DiskNet(), cfr_steps=0, max_working_side=200)
    full = image(600, 900)
    reduced = full[::2, ::2]  # (300, 450), as a JPEG decoded at 1/2
    state = p.encode_image(reduced, (600, 900))
    assert (state.height, state.width) == (600, 900)
    assert state.working_size == p.encode_image(full).working_size == (133, 200)
    prob = p.predict(state, [Click(500, 100)])
    assert prob.shape == (600, 900) and prob[500, 100] > 0.9 and prob[100, 800] < 0.1
    with pytest.raises(ValueError, match="smaller than the image"):
        p.encode_image(full, (300, 450))


@pytest.mark.parametrize(
    "img, clicks, prev, message",
    [
        (image(), [], None, "empty"),
        (image(), [Click(200, 5)], None, "outside"),
        (np.zeros((10, 10), np.uint8), [Click(1, 1)], None, "RGB"),
        (np.zeros((0, 10, 3), np.uint8), [Click(0, 0)], None, "zero size"),
        (image(), [Click(5, 5)], np.zeros((10, 10), np.float32), "prev_mask"),
    ],
)
def test_bad_input_raises_value_error(img, clicks, prev, message):
    p = ClickSegPredictor(DiskNet(), cfr_steps=0)
    with pytest.raises(ValueError, match=message):
        p.predict(img, clicks, prev_mask=prev)


def test_real_network_runs_end_to_end():
    p = ClickSegPredictor(create_model("effnet-lite", {"input_size": 96}), cfr_steps=2)
    prob = p.predict(image(), [Click(40, 60)])
    prob = p.predict(image(), [Click(40, 60), Click(10, 10, False)], prev_mask=prob)
    assert prob.shape == (96, 128) and np.isfinite(prob).all()
