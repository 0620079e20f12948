"""Exemplar recall branch: responses, proposals, predictor integration, scenes, trainer, MOIS."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from model.checkpoint import load_checkpoint, save_checkpoint
from model.clicks import Click
from model.evaluation.evaluate_mois import evaluate_image, instance_cores
from model.evaluation.evaluate_mois import main as mois_main
from model.evaluation.evaluate_mois import match_proposals, oracle_bounds, split_by_cores, summarize
from model.nets.recall import ExemplarRecall, masked_responses
from model.nets.registry import create_model
from model.predictor import ClickSegPredictor
from model.proposals import Proposal, propose, propose_objects, upscale_proposal
from model.training.base import load_config
from model.training.recall import RecallTrainer, load_recall_config, sample_from_scene
from model.training.scenes import IGNORE_INSTANCE, SyntheticScenes, WgisdScenes, random_crop
from model.training.train import TrainConfig, Trainer
from model.transforms import shrink_map


def tiny_net(recall_channels=16):
    torch.manual_seed(0)
    return create_model("effnet-lite", {"input_size": 64, "decoder_channels": 16, "click_channels": 8,
                                        "recall_channels": recall_channels, "recall_input_size": 96}).eval()


# --- exemplar-informed responses --------------------------------------------------------------


def test_masked_responses_prototype_and_kernels():
    # Three kinds of pixel: A (the exemplar), B (orthogonal to A), C (halfway).
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    c = F.normalize(a + b, dim=0)
    feats = torch.stack([a, b, c, a], 1).view(1, 2, 1, 4)  # pixels: A B C A
    weights = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4)
    out = masked_responses(feats, weights)
    assert out.shape == (1, 2, 1, 4)
    expected = torch.tensor([1.0, 0.0, c[0].item(), 1.0])
    assert torch.allclose(out[0, 0, 0], expected, atol=1e-6)  # prototype = A
    assert torch.allclose(out[0, 1, 0], expected, atol=1e-6)  # one kernel = A


def test_masked_responses_kernels_keep_every_exemplar_part():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feats = torch.stack([a, b, a, b], 1).view(1, 2, 1, 4)
    weights = torch.tensor([1.0, 1.0, 0, 0]).view(1, 1, 1, 4)  # exemplar has both parts
    out = masked_responses(feats, weights)
    # the prototype is the mean direction (0.707 to both); the kernels match each part exactly
    assert torch.allclose(out[0, 0, 0], torch.full((4,), 2 ** -0.5), atol=1e-6)
    assert torch.allclose(out[0, 1, 0], torch.ones(4), atol=1e-6)


def test_masked_responses_empty_mask_gives_zeros():
    feats = F.normalize(torch.randn(2, 8, 5, 6), dim=1)
    weights = torch.zeros(2, 1, 5, 6)
    weights[1, 0, 2, 3] = 1
    out = masked_responses(feats, weights)
    assert torch.all(out[0] == 0)
    assert out[1, 1, 2, 3] == pytest.approx(1.0, abs=1e-5)


def test_recall_branch_with_refinement_outputs_stride_4():
    torch.manual_seed(0)
    branch = ExemplarRecall("lite0", channels=16, refine_channels=8).eval()
    for module in branch.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    stages = branch.backbone_stages(torch.rand(1, 3, 64, 96))
    feats = branch.embed_stages(stages)
    assert feats.fine_term.shape == (1, 8, 16, 24)
    assert torch.allclose(feats.unit.norm(dim=1), torch.ones(1, 8, 12), atol=1e-5)
    masks = torch.zeros(1, 1, 64, 96)
    masks[:, :, 10:20, 10:20] = 1
    clicks = torch.zeros(1, 2, 64, 96)
    logits = branch(feats, masks, masks, clicks, torch.zeros(1, 1, 64, 96))
    assert logits.shape == (1, 1, 16, 24)
    # the precomputed fine share equals the refinement run on the concatenated inputs
    head_out = {}
    branch.head[-2].register_forward_hook(lambda module, args, out: head_out.setdefault("x", out))
    branch.refine_channels = 0  # the stride-8 part alone
    coarse_logits = branch(feats, masks, masks, clicks, torch.zeros(1, 1, 64, 96))
    branch.refine_channels = 8
    up = F.interpolate(head_out["x"], size=(16, 24), mode="bilinear", align_corners=False)
    up_logits = F.interpolate(coarse_logits, size=(16, 24), mode="bilinear", align_corners=False)
    reference = up_logits + branch.refine(torch.cat([up, branch.fine_embed(stages[1]), up_logits], 1))
    assert torch.allclose(logits, reference, atol=1e-5)


def test_recall_branch_shapes_and_gradients():
    branch = ExemplarRecall("lite0", channels=16)
    image = torch.rand(2, 3, 64, 96)
    feats = branch.encode(image)
    assert feats.coarse.shape == (2, 16, 8, 12) and feats.fine_term is None
    masks = torch.zeros(2, 1, 64, 96)
    masks[:, :, 10:20, 10:20] = 1
    logits = branch(feats, masks, masks, torch.zeros(2, 2, 64, 96), torch.zeros(2, 1, 64, 96))
    assert logits.shape == (2, 1, 8, 12)
    logits.mean().backward()
    assert branch.head[-1].weight.grad is not None and branch.fusion.project[0].weight.grad is not None


# --- proposals -----------------------------------------------------------------------------------


def _prob_with_blobs():
    prob = np.zeros((40, 60), np.float32)
    prob[2:10, 2:10] = 0.9  # A: strong
    prob[2:10, 30:38] = 0.55  # B: weak
    prob[20:30, 2:12] = 0.8  # C: mostly excluded
    prob[20:30, 40:50] = 0.95  # D: partly excluded
    prob[35:37, 55:57] = 0.99  # E: tiny
    return prob


def test_propose_objects_components_scores_and_exclusion():
    prob = _prob_with_blobs()
    exclude = np.zeros(prob.shape, bool)
    exclude[20:30, 2:10] = True  # 80% of C
    exclude[20:30, 40:42] = True  # 20% of D
    found = propose_objects(prob, exclude, min_score=0.6, min_area=16)
    assert [round(p.score, 2) for p in found] == [0.95, 0.9]
    d, a = found
    assert d.area == 80 and not (d.mask & exclude).any()
    assert a.mask[2:10, 2:10].all() and a.area == 64


def test_propose_objects_thresholds_and_bad_input():
    prob = _prob_with_blobs()
    assert len(propose_objects(prob, min_score=0.5, min_area=1)) == 5
    assert len(propose_objects(prob, min_score=0.5, min_area=16)) == 4
    assert propose_objects(np.zeros((5, 5))) == []
    with pytest.raises(ValueError, match="recall_prob"):
        propose_objects(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="exclude"):
        propose_objects(prob, np.zeros((3, 3), bool))


# --- predictor -----------------------------------------------------------------------------------


class FixedRecall(ClickSegPredictor):
    """The real branch's plumbing, with a hand-made recall map (probabilities on its grid)."""

    recall_map = None

    def recall_logits(self, state, exemplar_mask, clicks, object_prob):
        super().recall_logits(state, exemplar_mask, clicks, object_prob)  # exercises validation + encode
        return torch.logit(torch.from_numpy(self.recall_map), eps=1e-6)[None, None]


def test_predictor_recall_shapes_and_validation():
    predictor = ClickSegPredictor(tiny_net())
    assert predictor.has_recall
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    state = predictor.encode_image(image)
    prob = predictor.predict(state, [Click(20, 30)])
    exemplar = np.zeros((50, 70), bool)
    exemplar[5:15, 5:15] = True
    recall = predictor.recall(state, exemplar, [Click(20, 30)], prob)
    assert recall.shape == state.working_size and recall.dtype == np.float32
    assert state.recall_features is not None
    assert 0 <= recall.min() and recall.max() <= 1
    with pytest.raises(ValueError, match="empty"):
        predictor.recall(state, np.zeros((50, 70), bool), [Click(20, 30)], prob)
    with pytest.raises(ValueError, match="exemplar_mask has shape"):
        predictor.recall(state, exemplar[:10], [Click(20, 30)], prob)
    with pytest.raises(ValueError, match="outside"):
        predictor.recall(state, exemplar, [Click(80, 30)], prob)
    no_recall = ClickSegPredictor(tiny_net(recall_channels=0))
    assert not no_recall.has_recall
    with pytest.raises(ValueError, match="no exemplar recall"):
        no_recall.encode_recall(no_recall.encode_image(image))


def test_predictor_propose_full_size_masks_never_cover_excluded():
    predictor = FixedRecall(tiny_net(), max_working_side=100)
    image = np.random.default_rng(1).integers(0, 255, (100, 200, 3), dtype=np.uint8)  # working 50 x 100
    state = predictor.encode_image(image)
    assert state.working_size == (50, 100)
    m = np.full((50, 100), 0.2, np.float32)  # background logit -1.39: a 0.8 block's edge falls midway
    m[5:15, 5:15] = 0.9  # the exemplar's own place
    m[5:15, 50:60] = 0.8  # a new object
    m[30:40, 70:80] = 0.7  # another, partly under the current object
    predictor.recall_map = m
    exemplar = np.zeros((100, 200), bool)
    exemplar[10:30, 10:30] = True
    object_prob = np.zeros((100, 200), np.float32)
    object_prob[60:64, 140:160] = 1.0  # 20% of the second component
    found = propose(predictor, state, exemplar, [Click(62, 150)], object_prob, min_score=0.5, min_area=20)
    assert [round(p.score, 2) for p in found] == [0.8, 0.7]
    first, second = found
    assert first.mask.shape == (100, 200)
    assert first.mask[10:30, 100:120].all() and first.area == 400
    assert not (second.mask & (object_prob >= 0.49)).any() and second.area > 0
    for p in found:
        assert not (p.mask & exemplar).any()
    # an explicit exclude replaces the exemplar, never the current object
    free = propose(predictor, state, exemplar, [Click(62, 150)], object_prob, exclude=np.zeros((100, 200), bool),
                             min_score=0.5, min_area=20)
    assert [round(p.score, 2) for p in free] == [0.9, 0.8, 0.7]
    assert not any((p.mask & (object_prob >= 0.49)).any() for p in free)


def _pil_box_shrink(mask: np.ndarray, size) -> np.ndarray:
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def test_shrink_map_of_a_bool_mask_resizes_only_its_box_like_the_whole_image():
    rng = np.random.default_rng(0)
    mask = np.zeros((3000, 4000), bool)
    mask[1000:1400, 1500:2100] = True
    mask[2990:, :7] = True  # touches two borders
    # a scale that floats represent exactly (4000/1024): the same numbers as resizing everything
    assert np.array_equal(shrink_map(mask, (768, 1024)), _pil_box_shrink(mask, (768, 1024)))
    assert not shrink_map(np.zeros((30, 40), bool), (7, 9)).any()
    for _ in range(40):  # any scale: box windows may break ties between neighbours differently
        height, width = (int(v) for v in rng.integers(20, 200, 2))
        size = (int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1)))
        mask = np.zeros((height, width), bool)
        y, x = rng.integers(0, height), rng.integers(0, width)
        mask[y:y + rng.integers(1, 60), x:x + rng.integers(1, 60)] = True
        mask |= rng.random((height, width)) < 0.002
        fast, reference = shrink_map(mask, size), _pil_box_shrink(mask, size)
        assert fast.shape == size and np.abs(fast - reference).mean() < 0.01
        assert np.mean((fast > 0.5) != (reference > 0.5)) < 0.01


def test_upscale_proposal_upscales_its_logits_in_its_box_without_excluded_pixels():
    grid = np.full((50, 100), -2.0, np.float32)
    grid[10:20, 30:45] = 2.0  # the proposal
    grid[9, 30:45] = -1.0  # its fall-off above: shapes the boundary
    grid[10:20, 47:50] = 2.0  # a neighbour two pixels away: must not leak in
    component = grid >= 0
    component[:, 46:] = False
    proposal = Proposal.from_crop(component[8:22, 28:47].copy(), (8, 22, 28, 47), (50, 100), 0.9)
    assert np.array_equal(proposal.mask, component) and proposal.area == 150
    exclude = np.zeros((200, 400), bool)
    exclude[40:50, :] = True
    full = upscale_proposal(proposal, grid, (200, 400), exclude)
    own = np.where(ndimage.binary_dilation(component, np.ones((3, 3), bool)), grid, -30.0).astype(np.float32)
    reference = F.interpolate(torch.from_numpy(own)[None, None], size=(200, 400),
                              mode="bilinear", align_corners=False)[0, 0].numpy() >= 0
    assert full.mask.shape == (200, 400) and full.score == 0.9
    assert np.array_equal(full.mask, reference & ~exclude)
    assert not full.mask[:, 46 * 4:].any()  # nothing of the neighbour
    whole = upscale_proposal(proposal, grid, (200, 400), np.zeros((200, 400), bool)).mask
    rows = np.flatnonzero(whole[:, 150])  # the top edge (fall-off -1) reaches further than the bottom (-2)
    assert (rows[0], rows[-1]) == (39, 79)
    same = upscale_proposal(proposal, grid, (50, 100), np.zeros((50, 100), bool))
    assert np.array_equal(same.mask, component)
    with pytest.raises(ValueError, match="grid"):
        upscale_proposal(proposal, grid[:10], (200, 400), exclude)


# --- checkpoints and training ------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_recall(tmp_path):
    net = tiny_net()
    path = save_checkpoint(net, tmp_path / "r.safetensors", meta={"version": "t"})
    loaded = load_checkpoint(path)
    assert loaded.recall is not None
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_registry_validates_recall_input_size():
    with pytest.raises(ValueError, match="recall_input_size"):
        create_model("effnet-lite", {"recall_channels": 8, "recall_input_size": 100})


def _write_scene_dataset(root: Path, rng):
    """A tiny WGISD-like folder and a BSDS-like split with squares to paste."""
    (root / "wgisd" / "images").mkdir(parents=True)
    (root / "wgisd" / "instances").mkdir()
    for k in range(2):
        img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        inst = np.zeros((120, 160), np.uint8)
        inst[10:40, 10:40], inst[60:100, 50:90], inst[20:50, 110:150] = 1, 2, 3
        Image.fromarray(img).save(root / "wgisd" / "images" / f"IMG_{k}.jpg")
        Image.fromarray(inst).save(root / "wgisd" / "instances" / f"IMG_{k}.png")
    for split in ("train",):
        (root / "bsds" / split / "images").mkdir(parents=True)
        (root / "bsds" / split / "regions").mkdir(parents=True)
        for k in range(3):
            img = rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)
            regions = np.ones((100, 150), np.uint16)
            regions[20:40, 30:60] = 2
            regions[60:80, 90:110] = 3
            Image.fromarray(img).save(root / "bsds" / split / "images" / f"{k}.jpg")
            Image.fromarray(regions).save(root / "bsds" / split / "regions" / f"{k}_1.png")


def test_scenes_have_several_instances(tmp_path):
    rng = np.random.default_rng(0)
    _write_scene_dataset(tmp_path, rng)
    wgisd = WgisdScenes(tmp_path / "wgisd", long_side=96)
    from model.data import bsds500_refs
    synthetic = SyntheticScenes(bsds500_refs(tmp_path / "bsds", ("train",)).refs)
    for source in (wgisd, synthetic):
        scenes = [s for s in (source.sample(64, rng, min_area=10) for _ in range(20)) if s is not None]
        assert scenes, type(source).__name__
        for scene in scenes:
            assert scene.image.shape == (64, 64, 3) and scene.instances.shape == (64, 64)
            assert len(scene.instance_ids(10)) >= 2
            sample = sample_from_scene(scene, rng) if len(scene.instance_ids(40)) >= 2 else None
            if sample is not None:
                assert (sample.exemplar > 0).any() and sample.target.max() >= 1
                assert sample.target[int(sample.click.y), int(sample.click.x)] == 1
    with pytest.raises(ValueError, match="no WGISD images"):
        WgisdScenes(tmp_path / "wgisd", stems=["nope"])


def test_random_crop_pads_with_fill_label():
    image = np.ones((10, 12, 3), np.uint8)
    labels = np.ones((10, 12), np.int32)
    out_image, out_labels = random_crop(image, labels, 16, np.random.default_rng(0))
    assert out_image.shape == (16, 16, 3)
    assert (out_labels[:10, :12] == 1).all() and (out_labels[10:] == IGNORE_INSTANCE).all()


def test_recall_trainer_trains_only_the_branch_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    _write_scene_dataset(tmp_path, rng)
    base = create_model("effnet-lite", {"input_size": 64, "decoder_channels": 16, "click_channels": 8})
    init = save_checkpoint(base, tmp_path / "base.safetensors", meta={"version": "base"})
    overrides = [f"init={init}", "recall_channels=8", "recall_input_size=96", f"wgisd={tmp_path / 'wgisd'}",
                 f"bsds500={tmp_path / 'bsds'}", "bsds500_splits=[train]", f"out_dir={tmp_path / 'run'}",
                 "steps=2", "batch_size=2", "crop_size=64", "checkpoint_every=1", "device=cpu", "threads=1"]
    trainer = RecallTrainer(load_recall_config(None, overrides))
    frozen_before = trainer.recall.blocks[0][0].conv_dw.weight.clone()
    seg_before = trainer.net.head[-1].weight.clone()
    head_before = trainer.recall.head[-1].weight.clone()
    result = trainer.run()
    assert result["step"] == 2
    assert torch.equal(trainer.recall.blocks[0][0].conv_dw.weight, frozen_before)
    assert torch.equal(trainer.net.head[-1].weight, seg_before)
    assert not torch.equal(trainer.recall.head[-1].weight, head_before)
    exported = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert exported.recall is not None and exported.checkpoint_meta["recall"]["steps"] == 2
    assert torch.equal(exported.head[-1].weight.float(), seg_before.half().float())
    resumed = RecallTrainer(load_recall_config(None, overrides + ["steps=3"]))
    assert resumed.step == 2
    with pytest.raises(ValueError, match="wgisd_holdout"):
        RecallTrainer(load_recall_config(None, overrides + ["wgisd_holdout=[missing]", f"out_dir={tmp_path / 'r2'}"]))
    with pytest.raises(ValueError, match="unknown config key"):
        load_recall_config(None, ["nonsense=1"])


def test_segmenter_training_leaves_the_recall_branch_alone(tmp_path):
    net = tiny_net(recall_channels=8)
    init = save_checkpoint(net, tmp_path / "with_recall.safetensors")
    rng = np.random.default_rng(0)
    _write_scene_dataset(tmp_path, rng)
    config = load_config(None, [f"init={init}", f"datasets=[{{spec: 'wgisd:{tmp_path / 'wgisd'}'}}]",
                                f"out_dir={tmp_path / 'seg'}", "steps=1", "batch_size=2", "device=cpu",
                                "threads=1", "validation.spec=null", "arch_config={input_size: 64}"], TrainConfig)
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.net.recall.state_dict().items()}
    trainer.run()
    for k, v in trainer.net.recall.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- MOIS ----------------------------------------------------------------------------------------------


def test_match_proposals_is_one_to_one():
    g1 = np.zeros((10, 10), bool)
    g1[:5, :5] = True
    g2 = np.zeros((10, 10), bool)
    g2[5:, 5:] = True
    found, unmatched = match_proposals([g1, g1.copy(), np.zeros((10, 10), bool)], [g1, g2], 0.85)
    assert found == [0] and unmatched == 2


class OracleSegmenter(FixedRecall):
    """Segments the instance under the first click exactly; recall map given."""

    labels = None

    def predict(self, state, clicks, prev_mask=None):
        first = clicks[0]
        return (self.labels == self.labels[int(first.y), int(first.x)]).astype(np.float32)


def test_evaluate_image_counts_actions():
    predictor = OracleSegmenter(tiny_net())
    labels = np.zeros((48, 64), np.int32)
    labels[4:16, 4:16], labels[4:16, 30:42], labels[30:42, 4:16], labels[30:42, 40:52] = 1, 2, 3, 4
    labels[44:47, 60:63] = 5  # a speck the recall map misses
    predictor.labels = labels
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    recall_map = (labels > 0).astype(np.float32) * 0.9
    recall_map[labels == 5] = 0
    recall_map[20:26, 20:30] = 0.8  # one false proposal
    predictor.recall_map = recall_map
    results = evaluate_image(predictor, image, labels, "img", np.random.default_rng(0), max_clicks=3,
                             min_scores=[0.5, 0.85], min_area=4)
    strict = results[1]
    assert strict.proposals == strict.matched["0.85"]  # the 0.8 false proposal is below 0.85
    result = results[0]
    assert result.objects == 5
    assert result.noc["0.85"] == [1, 1, 1, 1, 1]
    assert result.actions_without["0.85"] == 5
    # objects 1 and 2 cost one click each; of the three others, the recall finds all but the speck
    # (unless the speck is object 1 or 2); the false proposal costs one deletion.
    assert result.false_proposals["0.85"] == 1
    assert result.actions_with["0.85"] == 2 + (3 - result.matched["0.85"]) + 1
    assert result.matched["0.85"] in (2, 3)
    assert result.proposals == result.matched["0.85"] + 1
    summary = summarize([result])
    assert summary["0.85"]["images"] == 1 and summary["0.85"]["false_proposals_per_image"] == 1
    assert summary["0.85"]["reduction_percent"] == pytest.approx(100 * (5 - result.actions_with["0.85"]) / 5)
    # A single-instance image is skipped.
    assert evaluate_image(predictor, image, (labels == 1).astype(np.int32), "one", np.random.default_rng(0),
                          3, [0.5], 4) is None


def test_mois_command_writes_tables(tmp_path, capsys):
    from model.evaluation.evaluate_mois import main
    _write_scene_dataset(tmp_path, np.random.default_rng(0))
    checkpoint = save_checkpoint(tiny_net(), tmp_path / "net.safetensors", meta={"version": "tiny"})
    assert main(["--checkpoint", str(checkpoint), "--dataset", str(tmp_path / "wgisd"), "--max-clicks", "2",
                 "--min-score", "0.5", "0.7", "--out-dir", str(tmp_path / "out"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "proposal min score 0.5" in out and "proposal min score 0.7" in out and "| 0.85 | 2 | 6 |" in out
    import json
    payload = json.loads((tmp_path / "out" / "mois.json").read_text())
    assert [r["min_score"] for r in payload["runs"]] == [0.5, 0.7] and payload["model_version"] == "tiny"
    no_recall = save_checkpoint(tiny_net(recall_channels=0), tmp_path / "plain.safetensors")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(no_recall), "--dataset", str(tmp_path / "wgisd")])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--dataset", str(tmp_path / "wgisd"), "--images", "missing"])


def test_split_by_cores_gives_each_core_its_nearest_pixels():
    union = np.zeros((6, 10), bool)
    union[1:5, 0:8] = True
    union[0, 9] = True  # a component without a core: its own segment
    cores = np.zeros_like(union)
    cores[2:4, 1] = cores[2:4, 6] = True
    segments = split_by_cores(union, cores)
    assert (segments[1:5, 0:4] == 1).all() and (segments[1:5, 4:8] == 2).all()
    assert segments[0, 9] == 3 and (segments[~union] == 0).all()
    assert (split_by_cores(union, np.zeros_like(union)) == ndimage.label(union)[0]).all()


def test_instance_cores_keep_touching_instances_apart():
    labels = np.zeros((20, 40), np.uint8)
    labels[2:18, 2:20], labels[2:18, 20:38] = 1, 2
    cores = instance_cores(labels, 0.5)
    assert ndimage.label(cores)[1] == 2 and not cores[:, 19:21].any() and cores[10, 10] and cores[10, 29]


def test_oracle_bounds_count_merged_neighbours_and_the_recall_grid(tmp_path, capsys):
    labels = np.zeros((200, 300), np.uint8)
    labels[20:100, 20:100] = 1
    labels[20:100, 100:180] = 2  # touches 1: their perfect component covers both
    labels[120:190, 200:290] = 3
    labels[5:7, 290:292] = 4  # 4 pixels: lost on a coarse grid
    bounds = oracle_bounds(labels, recall_input_size=300)
    assert bounds["instances"] == 4
    assert bounds["components@0.85"] == 2 and bounds["components@0.90"] == 2  # 3 and 4
    assert bounds["grid@0.85"] == 3  # all but the 2x2 speck
    assert bounds["cores@0.85"] == 3  # their cores split 1 from 2; the speck is still lost
    (tmp_path / "wgisd" / "images").mkdir(parents=True)
    (tmp_path / "wgisd" / "instances").mkdir()
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(tmp_path / "wgisd" / "images" / "a.jpg")
    Image.fromarray(labels).save(tmp_path / "wgisd" / "instances" / "a.png")
    assert mois_main(["--oracle", "--dataset", str(tmp_path / "wgisd"), "--recall-input-size", "300",
                      "--out-dir", str(tmp_path / "out")]) == 0
    assert "| 0.85 | 50% | 75% | 75% |" in capsys.readouterr().out and (tmp_path / "out" / "oracle.json").is_file()
    with pytest.raises(SystemExit):
        mois_main(["--oracle", "--dataset", str(tmp_path / "wgisd"), "--core-fraction", "1.5"])


def test_benchmark_recall_row():
    from model.evaluation.benchmark import benchmark_recall, format_recall_table
    predictor = ClickSegPredictor(tiny_net())
    row = benchmark_recall(predictor, (96, 64), repeats=2)
    assert row.size == "96x64" and row.samples == 2
    assert row.click_p50_ms > 0 and row.recall_warm_p50_ms > 0 and row.recall_cold_p50_ms > 0
    assert "96x64" in format_recall_table([row])
