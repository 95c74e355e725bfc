"""The method itself, checked by behaviour: tests that fail when TAMM is implemented wrongly.

- Stage 2 pairs each head with its own target (IAA with the image views, TAA with the text) and
  training lifts the fused zero-shot accuracy far above an untrained model's: one short stage-2 run
  on the tiny synthetic world, shared by those tests (module fixture `trained`).
- The augmentation draws stay in OpenShape's ranges and cover them (data.augment_points).
- The paper's constants as the commands use them: alpha 0.5 in evaluate.py's fused score, the CIA's
  0.2 / 0.8 mix in train_stage1.py's cia.pt, the heads' dropouts and the temperature's init and cap
  in the model train_stage2.py builds.
- The few-shot probe is fitted on the training shapes only (the folds protocol's hand-off to it:
  tests/test_fewshot.py).
- Grouping gives the same neighbours under bf16 autocast as in fp32.

tests/mutations.py breaks the code each test guards and checks that the test then fails.

    .venv/bin/python -m pytest -q tests/test_method.py
"""
import copy
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
import fewshot
import grouping
import model
import train_stage1
import train_stage2
from checkpoint import load_cia, load_pretrained
from conftest import TINY_TRAIN

POINTS = 256                                  # TINY_TRAIN's --num-points
BENCHMARKS = ("modelnet40", "lvis", "val")    # the tiny world's zero-shot sets: 3 x 36 shapes


# ---- one short stage-2 run, shared ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """16 epochs of stage 2 (96 steps, dual heads, no CIA) on the tiny world, with the TAMM that
    train_stage2.main builds recorded as it is built -> dict(root, ckpt path, loaded model, built
    model, its temperature at construction)."""
    out = tmp_path_factory.mktemp("method")
    built = []

    def spy(*args, **kwargs):
        m = model.TAMM(*args, **kwargs)
        built.append((m, m.scale().item()))
        return m

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_stage2, "TAMM", spy)
        run_dir = train_stage2.main(["--data", str(tiny_world), "--out", str(out), "--no-cia",
                                     "--val", "none", *TINY_TRAIN, "--epochs", "16",
                                     "--lr", "3e-3"])
    assert len(built) == 1
    ckpt = os.path.join(run_dir, "latest.pt")
    return dict(root=str(tiny_world), ckpt=ckpt, model=load_pretrained(ckpt),
                built=built[0][0], initial_scale=built[0][1])


def mean_cos(a, b):
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def test_each_head_is_aligned_with_its_own_target(trained):
    """IAA(f) ends closer to the shape's image views than TAA(f) is, and TAA(f) closer to its text
    than IAA(f) is: the loss pairs IAA with the views and TAA with the text, not the other way."""
    ds = data.TrainTriplets(trained["root"], "train_all", num_points=POINTS, augment=False)
    items = [ds[i] for i in range(48)]
    points = torch.stack([x["points"] for x in items])              # (48, 256, 6)
    views = torch.stack([x["image_feat"] for x in items])           # (48, 4, 1280)
    text = torch.stack([x["text_feat"] for x in items])             # (48, 1280)
    has_text = torch.stack([x["has_text"] for x in items])
    assert has_text.sum() >= 24
    with torch.no_grad():
        out = trained["model"](points)
    image_head, text_head = out["image"][:, None], out["text"][:, None]
    iaa_view, taa_view = mean_cos(image_head, views), mean_cos(text_head, views)
    taa_text = mean_cos(out["text"][has_text], text[has_text])
    iaa_text = mean_cos(out["image"][has_text], text[has_text])
    assert iaa_view > taa_view + 0.01, (iaa_view, taa_view)
    assert taa_text > iaa_text + 0.01, (taa_text, iaa_text)


def pooled_zero_shot(m, root):
    """Fused zero-shot top-1 over the tiny world's modelnet40, lvis and val shapes pooled (108
    shapes, 12 classes; lvis lists its classes in another order, so its labels are mapped)."""
    sets = data.load_benchmarks(root, POINTS, names=BENCHMARKS)
    names = sets["modelnet40"].class_names
    class_feat = sets["modelnet40"].class_feat
    pooled = {"text": [], "image": [], "label": []}
    for benchmark in sets.values():
        rows = [benchmark.class_names.index(n) for n in names]
        assert torch.equal(benchmark.class_feat[rows], class_feat)  # the same class features
        feats = evaluate.extract_features(m, data.make_eval_loader(benchmark, 36))
        pooled["text"].append(feats["text"])
        pooled["image"].append(feats["image"])
        pooled["label"].append(torch.tensor([names.index(benchmark.class_names[int(y)])
                                             for y in feats["label"]]))
    pooled = {k: torch.cat(v) for k, v in pooled.items()}
    assert len(pooled["label"]) == 108 and len(names) == 12
    return evaluate.zero_shot(pooled, class_feat)["fused"]["top1"]


def test_training_lifts_zero_shot_far_above_an_untrained_model(trained):
    """Chance is 1/12: an untrained model stays near it (about 0.08), 16 epochs reach about 0.4."""
    torch.manual_seed(0)
    untrained = pooled_zero_shot(model.TAMM(model.CONFIGS["tiny"]).eval(), trained["root"])
    top1 = pooled_zero_shot(trained["model"], trained["root"])
    assert untrained <= 0.15 and top1 >= 0.25, (untrained, top1)


# ---- the paper's constants as the commands use them ----------------------------------------------

def test_stage2_builds_the_papers_heads_and_temperature(trained):
    """The TAMM that train_stage2.main builds: dropout 0.5 in the image head (IAA), 0.2 in the text
    head (TAA), temperature 14.28 at the start and clamped at 100."""
    m = trained["built"]
    dropouts = {name: [mod.p for mod in head.modules() if isinstance(mod, nn.Dropout)]
                for name, head in (("image", m.adapters.image), ("text", m.adapters.text))}
    assert dropouts == {"image": [0.5, 0.5], "text": [0.2, 0.2]}
    assert trained["initial_scale"] == pytest.approx(14.28, abs=1e-4)
    m = copy.deepcopy(m)
    with torch.no_grad():
        m.logit_scale.fill_(math.log(1000.0))
    m.clamp_logit_scale_()
    assert m.scale().item() == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(math.log(50.0))
    m.clamp_logit_scale_()
    assert m.scale().item() == pytest.approx(50.0, rel=1e-5)


def test_stage1_default_adapter_mixes_point_two_of_the_mlp(tiny_world, tmp_path):
    """train_stage1.py without --ratio writes a cia.pt whose adapter computes 0.2 A(x) + 0.8 x,
    A the ReLU MLP of its stored weights."""
    train_stage1.main(["--data", str(tiny_world), "--out", str(tmp_path), "--preset", "demo",
                       "--max-steps", "1", "--batch-size", "16", "--holdout", "8"])
    path = tmp_path / "stage1" / "cia.pt"
    state = torch.load(path, weights_only=True)["cia"]
    x = torch.randn(5, 1280, generator=torch.Generator().manual_seed(0))
    mlp = F.relu(F.relu(x @ state["fc.0.weight"].T) @ state["fc.2.weight"].T)
    assert mlp.abs().sum() > 0
    with torch.no_grad():
        got = load_cia(str(path))(x)
    torch.testing.assert_close(got, 0.2 * mlp + 0.8 * x, rtol=1e-5, atol=1e-5)


def hand_confusion(feats, class_feat, alpha):
    """Counter of (true, predicted) for the score cos(text, T_c) + alpha cos(image, T_c)."""
    classes = F.normalize(class_feat, dim=-1)
    scores = (F.normalize(feats["text"], dim=-1) @ classes.T
              + alpha * F.normalize(feats["image"], dim=-1) @ classes.T)
    return Counter(zip(feats["label"].tolist(), scores.argmax(1).tolist()))


def test_evaluate_fuses_the_branches_with_alpha_one_half(trained, tmp_path):
    """evaluate.py's fused predictions (its confusion matrices) are those of text + 0.5 image
    computed here from the same features, and not those of alpha 0 or 1, which differ on these
    shapes."""
    r = evaluate.main(["--ckpt", trained["ckpt"], "--data", trained["root"], "--benchmarks",
                       *BENCHMARKS, "--tasks", "zero-shot", "--device", "cpu", "--workers", "0",
                       "--precision", "fp32", "--batch-size", "8", "--out", str(tmp_path)])
    assert r["alpha"] == 0.5
    sets = data.load_benchmarks(trained["root"], POINTS, names=BENCHMARKS)
    differs = {0.0: False, 1.0: False}
    for name, benchmark in sets.items():
        feats = evaluate.extract_features(trained["model"], data.make_eval_loader(benchmark, 8))
        reported = Counter({(t, p): n for t, p, n in
                            r["zero_shot"][name]["branches"]["fused"]["confusion"]})
        assert reported == hand_confusion(feats, benchmark.class_feat, 0.5), name
        for alpha in differs:
            differs[alpha] |= reported != hand_confusion(feats, benchmark.class_feat, alpha)
    assert all(differs.values()), differs  # the check above tells 0.5 from 0 and from 1


# ---- augmentation ranges -------------------------------------------------------------------------

def draws(op, xyz, n, seed=0):
    return [data.augment_points(xyz.copy(), np.random.default_rng([seed, i]), ops=(op,))
            for i in range(n)]


def test_small_rotation_angles_have_sigma_0_06_clipped_at_0_18():
    """On the identity the op returns its matrix M = Rz(az) Ry(ay) Rx(ax); its angles are within
    +-0.18 rad, reach the clip, and spread with a standard deviation near 0.06."""
    angles = []
    for m in draws("rotate_small", np.eye(3, dtype=np.float32), 2000):
        m = m.astype(np.float64)
        ax = math.atan2(m[2, 1], m[2, 2])
        ay = -math.asin(m[2, 0])
        az = math.atan2(m[1, 0], m[0, 0])
        rebuilt = data.rotation_z(az) @ data.rotation_y(ay) @ data.rotation_x(ax)
        np.testing.assert_allclose(rebuilt, m, atol=1e-6)
        angles.append((ax, ay, az))
    angles = np.array(angles)
    assert np.abs(angles).max() <= 0.18 + 1e-5
    assert np.abs(angles).max() > 0.17          # the clip, not something tighter
    std = angles.std(0)
    assert ((0.04 <= std) & (std <= 0.08)).all(), std


def test_scale_draws_lie_in_0_8_to_1_25_and_cover_it():
    scales = np.array([s[0, 0] for s in draws("scale", np.ones((1, 3), np.float32), 2000)])
    assert scales.min() >= 0.8 - 1e-6 and scales.max() <= 1.25 + 1e-6
    assert scales.min() < 0.82 and scales.max() > 1.23


def test_shift_draws_lie_within_0_1_per_axis_and_cover_it():
    shifts = np.concatenate(draws("shift", np.zeros((1, 3), np.float32), 2000))   # (2000, 3)
    assert np.abs(shifts).max() <= 0.1 + 1e-6
    assert (shifts.min(0) < -0.095).all() and (shifts.max(0) > 0.095).all()
    assert not np.allclose(shifts[:, 0], shifts[:, 1])  # one draw per axis


def test_dropout_collapses_up_to_seven_eighths_of_the_points_onto_point_0():
    """The drop ratio is drawn in [0, 0.875) per cloud: over 400 clouds of 1000 points the share of
    points moved onto point 0 reaches above 0.8 but never 0.9; the count stays 1000."""
    xyz = np.random.default_rng(1).standard_normal((1000, 3)).astype(np.float32)
    fractions = []
    for cloud in draws("dropout", xyz, 400):
        assert cloud.shape == (1000, 3)
        np.testing.assert_array_equal(cloud[0], xyz[0])
        kept = (cloud == xyz).all(1)
        moved = (cloud[1:] == xyz[0]).all(1)
        assert (kept[1:] | moved).all()             # a point is either kept or on point 0
        fractions.append(moved.mean())
    fractions = np.array(fractions)
    assert 0.8 < fractions.max() <= 0.9, fractions.max()
    assert 0.38 < fractions.mean() < 0.5, fractions.mean()  # the ratio's mean, 0.4375


# ---- few-shot probes -----------------------------------------------------------------------------

def test_linear_probe_never_fits_the_test_shapes():
    """One test shape along a direction no training shape uses: a probe fitted on the training
    shapes alone predicts the same class whatever its label, so exactly one label scores 1. A probe
    that also fitted the test shape would follow its label and score 1 for every label."""
    rng = np.random.default_rng(0)
    train_x = np.zeros((15, 4))
    train_y = np.repeat([0, 1, 2], 5)
    train_x[np.arange(15), train_y] = 1
    train_x[:, :3] += 0.1 * rng.standard_normal((15, 3))
    outlier = np.array([[0.0, 0.0, 0.0, 1.0]])
    accuracies = [fewshot.linear_probe(train_x, train_y, outlier, np.array([c]))
                  for c in range(3)]
    assert sorted(accuracies) == [0.0, 0.0, 1.0], accuracies
    # and the probe does learn the training classes
    assert fewshot.linear_probe(train_x, train_y, train_x, train_y) == 1.0


# ---- grouping under autocast ---------------------------------------------------------------------

def test_grouping_neighbours_are_the_same_under_bf16_autocast(monkeypatch):
    """The ball query must see fp32 distances whatever the autocast: a bf16 matmul would move points
    across the radius. The neighbour indices of a forward under bf16 autocast equal those in fp32
    (and a bf16 ball query would give other indices on this cloud)."""
    calls = []
    real = grouping.ball_query

    def spy(xyz, centres, radius, k, *rest, **kw):
        out = real(xyz, centres, radius, k, *rest, **kw)
        calls.append((xyz, centres, radius, k, out))
        return out

    monkeypatch.setattr(grouping, "ball_query", spy)
    torch.manual_seed(0)
    enc = model.PointBert(model.CONFIGS["tiny"]).eval()
    g = torch.Generator().manual_seed(0)
    xyz = torch.randn(2, 512, 3, generator=g)
    pts = torch.cat([xyz / xyz.norm(dim=-1).max(), torch.rand(2, 512, 3, generator=g)], -1)
    with torch.no_grad():
        enc(pts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc(pts)
    assert len(calls) == 2
    fp32, bf16 = calls[0][-1], calls[1][-1]
    assert calls[1][0].dtype == torch.float32 and torch.equal(fp32, bf16)
    # the guard matters here: the same query with bf16 distances picks other neighbours
    xyz, centres, radius, k, _ = calls[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(real(xyz, centres, radius, k), fp32)
