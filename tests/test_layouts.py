"""TAMM's own data layout (configs/Pre-Training/pointbert.yaml) through all three entry points,
in-process.

The tiny synthetic world is in OpenShape's layout; a copy is rearranged into TAMM's: the shapes
under ROOT/data/ (TAMM maps the /mnt/data prefix of data_path to the folder `data` beside
meta_data/), the splits under meta_data/Pre-Training/split/, the benchmarks under
meta_data/Zero-Shot/, gpt4_filtering.json and point_feat_knn.npy left in meta_data/ (where TAMM has
them too), meta_data/val dropped (TAMM has none: --val none). Nothing stays in an OpenShape place,
so a run that works found every file in TAMM's. (The OpenShape layout end to end is
test_train.py's.)

    .venv/bin/python -m pytest -q tests/test_layouts.py
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import data
import evaluate
import files
import train_stage1
import train_stage2
from conftest import TINY_TRAIN

SCAN_POINTS, SCAN_PER_CLASS = 128, 2  # a tiny ScanObjectNN: 2 objects of each of the 15 classes
HOLDOUT = 8                           # stage 1's held-out shapes


def tamm_layout(world, root):
    """A copy of the OpenShape-layout world `world` rearranged into TAMM's layout at `root`."""
    shutil.copytree(world, root)
    meta = os.path.join(root, "meta_data")
    os.makedirs(os.path.join(root, "data"))
    for dataset in ("Objaverse", "ShapeNet"):
        shutil.move(os.path.join(root, dataset), os.path.join(root, "data", dataset))
    os.makedirs(os.path.join(meta, "Pre-Training"))
    shutil.move(os.path.join(meta, "split"), os.path.join(meta, "Pre-Training", "split"))
    os.makedirs(os.path.join(meta, "Zero-Shot", "LVIS"))
    shutil.move(os.path.join(meta, "modelnet40"), os.path.join(meta, "Zero-Shot", "modelnet40"))
    shutil.move(os.path.join(meta, "lvis_cat_name_pt_feat.npy"),
                os.path.join(meta, "Zero-Shot", "LVIS", "lvis_cat_name_pt_feat.npy"))
    shutil.rmtree(os.path.join(meta, "val"))
    # the synthetic world has no ScanObjectNN: write one where TAMM keeps it
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(data.SCANOBJECTNN_CLASSES)), SCAN_PER_CLASS)
    files.save_npy(os.path.join(meta, "Zero-Shot", "scanobjectnn", "xyz_label.npy"),
                  {"xyz": rng.standard_normal((len(labels), SCAN_POINTS, 3)).astype(np.float32),
                   "label": labels})
    files.save_npy(os.path.join(meta, "Zero-Shot", "scanobjectnn", "cat_name_pt_feat.npy"),
                  {c: {"open_clip_text_feat":
                       rng.standard_normal((1, data.CLIP_DIM)).astype(np.float32)}
                   for c in data.SCANOBJECTNN_CLASSES})
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models, small batches: on a busy 2-core machine one thread is several times faster than
    two (OpenMP's second thread waits for a CPU at every parallel region)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tamm_root(tiny_world, tmp_path_factory):
    return tamm_layout(tiny_world, tmp_path_factory.mktemp("tamm") / "root")


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_rearranged_world_is_in_tamm_places_only(tamm_root):
    """What the end-to-end test relies on: every file in TAMM's place and none left in
    OpenShape's."""
    meta = os.path.join(tamm_root, "meta_data")
    for rel in ["Pre-Training/split/train_all.json", "Pre-Training/split/train_no_lvis.json",
                "Pre-Training/split/lvis.json",
                "Pre-Training/split/ablation/train_shapenet_only.json",
                "Zero-Shot/modelnet40/test_split.json", "Zero-Shot/modelnet40/test_pc.npy",
                "Zero-Shot/modelnet40/cat_name_pt_feat.npy",
                "Zero-Shot/LVIS/lvis_cat_name_pt_feat.npy",
                "Zero-Shot/scanobjectnn/xyz_label.npy",
                "Zero-Shot/scanobjectnn/cat_name_pt_feat.npy",
                "gpt4_filtering.json", "point_feat_knn.npy"]:
        assert os.path.isfile(os.path.join(meta, rel)), rel
    for rel in ["meta_data/split", "meta_data/modelnet40", "meta_data/lvis_cat_name_pt_feat.npy",
                "meta_data/val", "Objaverse", "ShapeNet"]:
        assert not os.path.exists(os.path.join(tamm_root, rel)), rel
    entry = read_json(meta, "Pre-Training", "split", "train_all.json")[0]
    assert entry["data_path"].startswith("/mnt/data/")
    assert data.shape_paths([entry], str(tamm_root))[0] == os.path.join(
        tamm_root, "data", entry["data_path"][len("/mnt/data/"):])
    for split in ("train_all", "train_no_lvis", "ablation/train_shapenet_only"):
        assert data.resolve_split(str(tamm_root), split).startswith(
            os.path.join(meta, "Pre-Training", "split"))


def test_train_both_stages_and_evaluate_on_tamms_layout(tamm_root, tmp_path, capsys):
    root, out = str(tamm_root), str(tmp_path / "run")
    meta = os.path.join(root, "meta_data")
    shapes = len(read_json(meta, "Pre-Training", "split", "train_all.json"))

    stage1 = train_stage1.main(["--data", root, "--out", out, "--preset", "demo",
                                "--batch-size", "16", "--holdout", str(HOLDOUT), "--max-steps", "2",
                                "--workers", "0", "--log-every", "1"])
    assert f"stage 1 | {shapes - HOLDOUT} train / {HOLDOUT} held-out" in capsys.readouterr().out
    assert [r["step"] for r in read_log(stage1["run_dir"]) if "loss" in r] == [1, 2]
    assert os.path.isfile(os.path.join(out, "stage1", "cia.pt"))

    # stage 2 with the stage-1 adapter (the default), hard negatives from
    # meta_data/point_feat_knn.npy
    run_dir = train_stage2.main(["--data", root, "--out", out, *TINY_TRAIN, "--max-steps", "2",
                                 "--knn", "--val", "none"])
    assert f"stage 2 | {shapes} shapes" in capsys.readouterr().out
    log = read_log(run_dir)
    steps = [r for r in log if "loss" in r]
    # all shapes read
    assert [r["step"] for r in steps] == [1, 2] and all(r["skipped_shapes"] == 0 for r in steps)
    assert not any(k.startswith("val_") for r in log for k in r)  # --val none
    config = read_json(run_dir, "config.json")["args"]
    assert config["knn"] and config["cia"] == os.path.join(out, "stage1", "cia.pt")

    r = evaluate.main(["--ckpt", os.path.join(run_dir, "latest.pt"), "--data", root,
                       "--tasks", "zero-shot", "--precision", "fp32", "--workers", "0",
                       "--device", "cpu", "--out", str(tmp_path / "eval")])
    lvis = read_json(meta, "Pre-Training", "split", "lvis.json")
    modelnet = read_json(meta, "Zero-Shot", "modelnet40", "test_split.json")
    zs = r["zero_shot"]
    assert sorted(zs) == ["lvis", "modelnet40", "scanobjectnn"]
    assert zs["modelnet40"]["num_samples"] == len(modelnet) == 36
    assert zs["lvis"]["num_samples"] == len(lvis) == 36
    assert zs["modelnet40"]["num_classes"] == zs["lvis"]["num_classes"] == 12
    assert zs["scanobjectnn"]["num_samples"] == 15 * SCAN_PER_CLASS
    assert zs["scanobjectnn"]["num_classes"] == 15
    assert r["num_points"] == 256  # the checkpoint's own training point count
