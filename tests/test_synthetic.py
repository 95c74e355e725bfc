"""The synthetic world (synthetic.py): determinism, the release format, disjoint sets, cache
rebuilds, and the three properties of the simulated teacher (raw render features are off, a CIA
fixes them, class names match the texts)."""
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters import ClipImageAdapter
from files import BadInput
from tools import synthetic

SMALL = dict(num_shapes=96, num_points=512, num_test_per_class=4)
TINY = dict(num_shapes=12, num_points=64, num_test_per_class=1, progress=False)
SHAPE_KEYS = {"dataset", "group", "id", "xyz", "rgb", "image_feat", "text", "text_feat",
              "blip_caption", "msft_caption", "blip_caption_feat", "msft_caption_feat",
              "retrieval_text", "retrieval_text_feat"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.build_world(tmp_path_factory.mktemp("w") / "world", **SMALL, seed=0,
                                 progress=False)


def _load(root, data_path):
    assert data_path.startswith("/mnt/data/")
    return np.load(root / data_path[len("/mnt/data/"):], allow_pickle=True).item()


def _train(root):
    """Training entries and their labels (shape i of the generator is of category i % 12)."""
    split = json.loads((root / "meta_data/split/train_all.json").read_text())
    return split, [i % len(synthetic.CATEGORIES) for i in range(len(split))]


def _class_feats(root, folder="modelnet40"):
    feats = np.load(root / "meta_data" / folder / "cat_name_pt_feat.npy", allow_pickle=True).item()
    return torch.tensor(np.concatenate([f["open_clip_text_feat"] for f in feats.values()]))


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    again = synthetic.build_world(tmp_path / "again", **SMALL, seed=0, progress=False)
    assert _files(again) == _files(world)
    other = synthetic.build_world(tmp_path / "other", **SMALL, seed=1, progress=False)
    (a, _), (b, _) = _train(world), _train(other)
    assert {e["id"] for e in a}.isdisjoint(e["id"] for e in b)
    assert not np.array_equal(_load(world, a[0]["data_path"])["xyz"],
                              _load(other, b[0]["data_path"])["xyz"])


def _check_feat_dict(d):
    assert set(d) == {"original", "prompt_avg"}
    for v in d.values():
        assert v.shape == (1, 1280) and v.dtype == np.float32


def test_training_shapes_follow_the_release_format(world):
    split, labels = _train(world)
    assert len(split) == SMALL["num_shapes"]
    assert {e["dataset"] for e in split} == {"Objaverse", "ShapeNet"}
    flags = json.loads((world / "meta_data/gpt4_filtering.json").read_text())
    for e, label in zip(split, labels):
        assert set(e) == {"id", "data_path", "dataset", "group"}
        assert e["data_path"] == f"/mnt/data/{e['dataset']}/{e['group']}/{e['id']}.npy"
        d = _load(world, e["data_path"])
        objaverse = e["dataset"] == "Objaverse"
        assert set(d) == SHAPE_KEYS | ({"thumbnail_feat"} if objaverse else set())
        assert (d["dataset"], d["group"], d["id"]) == (e["dataset"], e["group"], e["id"])
        assert d["xyz"].shape == d["rgb"].shape == (512, 3)
        assert d["xyz"].dtype == d["rgb"].dtype == np.float32 and np.isfinite(d["xyz"]).all()
        assert d["rgb"].min() >= 0 and d["rgb"].max() <= 1
        assert d["image_feat"].shape == (12, 1280) and d["image_feat"].dtype == np.float32
        assert np.allclose(np.linalg.norm(d["image_feat"], axis=1), 1, atol=1e-5)
        if objaverse:
            assert d["thumbnail_feat"].shape == (1280,) and flags[e["id"]]["flag"] in "YN"
        assert d["text"] and all(type(t) is str for t in d["text"] + d["retrieval_text"])
        assert len(d["text_feat"]) == len(d["text"])
        assert len(d["retrieval_text_feat"]) == len(d["retrieval_text"])
        for f in (d["text_feat"] + d["retrieval_text_feat"]
                  + [d["blip_caption_feat"], d["msft_caption_feat"]]):
            _check_feat_dict(f)
        assert type(d["blip_caption"]) is str and d["blip_caption"]
        assert type(d["msft_caption"]) is str
        # tall shapes: height is the stored y axis
        if synthetic.CATEGORIES[label] in ("bottle", "guitar"):
            extent = np.ptp(d["xyz"], axis=0)
            assert extent[1] > max(extent[0], extent[2])
    assert "N" in {f["flag"] for f in flags.values()}
    assert {e["id"] for e in split if e["dataset"] == "Objaverse"} <= set(flags)
    shapes = [_load(world, e["data_path"]) for e in split]
    assert any(not d["msft_caption"] for d in shapes)
    assert any(not d["retrieval_text"] for d in shapes)
    shapenet = json.loads(
        (world / "meta_data/split/ablation/train_shapenet_only.json").read_text())
    assert shapenet == [e for e in split if e["dataset"] == "ShapeNet"]


def test_knn_index_lists_self_first_then_same_category(world):
    split, labels = _train(world)
    knn = np.load(world / "meta_data/point_feat_knn.npy", allow_pickle=True).item()
    assert knn["name"] == [e["id"] for e in split]
    for i, uid in enumerate(knn["name"]):
        idx = knn["index"][uid]
        assert idx[0] == i and len(idx) == min(synthetic.KNN, labels.count(labels[i]))
        assert {labels[j] for j in idx} == {labels[i]}


def test_evaluation_sets_are_complete_and_aligned(world):
    k, names = SMALL["num_test_per_class"], synthetic.CATEGORIES
    for folder in ("modelnet40", "val"):
        clouds = np.load(world / "meta_data" / folder / "test_pc.npy", allow_pickle=True)
        split = json.loads((world / "meta_data" / folder / "test_split.json").read_text())
        assert clouds.dtype == object and len(clouds) == len(split) == k * len(names)
        assert all(set(e) == {"name", "category"} for e in split)
        assert sorted({e["category"] for e in split}) == sorted(names)
        for c in clouds:
            assert c["xyz"].shape == (512, 3) and c["rgb"].shape == (512, 3)
            # ModelNet40 stores rgb on 0-255
            assert 1 < c["rgb"].max() <= 255 and c["rgb"].min() >= 0
        feats = np.load(world / "meta_data" / folder / "cat_name_pt_feat.npy",
                        allow_pickle=True).item()
        assert list(feats) == names
        assert all(f["open_clip_text_feat"].shape == (1, 1280) for f in feats.values())
    lvis = json.loads((world / "meta_data/split/lvis.json").read_text())
    assert len(lvis) == k * len(names)
    assert all(set(e) == {"uid", "data_path", "category", "group"} for e in lvis)
    for e in lvis:
        d = _load(world, e["data_path"])
        assert d["id"] == e["uid"] and d["image_feat"].shape == (12, 1280) and "thumbnail_feat" in d
    lvis_feats = np.load(world / "meta_data/lvis_cat_name_pt_feat.npy")
    assert lvis_feats.shape == (len(names), 1280)
    assert np.allclose(lvis_feats,
                       _class_feats(world).numpy()[[names.index(c) for c in sorted(names)]])


def test_train_test_val_and_lvis_share_no_shape(world):
    split, _ = _train(world)
    lvis = json.loads((world / "meta_data/split/lvis.json").read_text())
    assert {e["id"] for e in split}.isdisjoint(e["uid"] for e in lvis)
    test = json.loads((world / "meta_data/modelnet40/test_split.json").read_text())
    val = json.loads((world / "meta_data/val/test_split.json").read_text())
    assert {e["name"] for e in test}.isdisjoint(e["name"] for e in val)
    digests = [hashlib.sha1(_load(world, e["data_path"])["xyz"].tobytes()).digest()
               for e in split + lvis]
    for folder in ("modelnet40", "val"):
        clouds = np.load(world / "meta_data" / folder / "test_pc.npy", allow_pickle=True)
        digests += [hashlib.sha1(c["xyz"].tobytes()).digest() for c in clouds]
    assert len(set(digests)) == len(digests)


def test_ensure_world_reuses_complete_worlds_and_rebuilds_interrupted_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CACHE", tmp_path / "data")
    root = synthetic.ensure_world(**TINY)
    assert root.parent == tmp_path / "data" and root.name.startswith("synthetic-")
    expected = _files(root)
    real_write = synthetic._write
    monkeypatch.setattr(synthetic, "_write", lambda *a: pytest.fail("a complete world was rebuilt"))
    assert synthetic.ensure_world(**TINY) == root

    # interrupted build: files missing and no marker; and a temp folder left by a killed process
    (root / synthetic.MARKER).unlink()
    victim = next(root.rglob("*.npy"))
    victim.unlink()
    stale = root.parent / f".tmp-{root.name}-999999999"
    stale.mkdir()
    with pytest.raises(pytest.fail.Exception):
        synthetic.ensure_world(**TINY)  # proves the half-written world is not used as it is
    monkeypatch.setattr(synthetic, "_write", real_write)
    assert synthetic.ensure_world(**TINY) == root
    assert _files(root) == expected and not stale.exists()

    # other parameters in the same folder: rebuilt, not reused
    synthetic.ensure_world(root, **{**TINY, "seed": 3})
    assert json.loads((root / synthetic.MARKER).read_text())["seed"] == 3

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput, match="not a synthetic world"):
        synthetic.ensure_world(foreign, **TINY)
    assert (foreign / "notes.txt").exists()


def test_cli_builds_and_rejects_bad_sizes(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--num-shapes", "12", "--num-points", "64",
                           "--num-test-per-class", "1", "--seed", "5"]) == out
    assert str(out) in capsys.readouterr().out and (out / synthetic.MARKER).exists()
    with pytest.raises(BadInput, match="--num-points"):
        synthetic.main(["--out", str(out), "--num-points", "0"])


# ---------------------------------------------------------------------------- the simulated teacher

def _views_and_texts(root, split):
    """Per shape: its 12 view features, and the candidate text features the stage-2 reader chooses
    from."""
    views, texts = [], []
    for e in split:
        d = _load(root, e["data_path"])
        views.append(d["image_feat"])
        cands = [f["prompt_avg"] for f in d["text_feat"]] + [d["blip_caption_feat"]["prompt_avg"]]
        texts.append(np.concatenate(cands + [f["original"] for f in d["retrieval_text_feat"]]))
    return torch.tensor(np.stack(views)), texts


def _retrieval(views, labels, class_feats, adapter=None):
    """Top-1 of every view feature against the class-name features."""
    x = views.reshape(-1, 1280)
    with torch.no_grad():
        x = x if adapter is None else adapter(x)
    pred = (F.normalize(x, dim=-1) @ class_feats.T).argmax(1)
    return (pred == torch.tensor(labels).repeat_interleave(views.shape[1])).float().mean().item()


def test_raw_views_are_off_and_a_clip_image_adapter_fixes_them(world):
    split, labels = _train(world)
    lvis = json.loads((world / "meta_data/split/lvis.json").read_text())
    lvis_labels = [synthetic.CATEGORIES.index(e["category"]) for e in lvis]
    classes = _class_feats(world)
    views, texts = _views_and_texts(world, split)
    held_out, _ = _views_and_texts(world, lvis)
    raw_train, raw_held_out = (_retrieval(views, labels, classes),
                               _retrieval(held_out, lvis_labels, classes))
    # (a) the render gap is real, not total
    assert 0.25 < raw_train < 0.7 and 0.25 < raw_held_out < 0.7

    cia = _train_cia(views, texts, steps=200)  # (b)
    adapted = _retrieval(held_out, lvis_labels, classes, cia)
    assert adapted > raw_held_out + 0.25 and adapted > 0.8, (raw_held_out, adapted)


def _train_cia(views, texts, steps, batch=64):
    """Stage 1 in miniature: a CIA trained with symmetric InfoNCE and a learnable temperature on
    (view, text)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cia, log_scale = (ClipImageAdapter(),
                      torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32)))
    opt = torch.optim.AdamW(list(cia.parameters()) + [log_scale], lr=1e-3)
    threads = torch.get_num_threads()
    # matrices this small run 5-10x slower when two threads share a busy CPU
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            idx = rng.choice(len(views), batch, replace=False)
            img = F.normalize(cia(views[idx, rng.integers(0, views.shape[1], batch)]), dim=-1)
            txt = torch.tensor(np.stack([texts[i][rng.integers(len(texts[i]))] for i in idx]))
            logits, target = log_scale.exp() * img @ F.normalize(txt, dim=-1).T, torch.arange(batch)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return cia


def test_class_name_features_retrieve_the_texts_of_their_category(world):
    split, labels = _train(world)
    classes = _class_feats(world)
    flags = json.loads((world / "meta_data/gpt4_filtering.json").read_text())
    feats, targets = [], []
    for e, label in zip(split, labels):
        d = _load(world, e["data_path"])
        # junk names are filtered
        usable = e["dataset"] == "ShapeNet" or flags[e["id"]]["flag"] == "Y"
        for f in (d["text_feat"] if usable else []) + [d["blip_caption_feat"]]:
            feats.append(f["prompt_avg"][0])
            targets.append(label)
        orig, avg = d["blip_caption_feat"]["original"][0], d["blip_caption_feat"]["prompt_avg"][0]
        # prompt_avg: a close but different version of original
        assert 0.7 < float(orig @ avg) < 0.999
    pred = (F.normalize(torch.tensor(np.stack(feats)), dim=-1) @ classes.T).argmax(1)
    assert (pred == torch.tensor(targets)).float().mean() > 0.9
    assert torch.allclose(classes, _class_feats(world, "val"))
    assert torch.allclose(classes.norm(dim=1), torch.ones(len(classes)), atol=1e-5)


def test_points_are_stored_in_random_order(world):
    """TAMM evaluates on the first N points, so the first half of a cloud must cover the whole
    shape."""
    clouds = np.load(world / "meta_data" / "modelnet40" / "test_pc.npy", allow_pickle=True)
    for cloud in clouds[:10]:
        xyz = cloud["xyz"]
        half = xyz[: len(xyz) // 2]

        def spread(x):  # robust to the scan noise's tails
            return np.percentile(x, 99, 0) - np.percentile(x, 1, 0)

        assert np.all(spread(half) > 0.9 * spread(xyz))
