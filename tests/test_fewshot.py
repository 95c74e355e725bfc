"""The released few-shot protocol (`evaluate.py --fewshot-folds DIR`): Point-BERT's ModelNetFewshot
folds as TAMM reads them (dataset/ModelNetDatasetFewShot.py), written here in that layout:
DIR/{way}way_{shot}shot/{fold}.pkl, each a pickled {"train": [...], "test": [...]} of (points
(N, 6) xyz + normals, label in [0, way), class_id).

    .venv/bin/python -m pytest -q tests/test_fewshot.py
"""
import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import evaluate
import fewshot
from cli import run_cli
from model import CONFIGS, TAMM
from test_evaluate import write_modelnet
from tools import pointclouds

N = 128                      # stored points per shape (the tiny encoder groups 64 patches)
SETTINGS = [(2, 2), (3, 1)]  # (way, shot); 10 folds each
FAMILIES = 4                 # "ModelNet40 classes" the folds draw from


def shape(family, rng):
    """(N, 6) float32 y-up xyz + unit normals of one shape: a rod, a disc, a ball or two blobs, with
    a random size and position (which the reader's normalisation removes) and some noise."""
    u = rng.standard_normal((N, 3))
    if family == 0:
        # along y, the release's up
        xyz = np.stack([0.05 * u[:, 0], rng.uniform(-1, 1, N), 0.05 * u[:, 2]], 1)
    elif family == 1:
        r, a = np.sqrt(rng.uniform(0, 1, N)), rng.uniform(0, 2 * np.pi, N)
        # flat in x-z
        xyz = np.stack([r * np.cos(a), 0.02 * u[:, 1], r * np.sin(a)], 1)
    elif family == 2:
        # a sphere's surface
        xyz = u / np.linalg.norm(u, axis=1, keepdims=True)
    else:
        # two blobs
        xyz = 0.15 * u + np.where(np.arange(N)[:, None] % 2, 1.0, -1.0) * [1.0, 0.0, 0.0]
    xyz = xyz * rng.uniform(0.5, 3.0) + rng.uniform(-5, 5, 3)
    normals = rng.standard_normal((N, 3))
    return np.concatenate([xyz, normals / np.linalg.norm(normals, axis=1, keepdims=True)],
                          1).astype(np.float32)


def write_fold(path, way, shot, seed, n_train=None, n_test=None):
    """One fold file: `way` families as its classes, `shot` training and 20 test shapes each (or
    other counts)."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(FAMILIES, way, replace=False)
    fold = {subset: [(shape(int(c), rng), label, int(c))
                     for label, c in enumerate(classes) for _ in range(count)]
            for subset, count in (("train", shot), ("test", pointclouds.FOLD_QUERIES))}
    for subset, n in (("train", n_train), ("test", n_test)):
        if n is not None:
            fold[subset] = fold[subset][:n]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(fold, f)
    return fold


def write_folds(root, settings=SETTINGS):
    for way, shot in settings:
        for k in range(pointclouds.FOLDS):
            write_fold(os.path.join(root, f"{way}way_{shot}shot", f"{k}.pkl"), way, shot,
                       seed=100 * way + 10 * shot + k)
    return str(root)


@pytest.fixture(autouse=True)
def one_thread():
    """Many small forward passes: on a busy 2-core machine OpenMP's second thread waits for a CPU at
    every parallel region, which made this file 5x slower; one thread computes the same and is
    steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(fold folder, data root with a ModelNet40-layout benchmark, tiny checkpoint with its
    config)."""
    tmp = tmp_path_factory.mktemp("fewshot")
    torch.manual_seed(0)
    m = TAMM(CONFIGS["tiny"])
    ckpt = tmp / "tiny.pt"
    torch.save({"model": m.state_dict(), "config": m.config()}, ckpt)
    return write_folds(tmp / "ModelNetFewshot"), write_modelnet(tmp / "data"), str(ckpt)


def flags(folds, root, ckpt, out):
    """Only the folds: --episodes and --openshape-shots without values turn the other two protocols
    off."""
    return ["--ckpt", ckpt, "--data", root, "--fewshot-folds", folds, "--tasks", "few-shot",
            "--episodes", "--openshape-shots", "--num-points", str(N), "--precision", "fp32",
            "--device", "cpu", "--workers", "0", "--batch-size", "64", "--out", str(out)]


def hand_preprocessed(points):
    """The release's preprocessing written out: xyz only, y/z swapped, centred, divided by the
    largest norm."""
    xyz = points[:, :3].astype(np.float64)[:, [0, 2, 1]]
    xyz = xyz - xyz.mean(0)
    return xyz / np.linalg.norm(xyz, axis=1).max()


def sorted_rows(a):
    return a[np.lexsort(a.T[::-1])]


def test_fold_reader_preprocesses_as_the_release(tmp_path):
    fold = write_fold(str(tmp_path / "2way_2shot" / "0.pkl"), 2, 2, seed=7)
    train, train_y, test, test_y = pointclouds.read_fewshot_fold(
        str(tmp_path / "2way_2shot" / "0.pkl"), 2, 2, seed=3)
    assert (train.shape == (4, N, 6) and test.shape == (40, N, 6)
            and train.dtype == test.dtype == torch.float32)
    assert train_y.tolist() == [label for _, label, _ in fold["train"]] == [0, 0, 1, 1]
    assert test_y.tolist() == [label for _, label, _ in fold["test"]]
    assert (torch.equal(train[..., 3:], torch.zeros(4, N, 3))
            and torch.equal(test[..., 3:], torch.zeros(40, N, 3)))
    # the test shapes' points in their stored order
    for got, (points, _, _) in zip(test, fold["test"]):
        np.testing.assert_allclose(got[:, :3].numpy(), hand_preprocessed(points), atol=1e-6)
    for got, (points, _, _) in zip(train, fold["train"]):  # the training shapes' points shuffled
        expected = hand_preprocessed(points)
        assert not np.allclose(got[:, :3].numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(sorted_rows(got[:, :3].numpy()), sorted_rows(expected),
                                   atol=1e-6)
    again = pointclouds.read_fewshot_fold(str(tmp_path / "2way_2shot" / "0.pkl"), 2, 2, seed=3)
    other = pointclouds.read_fewshot_fold(str(tmp_path / "2way_2shot" / "0.pkl"), 2, 2, seed=4)
    assert (torch.equal(again[0], train) and not torch.equal(other[0], train)
            and torch.equal(other[2], test))


def test_fewshot_settings_finds_every_setting_and_ignores_other_folders(setup, tmp_path):
    folds = shutil.copytree(setup[0], tmp_path / "folds")
    (folds / "notes").mkdir()
    (folds / "README.txt").write_text("not a setting")
    settings = pointclouds.fewshot_settings(str(folds))
    assert sorted(settings) == sorted(SETTINGS)
    assert settings[2, 2] == [str(folds / "2way_2shot" / f"{k}.pkl") for k in range(10)]


def test_evaluate_reports_every_setting_over_its_ten_folds(setup, tmp_path):
    folds, root, ckpt = setup
    r = evaluate.main(flags(folds, root, ckpt, tmp_path))
    fs = r["few_shot"]
    # the release probes the 512-d encoder output (here the tiny 128-d one)
    assert fs["feature"] == "backbone"
    # no episodes, no openshape
    assert sorted(fs["settings"]) == ["folds 2-way 2-shot", "folds 3-way 1-shot"]
    md = open(tmp_path / "eval_tiny.md").read()
    for key, s in fs["settings"].items():
        # four families a random tiny encoder already tells apart; chance is 1/2 or 1/3
        assert s["trials"] == 10 and s["mean"] > 0.8
        # accuracies in [0, 1] with this mean spread at most sqrt(mean (1 - mean))
        assert s["std"] <= math.sqrt(s["mean"] * (1 - s["mean"])) + 1e-12
        # each fold scores 40 or 60 test shapes: the mean of 10 folds is a multiple of 1/400, 1/600
        tests = 20 * int(key.split()[1].split("-")[0])
        assert abs(s["mean"] * 10 * tests - round(s["mean"] * 10 * tests)) < 1e-6
        assert f"| {key} | {100 * s['mean']:.2f} +- {100 * s['std']:.2f} | 10 |" in md
    assert r["zero_shot"] == {}


def test_fold_probe_fits_train_features_and_scores_test_features(setup, monkeypatch):
    """few_shot_folds hands fewshot.linear_probe exactly fold 0's training features and labels to
    fit, and its test features and labels to score: features computed here, each set on its own,
    with the checkpoint's model (not through few_shot_folds)."""
    folds, _, ckpt = setup
    from checkpoint import load_pretrained
    from runtime import DistInfo
    m = load_pretrained(ckpt).eval()
    calls = []

    def spy(train_x, train_y, test_x, test_y, steps, l2):
        calls.append((train_x, train_y, test_x, test_y, steps, l2))
        return 0.625

    monkeypatch.setattr(fewshot, "linear_probe", spy)
    args = type("Args", (), dict(seed=0, batch_size=64, precision="fp32", probe_feature="backbone",
                                 probe_steps=7, probe_l2=0.5))()
    paths = pointclouds.fewshot_settings(folds)[2, 2][:1]
    got = evaluate.few_shot_folds(m, {(2, 2): paths}, args, DistInfo())["folds 2-way 2-shot"]
    assert got == {"mean": 0.625, "std": 0.0, "trials": 1} and len(calls) == 1
    train, train_y, test, test_y = pointclouds.read_fewshot_fold(paths[0], 2, 2, seed=0)
    with torch.no_grad():
        x_train = torch.nn.functional.normalize(m(train)["backbone"].double(), dim=1)
        x_test = torch.nn.functional.normalize(m(test)["backbone"].double(), dim=1)
    got_train_x, got_train_y, got_test_x, got_test_y, steps, l2 = calls[0]
    assert tuple(got_train_x.shape) == (4, 128) and tuple(got_test_x.shape) == (40, 128)
    torch.testing.assert_close(torch.as_tensor(got_train_x), x_train, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(got_test_x), x_test, rtol=1e-5, atol=1e-5)
    assert np.asarray(got_train_y).tolist() == train_y.tolist() == [0, 0, 1, 1]
    assert np.asarray(got_test_y).tolist() == test_y.tolist() and len(test_y) == 40
    assert (steps, l2) == (7, 0.5)


def break_fold(folds, how):
    """Spoil 2way_2shot in a copy of the folds -> the file the error must name."""
    path = os.path.join(folds, "2way_2shot", "0.pkl")
    if how == "missing":
        path = os.path.join(folds, "2way_2shot", "7.pkl")
        os.remove(path)
    elif how == "list":
        with open(path, "wb") as f:
            pickle.dump([("points", 0, 0)], f)
    elif how == "no_test":
        fold = write_fold(path, 2, 2, seed=1)
        with open(path, "wb") as f:
            pickle.dump({"train": fold["train"]}, f)
    elif how == "too_few_train":
        write_fold(path, 2, 2, seed=1, n_train=3)
    elif how == "too_many_test":
        fold = write_fold(path, 2, 2, seed=1)
        with open(path, "wb") as f:
            pickle.dump({**fold, "test": fold["test"] + fold["test"][:1]}, f)
    elif how == "ragged":
        fold = write_fold(path, 2, 2, seed=1)
        fold["test"][5] = (fold["test"][5][0][:10], 0, 0)
        with open(path, "wb") as f:
            pickle.dump(fold, f)
    elif how == "label":
        fold = write_fold(path, 2, 2, seed=1)
        fold["train"][0] = (fold["train"][0][0], 2, 0)
        with open(path, "wb") as f:
            pickle.dump(fold, f)
    elif how == "not_a_pickle":
        with open(path, "wb") as f:
            f.write(b"\x00 truncated")
    return path


@pytest.mark.parametrize("how", ["missing", "list", "no_test", "too_few_train", "too_many_test",
                                 "ragged", "label", "not_a_pickle"])
def test_bad_fold_folder_is_one_line_naming_the_file(setup, tmp_path, capsys, monkeypatch, how):
    """Found where the arguments are parsed: before the model loads (the zero-shot run would come
    first)."""
    folds, root, ckpt = setup
    copy = str(tmp_path / "folds")
    shutil.copytree(os.path.join(folds, "2way_2shot"), os.path.join(copy, "2way_2shot"))
    path = break_fold(copy, how)

    def no_work(*args, **kwargs):
        raise AssertionError("the run started before the bad fold was found")
    monkeypatch.setattr(evaluate, "setup_distributed", no_work)
    monkeypatch.setattr(evaluate, "load_pretrained", no_work)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(evaluate.main, flags(copy, root, ckpt, tmp_path / "out"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and path in err, err
    assert not os.path.exists(tmp_path / "out")  # not even the output folder
