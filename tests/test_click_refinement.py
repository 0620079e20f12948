import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.click_refinement import HEAD_HALO, ClickWindows, clicks_disagree, refine_for_clicks
from model.clicks import Click, encode_click_maps
from model.nets.registry import create_model
from model.predictor import DEFAULT_CLICK_REFINEMENT_ITERATIONS, ClickSegPredictor


def small_net(seed=0):
    torch.manual_seed(seed)
    return create_model("effnet-lite", {"input_size": 96}).eval()


def features_and_maps(net, clicks, size=96, seed=0):
    torch.manual_seed(seed)
    image = torch.rand(1, 3, size, size)
    maps = encode_click_maps(clicks, size, size, torch.full((size, size), 0.3))
    with torch.inference_mode():
        return net.decoder_features(net.prepare_image(image), maps), maps


def test_clicks_disagree_reads_the_clicked_pixels():
    prob = torch.zeros(1, 1, 20, 20)
    prob[0, 0, 5:10, 5:10] = 0.9
    assert not clicks_disagree(prob, [Click(7, 7), Click(15, 15, False)])
    assert clicks_disagree(prob, [Click(7, 7), Click(15, 15)])  # positive click off the mask
    assert clicks_disagree(prob, [Click(6, 6, False)])  # negative click on the mask
    assert not clicks_disagree(prob, [Click(-30, 40)])  # outside the view: not checked


@pytest.mark.parametrize("size", [96, 32])  # a map larger than a window, and one smaller
def test_every_weighted_cell_of_a_window_has_the_full_maps_logit(size):
    net = small_net()
    clicks = [Click(44 % size, 52 % size), Click(1, 2, False), Click(size - 1, size - 3), Click(0.4, size - 1.6, False)]
    features, maps = features_and_maps(net, clicks, size=size)
    grid = features.shape[-2:]
    clicks_small = F.adaptive_avg_pool2d(maps, grid)
    reach = 2
    windows = ClickWindows.around(features, clicks_small, clicks, stride=4, reach=reach)
    with torch.inference_mode():
        full = net.head_logits(features, maps)[0, 0]
        windowed = net.head_logits(windows.features, windows.clicks_small)[:, 0]
    side = min(2 * (reach + HEAD_HALO) + 1, size // 4)
    assert windowed.shape[1:] == (side, side)
    for k, c in enumerate(clicks):
        cy, cx = int((c.y + 0.5) // 4), int((c.x + 0.5) // 4)
        weighted = windows.weight[k] > 0
        assert weighted.any()
        # the window's logits, placed back on the map, equal the full map's wherever the loss looks
        y0 = min(max(cy - reach - HEAD_HALO, 0), grid[0] - side)
        x0 = min(max(cx - reach - HEAD_HALO, 0), grid[1] - side)
        expected = full[y0:y0 + side, x0:x0 + side]
        torch.testing.assert_close(windowed[k][weighted], expected[weighted], rtol=1e-4, atol=1e-4)
        ys, xs = torch.nonzero(weighted, as_tuple=True)
        assert (ys + y0 - cy).abs().max() <= reach and (xs + x0 - cx).abs().max() <= reach
    assert windows.labels.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_clicks_outside_the_view_give_no_window():
    net = small_net()
    features, maps = features_and_maps(net, [Click(40, 40)])
    assert ClickWindows.around(features, F.adaptive_avg_pool2d(maps, features.shape[-2:]), [Click(-20, 40)],
                               stride=4, reach=2) is None


def test_refinement_moves_the_clicked_pixels_towards_their_labels():
    net = small_net()
    clicks = [Click(44, 52), Click(20, 20), Click(70, 30, False)]
    features, maps = features_and_maps(net, clicks)
    with torch.inference_mode():
        before = torch.sigmoid(F.interpolate(net.head_logits(features, maps), size=(96, 96), mode="bilinear"))
    after = refine_for_clicks(net, features, maps, clicks, iterations=20, weight_decay=0.0)

    def click_loss(prob):
        return sum(float(1 - prob[0, 0, int(c.y), int(c.x)]) if c.is_positive else float(prob[0, 0, int(c.y), int(c.x)])
                   for c in clicks)

    assert click_loss(after) < click_loss(before) - 0.1
    assert after.shape == (1, 1, 96, 96)

def test_refinement_leaves_the_networks_weights_alone():
    net = small_net()
    clicks = [Click(44, 52), Click(70, 30, False)]
    features, maps = features_and_maps(net, clicks)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    refine_for_clicks(net, features, maps, clicks, iterations=5, weight_decay=0.0)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


def test_a_strong_pull_to_the_identity_changes_nothing():
    net = small_net()
    clicks = [Click(44, 52)]
    features, maps = features_and_maps(net, clicks)
    with torch.inference_mode():
        before = torch.sigmoid(F.interpolate(net.head_logits(features, maps), size=(96, 96), mode="bilinear"))
    after = refine_for_clicks(net, features, maps, clicks, iterations=5, weight_decay=1e6)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)


def square_image():
    img = np.full((120, 160, 3), 30, np.uint8)
    img[40:80, 50:110] = (220, 40, 40)
    return img


@pytest.mark.parametrize("zoom_in", [False, True])
def test_clicks_the_prediction_obeys_are_not_refined(zoom_in):
    clicks = [Click(60, 80), Click(60, 100), Click(20, 20, False)]
    plain = ClickSegPredictor.from_checkpoint(zoom_in=zoom_in, click_refinement_iterations=0)
    refining = ClickSegPredictor.from_checkpoint(zoom_in=zoom_in, click_refinement_iterations=10)
    prob = plain.predict(square_image(), clicks)
    assert all((prob[int(c.y), int(c.x)] > 0.49) == c.is_positive for c in clicks)
    np.testing.assert_array_equal(refining.predict(square_image(), clicks), prob)
    assert not refining.last_click_refined


@pytest.mark.parametrize("zoom_in, clicks", [
    (False, [Click(60, 80), Click(60, 83, False)]),
    (True, [Click(60, 80), Click(100, 20, False), Click(61, 82, False)]),  # on the zoom-in view
])
def test_the_default_model_obeys_a_contradicted_click_after_refinement(zoom_in, clicks):
    # A negative click 2-3 px from the positive one, inside a uniform square: the shipped model
    # alone keeps it on the mask (0.54 / 0.56 when this test was written); refinement takes it off
    # and keeps the object. New default weights may need another scene here.
    before = ClickSegPredictor.from_checkpoint(zoom_in=zoom_in, click_refinement_iterations=0).predict(square_image(), clicks)
    refining = ClickSegPredictor.from_checkpoint(zoom_in=zoom_in, click_refinement_iterations=10)
    after = refining.predict(square_image(), clicks)
    last = clicks[-1]
    assert before[int(last.y), int(last.x)] > 0.49, "the scene no longer contradicts the click: pick another"
    assert refining.last_click_refined
    assert all((after[int(c.y), int(c.x)] > 0.49) == c.is_positive for c in clicks)


def test_flip_switched_on_later_stops_refinement():
    clicks = [Click(60, 80), Click(60, 83, False)]
    predictor = ClickSegPredictor.from_checkpoint(zoom_in=False, click_refinement_iterations=10)
    predictor.flip = True
    prob = predictor.predict(square_image(), clicks)
    assert not predictor.last_click_refined
    flipped = ClickSegPredictor.from_checkpoint(zoom_in=False, flip=True).predict(square_image(), clicks)
    np.testing.assert_array_equal(prob, flipped)


@pytest.mark.parametrize("options, message", [
    ({"click_refinement_iterations": -1}, "click_refinement_iterations"),
    ({"click_refinement_iterations": 3, "flip": True}, "flip"),
])
def test_bad_refinement_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        ClickSegPredictor(small_net(), **options)


def test_refinement_is_on_by_default_where_the_network_allows_it():
    assert ClickSegPredictor(small_net()).click_refinement_iterations == DEFAULT_CLICK_REFINEMENT_ITERATIONS
    assert ClickSegPredictor(small_net(), flip=True).click_refinement_iterations == 0
    assert ClickSegPredictor(small_net(), click_refinement_iterations=0).click_refinement_iterations == 0


def test_a_network_without_decoder_features_runs_without_refinement_unless_asked():
    def plainvit():
        return create_model("plainvit", {"input_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 4,
                                         "num_heads": 2, "neck_out_dims": [8, 8, 8, 8], "head_channels": 8})

    assert ClickSegPredictor(plainvit()).click_refinement_iterations == 0
    with pytest.raises(ValueError, match="click_refinement_iterations=3: plainvit has no decoder_features"):
        ClickSegPredictor(plainvit(), click_refinement_iterations=3)


def test_refinement_needs_an_iteration():
    net = small_net()
    features, maps = features_and_maps(net, [Click(40, 40)])
    with pytest.raises(ValueError, match="iterations"):
        refine_for_clicks(net, features, maps, [Click(40, 40)], iterations=0)


def test_the_evaluation_records_which_clicks_were_refined():
    from model.evaluation.evaluate import evaluate_objects

    class Sample:
        name, image_id = "square", "square"
        image = square_image()
        mask = np.zeros((120, 160), bool)
        mask[40:80, 50:110] = True

    class EveryOtherClickRefined:
        """A stand-in predictor that reports refinement on clicks 2 and 4."""
        model_version = "stand-in"
        last_click_refined = False

        def encode_image(self, image):
            return image

        def predict(self, state, clicks, prev_mask=None):
            self.last_click_refined = len(clicks) % 2 == 0
            prob = np.zeros((120, 160), np.float32)
            prob[45:75, 55:105] = 1
            return prob

    result = evaluate_objects(EveryOtherClickRefined(), [Sample()], max_clicks=4)
    assert result.objects[0].refined_clicks == [2, 4]
    assert result.summary()["refined_clicks"] == 2
