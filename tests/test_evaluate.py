"""evaluate.py: metrics, distributed counting, few-shot probes, point-cloud readers, checkpoints end
to end, the --labels path with a random-weight open_clip model, and every bad input (one line on
stderr, exit code 2).

    .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import data
import evaluate
import fewshot
import model
from checkpoint import load_pretrained
from cli import run_cli
from files import BadInput
from runtime import setup_distributed
from test_checkpoint import release_checkpoint
from tools import pointclouds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["zebra", "airplane", "mug"]   # dict order, deliberately not sorted
PER_CLASS = (7, 6, 6)                    # 19 shapes: not divisible by 2, 3 or 4 ranks
# stored and evaluated points (the tiny encoder takes 64 patches)
N_POINTS = 128


# ---- fixtures ------------------------------------------------------------------------------------

def write_modelnet(root, seed=0):
    """A tiny ModelNet40-layout benchmark (test_pc.npy dicts with rgb on 0-255, test_split.json,
    class features)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "meta_data", "modelnet40")
    os.makedirs(folder, exist_ok=True)
    clouds, split = [], []
    for c, (name, n) in enumerate(zip(CLASSES, PER_CLASS)):
        for i in range(n):  # each class its own stretched blob, so features differ by class
            xyz = rng.standard_normal((N_POINTS, 3)) * (1 + 2 * np.eye(3)[c]) + 0.05 * i
            clouds.append({"xyz": xyz.astype(np.float32),
                           "rgb": rng.integers(0, 256, (N_POINTS, 3)).astype(np.float32)})
            split.append({"name": f"{name}_{i:04d}", "category": name})
    np.save(os.path.join(folder, "test_pc.npy"), np.array(clouds + [None], dtype=object)[:-1],
            allow_pickle=True)
    with open(os.path.join(folder, "test_split.json"), "w") as f:
        json.dump(split, f)
    feats = {n: {"open_clip_text_feat": rng.standard_normal((1, 1280)).astype(np.float32)}
             for n in CLASSES}
    np.save(os.path.join(folder, "cat_name_pt_feat.npy"), feats, allow_pickle=True)
    return str(root)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(data root, release-layout tiny TAMM checkpoint path, OpenShape-layout tiny checkpoint
    path)."""
    tmp = tmp_path_factory.mktemp("eval")
    root = write_modelnet(tmp / "data")
    tamm, openshape = tmp / "ckpt" / "tamm_tiny.pt", tmp / "ckpt" / "openshape_tiny.pt"
    tamm.parent.mkdir()
    torch.save(release_checkpoint(model.CONFIGS["tiny"]), tamm)
    torch.save(release_checkpoint(model.CONFIGS["tiny"], head_type="openshape"), openshape)
    return root, str(tamm), str(openshape)


def common_flags(root):
    return ["--data", root, "--scaling", "tiny", "--num-points", str(N_POINTS), "--device", "cpu",
            "--workers", "0", "--precision", "fp32", "--batch-size", "4"]


def bad_input(argv, capsys):
    """Run main through run_cli as the command line does -> the stderr text (asserts exit code 2,
    one line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(evaluate.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert (len(err.strip().splitlines()) == 1 and err.startswith("error: ")
            and "Traceback" not in err)
    return err


# ---- zero-shot metrics ---------------------------------------------------------------------------

def test_topk_metrics_hand_computed():
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.2],    # label 0: rank 1
                           [0.5, 0.1, 0.3, 0.4],    # label 1: rank 4
                           [0.1, 0.2, 0.3, 0.0],    # label 2: rank 1
                           [0.3, 0.1, 0.4, 0.2],    # label 0: rank 2
                           [0.1, 0.4, 0.2, 0.3]])   # label 3: rank 2
    labels = torch.tensor([0, 1, 2, 0, 3])
    m = evaluate.topk_metrics(scores, labels)
    assert m["top1"] == pytest.approx(2 / 5)
    assert m["top3"] == pytest.approx(4 / 5)
    assert m["top5"] == pytest.approx(1.0)           # k capped at 4 classes
    # per class top-1: class 0 -> 1/2, class 1 -> 0, class 2 -> 1, class 3 -> 0
    assert m["mean_class_acc"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)


def test_zero_shot_fusion_and_single_branch():
    cls = torch.eye(3)
    feats = {"text": torch.tensor([[1.0, 0.9, 0], [0, 1, 0]]),
             "image": torch.tensor([[0, 1.0, 0], [0, 1, 0]]),
             "label": torch.tensor([1, 1])}
    r = evaluate.zero_shot(feats, cls, alpha=0.5)
    assert r["text"]["top1"] == 0.5 and r["image"]["top1"] == 1.0 and r["fused"]["top1"] == 1.0
    assert evaluate.zero_shot(feats, cls, alpha=0.0)["fused"]["top1"] == 0.5
    assert list(evaluate.zero_shot(feats, cls, single_branch=True)) == ["single"]


# ---- distributed counting ------------------------------------------------------------------------

def test_sharded_encoding_counts_every_sample_once(world):
    root, tamm, _ = world
    ds = data.load_benchmarks(root, N_POINTS)["modelnet40"]
    m = load_pretrained(tamm, scaling="tiny")
    full = evaluate.extract_features(m, data.make_eval_loader(ds, 4))
    assert torch.equal(full["index"], torch.arange(len(ds))) and len(ds) == 19
    for world_size in (2, 4):
        shards = [evaluate.encode_shard(m, data.make_eval_loader(ds, 5, rank, world_size))
                  for rank in range(world_size)]
        assert sum(len(s["index"]) for s in shards) == len(ds)
        merged = evaluate.merge_shards(shards, total=len(ds))
        assert torch.equal(merged["label"], torch.tensor(ds.labels))
        for k in ("backbone", "text", "image"):
            assert torch.allclose(merged[k], full[k], atol=1e-5)
    # more ranks than shapes: the last rank encodes nothing but still contributes correctly shaped
    # tensors
    empty = evaluate.encode_shard(m, data.make_eval_loader(ds, 5, 19, 20))
    assert (empty["text"].shape == (0, 1280) and empty["backbone"].shape == (0, 128)
            and empty["index"].dtype == torch.long)
    assert torch.equal(evaluate.merge_shards([empty] + shards, total=len(ds))["index"],
                       full["index"])
    with pytest.raises(RuntimeError, match="more than one rank"):
        evaluate.merge_shards([shards[0], shards[0]])
    with pytest.raises(RuntimeError, match="gathered"):
        evaluate.merge_shards(shards[1:], total=len(ds))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, argv, out):
    """One torchrun-like rank: the full CLI, then the gathered indices, written to files (queues
    are flaky here)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    root, ckpt = argv[argv.index("--data") + 1], argv[argv.index("--ckpt") + 1]
    ds = data.load_benchmarks(root, N_POINTS)["modelnet40"]
    loader = data.make_eval_loader(ds, 4, info.rank, info.world_size)
    local = len(list(loader.sampler))
    feats = evaluate.extract_features(load_pretrained(ckpt, scaling="tiny"), loader)
    torch.save({"local": local, "index": feats["index"], "text": feats["text"]},
               os.path.join(out, f"feats{rank}.pt"))
    results = evaluate.main(argv)  # the whole command line under the same process group
    with open(os.path.join(out, f"results{rank}.json"), "w") as f:
        json.dump(results, f)


def test_two_process_gloo_run_matches_single_process(world, tmp_path):
    root, tamm, _ = world
    argv = common_flags(root) + ["--ckpt", tamm, "--tasks", "zero-shot", "--out", str(tmp_path)]
    single = evaluate.main(argv)
    mp.spawn(_rank_main, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    single_text = evaluate.extract_features(
        load_pretrained(tamm, scaling="tiny"),
        data.make_eval_loader(data.load_benchmarks(root, N_POINTS)["modelnet40"], 4))["text"]
    gathered = [torch.load(tmp_path / f"feats{rank}.pt") for rank in range(2)]
    assert [g["local"] for g in gathered] == [10, 9]  # each rank encoded its own part...
    for g in gathered:                                # ...and received everything once
        assert (torch.equal(g["index"], torch.arange(19))
                and torch.allclose(g["text"], single_text, atol=1e-5))
    for rank in range(2):
        with open(tmp_path / f"results{rank}.json") as f:
            r = json.load(f)
        assert r["world_size"] == 2
        assert (r["zero_shot"]["modelnet40"]["num_samples"] == 19
                == single["zero_shot"]["modelnet40"]["num_samples"])
        for branch, metrics in single["zero_shot"]["modelnet40"]["branches"].items():
            for k, v in metrics.items():
                got = r["zero_shot"]["modelnet40"]["branches"][branch][k]
                assert got == (v if k in ("per_class_top1", "confusion")
                               else pytest.approx(v, abs=1e-6))


# ---- few-shot ------------------------------------------------------------------------------------

def test_sample_episode_sizes_disjoint_seeded():
    # classes 6 and 7 are too small for 10 + 20
    labels = np.repeat(np.arange(8), [40, 40, 40, 40, 40, 40, 29, 10])
    s, q = fewshot.sample_episode(labels, 5, 10, 20, seed=3)
    assert len(s) == 50 and len(q) == 100 and not set(s) & set(q)
    assert (len(set(labels[s])) == 5 and set(labels[s]) == set(labels[q])
            and not set(labels[s]) & {6, 7})
    assert all((labels[s] == c).sum() == 10 and (labels[q] == c).sum() == 20
               for c in set(labels[s]))
    s2, q2 = fewshot.sample_episode(labels, 5, 10, 20, seed=3)
    assert np.array_equal(s, s2) and np.array_equal(q, q2)
    assert not np.array_equal(s, fewshot.sample_episode(labels, 5, 10, 20, seed=4)[0])
    with pytest.raises(ValueError, match="found 6"):
        fewshot.sample_episode(labels, 7, 10, 20, seed=0)


def test_openshape_split_and_linear_probe_on_separable_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 30)
    centres = rng.standard_normal((6, 64)) * 3
    x = torch.from_numpy(centres[labels] + rng.standard_normal((len(labels), 64)))
    tr, te = fewshot.openshape_split(labels, 4, seed=1)
    assert len(tr) == 24 and len(te) == 156 and not set(tr) & set(te)
    assert fewshot.linear_probe(x[tr], labels[tr], x[te], labels[te]) > 0.95
    res = fewshot.few_shot(fewshot.probe_features({"text": x, "image": x}, "both"), labels,
                            episodes=["5x10", "10x20"], trials=2, shots=[2])
    assert (res["episodes 5-way 10-shot"]["mean"] > 0.95
            and res["episodes 5-way 10-shot"]["trials"] == 2)
    assert "skipped" in res["episodes 10-way 20-shot"]          # only 6 classes
    assert res["openshape 2-shot"]["mean"] > 0.9


# ---- point-cloud readers -------------------------------------------------------------------------

XYZ = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]], np.float32)
RGB8 = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [0, 0, 0]], np.uint8)


def write_ply(path, fmt, colour):
    props = ["property float x", "property float y", "property float z"]
    if colour == "uchar":
        props += ["property uchar red", "property uchar green", "property uchar blue"]
    elif colour == "float":
        props += ["property float red", "property float green", "property float blue"]
    header = ["ply", f"format {fmt} 1.0", "comment written by the test",
              f"element vertex {len(XYZ)}", *props,
              "element face 1", "property list uchar int vertex_indices", "end_header"]
    rgb = RGB8 if colour == "uchar" else RGB8.astype(np.float32) / 255
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode())
        if fmt == "ascii":
            for p, c in zip(XYZ, rgb):
                f.write((" ".join(map(str, list(p) + (list(c) if colour else []))) + "\n").encode())
            f.write(b"3 0 1 2\n")
        else:
            fields = [(a, "<f4") for a in "xyz"] + (
                [(a, "u1" if colour == "uchar" else "<f4") for a in ("red", "green", "blue")]
                if colour else [])
            table = np.empty(len(XYZ), dtype=fields)
            for k, a in enumerate("xyz"):
                table[a] = XYZ[:, k]
            for k, a in enumerate(("red", "green", "blue") if colour else ()):
                table[a] = rgb[:, k]
            f.write(table.tobytes() + np.array([3], "u1").tobytes()
                    + np.array([0, 1, 2], "<i4").tobytes())


@pytest.mark.parametrize("fmt,colour", [("ascii", "uchar"), ("ascii", None),
                                        ("binary_little_endian", "uchar"),
                                        ("binary_little_endian", "float"),
                                        ("binary_little_endian", None)])
def test_ply_reader(tmp_path, fmt, colour):
    path = str(tmp_path / "cloud.ply")
    write_ply(path, fmt, colour)
    xyz, rgb = pointclouds.read_point_cloud(path)
    np.testing.assert_allclose(xyz, XYZ)
    expected = np.full_like(XYZ, 0.4) if colour is None else RGB8 / 255
    np.testing.assert_allclose(rgb, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["a.npy", "b.npy", "c.npz", "d.npz", "e.xyz", "f.txt"])
def test_array_and_text_readers(tmp_path, name):
    path = str(tmp_path / name)
    six = np.concatenate([XYZ, RGB8.astype(np.float32)], 1)  # rgb on 0-255 -> divided by 255
    if name == "a.npy":
        np.save(path, XYZ)
    elif name == "b.npy":
        np.save(path, six)
    elif name == "c.npz":
        np.savez(path, xyz=XYZ, rgb=RGB8 / 255)
    elif name == "d.npz":
        np.savez(path, six)                                  # no known key: the first array
    else:
        np.savetxt(path, XYZ if name.endswith(".xyz") else six, header="x y z r g b")
    xyz, rgb = pointclouds.read_point_cloud(path)
    np.testing.assert_allclose(xyz, XYZ, atol=1e-6)
    colourless = name in ("a.npy", "e.xyz")
    np.testing.assert_allclose(rgb, np.full_like(XYZ, 0.4) if colourless else RGB8 / 255,
                               atol=1e-6)


def test_prepare_points_first_n_resample_and_up_axis():
    xyz = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    rgb = np.full_like(xyz, 0.4)
    first = pointclouds.prepare_points(xyz, rgb, 4, up="z")
    assert first.shape == (4, 6)
    np.testing.assert_allclose(first[:, :3].numpy(), data.normalize(xyz[:4][:, [0, 2, 1]]),
                               atol=1e-6)
    # a z-up file reaches the model unswapped (only centred and scaled)
    centred = xyz[:4] - xyz[:4].mean(0)
    np.testing.assert_allclose(first[:, :3].numpy(),
                               centred / np.linalg.norm(centred, axis=1).max(), atol=1e-6)
    more = pointclouds.prepare_points(xyz, rgb, 25, up="y")
    assert (more.shape == (25, 6)
            and torch.equal(more, pointclouds.prepare_points(xyz, rgb, 25, up="y")))


# ---- checkpoints end to end ----------------------------------------------------------------------

def test_release_checkpoint_end_to_end(world, tmp_path, capsys):
    root, tamm, _ = world
    out = tmp_path / "results"
    capsys.readouterr()
    r = evaluate.main(common_flags(root) + ["--ckpt", tamm, "--out", str(out),
                                            "--episodes", "2x2", "3x3", "--n-query", "3",
                                            "--trials", "2", "--openshape-shots", "1", "2",
                                            "--probe-feature", "both"])
    printed = capsys.readouterr().out
    with open(out / "eval_tamm_tiny.json") as f:
        saved = json.load(f)
    assert saved["zero_shot"] == r["zero_shot"] and saved["head_type"] == "dual"
    zs = saved["zero_shot"]["modelnet40"]
    assert (zs["num_samples"] == 19 and zs["num_classes"] == 3
            and set(zs["branches"]) == {"text", "image", "fused"})
    for m in zs["branches"].values():
        # the confusion matrix counts every shape once, under its true class; top-1 and the
        # per-class accuracies are its diagonal
        assert sum(n for _, _, n in m["confusion"]) == 19
        assert all(sum(n for t, _, n in m["confusion"] if t == c) == PER_CLASS[c]
                   for c in range(3))
        right = {t: n for t, p, n in m["confusion"] if t == p}
        assert m["top1"] == pytest.approx(sum(right.values()) / 19)
        assert m["per_class_top1"] == pytest.approx([right.get(c, 0) / PER_CLASS[c]
                                                     for c in range(3)])
        assert m["mean_class_acc"] == pytest.approx(np.mean(m["per_class_top1"]))
        assert m["top1"] <= m["top3"] == m["top5"] == 1.0  # k capped at the 3 classes
    fs = saved["few_shot"]
    assert fs["benchmark"] == "modelnet40" and fs["feature"] == "both"
    settings = fs["settings"]
    assert sorted(settings) == ["episodes 2-way 2-shot", "episodes 3-way 3-shot",
                                "openshape 1-shot", "openshape 2-shot"]
    # each trial scores n_way * 3 query shapes: the mean of 2 trials is a multiple of 1 / (2 * 3n)
    for key, n_way in (("episodes 2-way 2-shot", 2), ("episodes 3-way 3-shot", 3)):
        s = settings[key]
        assert s["trials"] == 2 and s["classes_in_pool"] == 3
        assert s["mean"] * 6 * n_way == pytest.approx(round(s["mean"] * 6 * n_way), abs=1e-6)
        # two trials a and b: std |a - b| / 2, and both in [0, 1]
        assert s["std"] <= min(s["mean"], 1 - s["mean"]) + 1e-12
    assert settings["openshape 2-shot"]["classes_in_pool"] == 3
    md = (out / "eval_tamm_tiny.md").read_text()
    assert md == evaluate.format_markdown(saved) and md in printed  # the file is what was printed
    assert "| modelnet40 | 19 | 3 | 33.33 | fused |" in md and "episodes 2-way 2-shot" in md


def test_openshape_checkpoint_is_reported_as_one_branch(world, tmp_path):
    root, _, openshape = world
    r = evaluate.main(common_flags(root) + ["--ckpt", openshape, "--out", str(tmp_path),
                                            "--tasks", "zero-shot"])
    assert (r["head_type"] == "openshape"
            and list(r["zero_shot"]["modelnet40"]["branches"]) == ["single"])


def test_own_clouds_dump_features_in_order(world, tmp_path):
    _, tamm, _ = world
    rng = np.random.default_rng(1)
    files = []
    for k, n in enumerate((300, 90)):  # the second has fewer points than asked for: resampled
        files.append(str(tmp_path / f"c{k}.npy"))
        np.save(files[-1], rng.standard_normal((n, 6)).astype(np.float32) % 1)
    out = str(tmp_path / "feats.npz")
    evaluate.main(["--ckpt", tamm, "--scaling", "tiny", "--device", "cpu", "--num-points", "128",
                   "--precision", "fp32", "--pc", *files, "--dump-features", out])
    z = np.load(out)
    assert (z["backbone"].shape == (2, 128) and z["text"].shape == (2, 1280)
            and z["image"].shape == (2, 1280))
    assert list(z["files"]) == files
    m = load_pretrained(tamm, scaling="tiny")
    with torch.no_grad():
        one = m(pointclouds.prepare_points(*pointclouds.read_point_cloud(files[1]), 128, "y")[None])
    # unnormalised, file order
    np.testing.assert_allclose(z["text"][1], one["text"][0].numpy(), atol=1e-5)


TINY_CLIP = "tamm-test-eval-clip"


def test_labels_with_random_weight_open_clip(world, tmp_path, capsys):
    """The CLIP path of --labels with a tiny open_clip model whose random weights are a local file
    (the scores mean nothing, but every step runs: weights file, prompts, fusion, ranking,
    printing)."""
    import open_clip
    cfg = {"embed_dim": 1280,  # the checkpoint's heads output 1280-d, like ViT-bigG-14
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                          "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                        "layers": 1}}
    (tmp_path / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), weights)
    _, tamm, _ = world  # a released-format checkpoint: trained against real CLIP features
    cloud = tmp_path / "chair.npy"
    np.save(cloud, np.random.default_rng(0).random((200, 3)).astype(np.float32))
    labels = tmp_path / "labels.txt"
    labels.write_text("chair\n\ntable\nlamp\n")
    argv = ["--ckpt", tamm, "--scaling", "tiny", "--device", "cpu", "--num-points", "128",
            "--pc", str(cloud), "--clip-model", TINY_CLIP, "--clip-pretrained", str(weights)]
    r = evaluate.main(argv + ["--labels", str(labels)])
    printed = capsys.readouterr().out
    top = r["predictions"][str(cloud)]
    assert (sorted(name for name, _ in top) == ["chair", "lamp", "table"]
            and top[0][1] >= top[1][1] >= top[2][1])
    assert printed.startswith(f"{cloud}: {top[0][0]} ")
    r2 = evaluate.main(argv + ["--labels", "chair, table,lamp"])
    assert r2["predictions"][str(cloud)] == top


# ---- bad input: one line on stderr, exit code 2 --------------------------------------------------

def test_checkpoint_of_another_size_or_kind(world, tmp_path, capsys):
    root, tamm, _ = world
    err = bad_input(["--ckpt", tamm, "--scaling", "1", "--data", root, "--device", "cpu",
                     "--out", str(tmp_path)], capsys)
    assert "tamm_tiny.pt" in err and "wrong model size" in err
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert "not a checkpoint of this project" in bad_input(
        ["--ckpt", str(other), "--data", root, "--device", "cpu"], capsys)


def test_corrupt_checkpoint(world, tmp_path, capsys):
    root, tamm, _ = world
    broken = tmp_path / "broken.pt"
    broken.write_bytes(open(tamm, "rb").read()[:2000])
    assert "broken.pt" in bad_input(["--ckpt", str(broken), "--data", root, "--device", "cpu"],
                                    capsys)


def test_bad_point_clouds(world, tmp_path, capsys):
    _, tamm, _ = world
    ply = tmp_path / "bad.ply"
    ply.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 2\nproperty flot x\nend_header\n0\n1\n")
    err = bad_input(["--ckpt", tamm, "--pc", str(ply), "--labels", "a,b"], capsys)
    assert "bad.ply" in err and "bad PLY header" in err
    ply.write_bytes(b"PLY?\x00\x01 binary junk")
    assert "bad.ply" in bad_input(["--ckpt", tamm, "--pc", str(ply), "--labels", "a,b"], capsys)
    trunc = tmp_path / "trunc.ply"
    trunc.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 100\n"
                      b"property float x\nproperty float y\nproperty float z\nend_header\n"
                      + b"\x00" * 40)
    assert "truncated" in bad_input(["--ckpt", tamm, "--pc", str(trunc), "--labels", "a"], capsys)
    obj = tmp_path / "mesh.obj"
    obj.write_text("v 0 0 0\n")
    with pytest.raises(BadInput, match="mesh.obj: unknown point-cloud format"):
        pointclouds.read_point_cloud(str(obj))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((5, 3), np.nan, np.float32))
    assert "NaN" in bad_input(["--ckpt", tamm, "--pc", str(nan), "--labels", "a"], capsys)


def test_empty_labels(world, tmp_path, capsys):
    _, tamm, _ = world
    cloud = tmp_path / "c.npy"
    np.save(cloud, XYZ)
    assert "no labels" in bad_input(["--ckpt", tamm, "--pc", str(cloud), "--labels", " , ,"],
                                    capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no labels" in bad_input(["--ckpt", tamm, "--pc", str(cloud), "--labels", str(empty)],
                                    capsys)


def test_unwritable_output_folder(world, tmp_path, capsys):
    root, tamm, _ = world
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root ignores permission bits; a folder below a regular file cannot be created by anyone
    target = locked / "out" if os.geteuid() != 0 else tmp_path / "a-file" / "out"
    (tmp_path / "a-file").write_text("")
    err = bad_input(["--ckpt", tamm, "--data", root, "--out", str(target)], capsys)
    assert ("not writable" in err or "is a file, not a folder" in err) and str(target) in err
    assert not list(locked.iterdir())


def test_released_name_without_network_is_fast(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))    # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = bad_input(["--ckpt", "tamm-ensemble", "--out", str(tmp_path)], capsys)
    assert "zhihao406/tamm-models/tamm_pointbert_ensemble.pt" in err and "HF_HUB_OFFLINE" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")        # nothing listens there
    err = bad_input(["--ckpt", "openshape-pointbert", "--out", str(tmp_path)], capsys)
    assert "cannot reach" in err and "OpenShape/openshape-pointbert-vitg14-rgb" in err
    assert "no such file" in bad_input(["--ckpt", str(tmp_path / "missing.pt"),
                                        "--out", str(tmp_path)], capsys)


def test_command_line_exit_code_and_no_traceback(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    # a valid data root: the checkpoint is the only thing wrong
    root = write_modelnet(tmp_path / "data")
    proc = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(broken), "--data", root],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "broken.pt" in proc.stderr
