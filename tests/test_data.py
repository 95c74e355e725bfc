"""data.py on tiny fixtures written here in the exact OpenShape release format (and TAMM's folder
layout).

Feature vectors are filled with a code number so a test can tell which view or text the reader
picked: image views 100 + v, thumbnail 99, name texts 200 + k ("original") / 300 + k
("prompt_avg"), BLIP 400/401, MSFT 500/501, retrieved texts 600 + k / 700 + k.
"""
import json
import os
import warnings

import numpy as np
import pytest
import torch

import data
from files import BadInput

D = 16          # CLIP width of the fixtures (the readers take clip_dim)
N_STORED = 64   # points per stored shape
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def feat(code):
    return np.full((1, D), float(code), np.float32)


def make_shape(uid, dataset="ShapeNet", texts=("a chair",), blip="", msft="", retrieval=(),
               n=N_STORED, views=12, seed=0):
    rng = np.random.default_rng(seed)
    shape = {"dataset": dataset, "group": "g0", "id": uid,
             "xyz": (rng.standard_normal((n, 3)) * [1, 2, 3] + [5, 6, 7]).astype(np.float32),
             "rgb": rng.random((n, 3)).astype(np.float32),
             "image_feat": np.stack([np.full(D, 100 + v, np.float32) for v in range(views)]),
             "text": list(texts),
             "text_feat": [{"original": feat(200 + k), "prompt_avg": feat(300 + k)}
                           for k in range(len(texts))],
             "blip_caption": blip,
             "blip_caption_feat": {"original": feat(400), "prompt_avg": feat(401)},
             "msft_caption": msft,
             "msft_caption_feat": {"original": feat(500), "prompt_avg": feat(501)},
             "retrieval_text": list(retrieval),
             "retrieval_text_feat": [{"original": feat(600 + k), "prompt_avg": feat(700 + k)}
                                     for k in range(len(retrieval))]}
    if dataset == "Objaverse":
        shape["thumbnail_feat"] = np.full(D, 99, np.float32)
    return shape


def save(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, obj, allow_pickle=True)


def save_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def shape_file(root, shape):
    """Where the release keeps a shape (under /mnt/data), mapped to root."""
    return os.path.join(root, "objaverse-processed", "merged_for_training_final", shape["dataset"],
                        shape["group"], shape["id"] + ".npy")


MODELNET_CLASSES = ["zebra", "airplane", "mug"]   # dict order, deliberately not sorted


def write_release(root, shapes, layout="openshape", flags=None, knn=None):
    """A miniature release: per-shape pickled dicts, split JSONs with /mnt/data paths, GPT-4 flags,
    knn file, ModelNet40, ScanObjectNN (no rgb) and Objaverse-LVIS, in the OpenShape or TAMM folder
    layout. TAMM's (configs/Pre-Training/pointbert.yaml): splits under
    meta_data/Pre-Training/split/, benchmarks under meta_data/Zero-Shot/ (LVIS features in
    Zero-Shot/LVIS/), gpt4_filtering.json and point_feat_knn.npy in meta_data/, and the shapes in
    data/ beside meta_data/ (TAMM maps /mnt/data to data)."""
    root = str(root)
    tamm = layout == "tamm"
    meta = os.path.join(root, "meta_data", "Pre-Training" if tamm else "")
    zero = os.path.join(root, "meta_data", "Zero-Shot" if tamm else "")
    shapes_root = os.path.join(root, "data") if tamm else root
    split = []
    for s in shapes:
        save(shape_file(shapes_root, s), s)
        rel = os.path.relpath(shape_file(shapes_root, s), shapes_root)
        split.append({"id": s["id"], "data_path": f"/mnt/data/{rel}", "dataset": s["dataset"],
                      "group": s["group"]})
    save_json(os.path.join(meta, "split", "train_all.json"), split)
    save_json(os.path.join(meta, "split", "ablation", "train_shapenet_only.json"),
              [e for e in split if e["dataset"] == "ShapeNet"])
    save_json(os.path.join(root, "meta_data", "gpt4_filtering.json"),
              {s["id"]: {"flag": (flags or {}).get(s["id"], "Y"), "category": "x"} for s in shapes})
    if knn is not None:
        save(os.path.join(root, "meta_data", "point_feat_knn.npy"), knn)
    rng = np.random.default_rng(1)
    # ModelNet40: object array of {xyz, rgb on 0-255}, split aligned with it, class features in
    # dict order.
    pcs = np.empty(3, dtype=object)
    pcs[:] = [{"xyz": rng.standard_normal((N_STORED, 3)).astype(np.float32),
               "rgb": np.full((N_STORED, 3), 100.0 + k, np.float32)} for k in range(3)]
    save(os.path.join(zero, "modelnet40", "test_pc.npy"), pcs)
    save_json(os.path.join(zero, "modelnet40", "test_split.json"),
              [{"name": f"m{k}", "category": c}
               for k, c in enumerate(["mug", "zebra", "airplane"])])
    save(os.path.join(zero, "modelnet40", "cat_name_pt_feat.npy"),
         {c: {"open_clip_text_feat": feat(k)} for k, c in enumerate(MODELNET_CLASSES)})
    # ScanObjectNN: (M, 32, 3) without rgb; the feature file lists classes in an order unlike the
    # labels'.
    save(os.path.join(zero, "scanobjectnn", "xyz_label.npy"),
         {"xyz": rng.standard_normal((3, 32, 3)).astype(np.float32), "label": np.array([0, 14, 3])})
    save(os.path.join(zero, "scanobjectnn", "cat_name_pt_feat.npy"),
         {c: {"open_clip_text_feat": feat(k)}
          for k, c in reversed(list(enumerate(data.SCANOBJECTNN_CLASSES)))})
    # Objaverse-LVIS: per-shape files referenced with /mnt/data paths; classes = sorted unique
    # categories.
    lvis = []
    for k, cat in enumerate(["zebra", "apple", "zebra", "mug"]):
        s = make_shape(f"lvis{k}", dataset="Objaverse", seed=10 + k)
        save(shape_file(shapes_root, s), s)
        lvis.append({"uid": s["id"], "category": cat, "group": "g0",
                     "data_path": ("/mnt/data/"
                                   + os.path.relpath(shape_file(shapes_root, s), shapes_root))})
    save_json(os.path.join(meta, "split", "lvis.json"), lvis)
    save(os.path.join(zero, "LVIS" if tamm else "", "lvis_cat_name_pt_feat.npy"),
         np.stack([np.full(D, k, np.float32) for k in range(3)]))
    return root


def default_shapes():
    return [make_shape(f"obj{k}", "Objaverse", texts=("name", "other"), blip="a blip",
                       retrieval=("r0", "r1"), seed=k) for k in range(6)] + \
           [make_shape(f"sn{k}", "ShapeNet", texts=("t0", "t1", "t2"), seed=20 + k)
            for k in range(6)]


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path / "root", default_shapes())


def triplets(root, **kw):
    kw = {"num_points": 32, "clip_dim": D, **kw}
    return data.TrainTriplets(root, **kw)


def one_shape(tmp_path, shape, flags=None, **kw):
    """A release holding only `shape`, and its TrainTriplets."""
    root = write_release(tmp_path / "one", [shape], flags=flags)
    return triplets(root, **kw)


def codes(x):
    """The code number of each feature row (all entries of a fixture feature are equal)."""
    x = torch.as_tensor(x).reshape(-1, D)
    return [int(v) for v in x[:, 0]]


# ---- training triplets ---------------------------------------------------------------------------

def test_train_sample_format(release):
    ds = triplets(release)
    assert len(ds) == 12
    s = ds[0]
    assert s["points"].shape == (32, 6) and s["points"].dtype == torch.float32
    assert s["image_feat"].shape == (4, D) and s["image_feat"].dtype == torch.float32
    assert s["text_feat"].shape == (D,) and s["text_feat"].dtype == torch.float32
    assert s["has_text"].dtype == torch.bool and bool(s["has_text"])
    assert s["index"] == 0
    assert s["valid"].dtype == torch.bool and bool(s["valid"])
    batch = torch.utils.data.default_collate([ds[i] for i in range(5)])
    assert batch["points"].shape == (5, 32, 6) and batch["image_feat"].shape == (5, 4, D)
    assert batch["text_feat"].shape == (5, D) and batch["has_text"].shape == (5,)
    assert batch["index"].tolist() == [0, 1, 2, 3, 4] and batch["valid"].all()


def test_prefix_mapping_and_split_forms(release, tmp_path):
    assert data.map_path("/mnt/data/a/b.npy", "/r") == "/r/a/b.npy"
    # only a whole path component
    assert data.map_path("/mnt/database/x.npy", "/r") == "/mnt/database/x.npy"
    assert data.map_path("rel/x.npy", "/r") == "/r/rel/x.npy"
    assert data.map_path("/data/x.npy", "/r", prefix="/data") == "/r/x.npy"
    ds = triplets(release)
    assert all(p.startswith(release) and os.path.exists(p) for p in ds.paths)
    # the same split as an explicit path, and the ablation split by name
    by_path = triplets(release, split=os.path.join(release, "meta_data/split/train_all.json"))
    assert by_path.paths == ds.paths
    assert len(triplets(release, split="ablation/train_shapenet_only")) == 6
    # a split written with another prefix
    entries = json.load(open(os.path.join(release, "meta_data/split/train_all.json")))
    for e in entries:
        e["data_path"] = e["data_path"].replace("/mnt/data", "/cluster/shapes")
    save_json(str(tmp_path / "moved.json"), entries)
    moved = triplets(release, split=str(tmp_path / "moved.json"), path_prefix="/cluster/shapes")
    assert moved.paths == ds.paths and moved[3] is not None


def test_training_points_are_normalised_and_z_up(release):
    ds = triplets(release, augmentations=(), rgb_drop_prob=0.0)
    stored = np.load(ds.paths[7], allow_pickle=True).item()
    pts = ds[7]["points"].numpy()
    # rgb is untouched here, so it identifies which stored points were sampled (a random subset, no
    # repeats)
    rows = [int(np.argmin(np.abs(stored["rgb"] - c).sum(1))) for c in pts[:, 3:]]
    assert len(set(rows)) == 32 and np.allclose(stored["rgb"][rows], pts[:, 3:])
    sub = stored["xyz"][rows] - stored["xyz"][rows].mean(0)
    scale = np.linalg.norm(sub, axis=1).max()
    assert np.allclose(pts[:, 0], sub[:, 0] / scale, atol=1e-5)
    assert np.allclose(pts[:, 1], sub[:, 2] / scale, atol=1e-5)   # stored z -> y
    assert np.allclose(pts[:, 2], sub[:, 1] / scale, atol=1e-5)   # stored y (up) -> z
    assert np.isclose(np.linalg.norm(pts[:, :3], axis=1).max(), 1, atol=1e-5)


def test_augmentation_switches(release):
    base = triplets(release, augmentations=(), rgb_drop_prob=0.0)[7]["points"]
    # rotation about z keeps the up coordinate and the distance to the axis
    rz = triplets(release, augmentations=("rotate_z",), rgb_drop_prob=0.0)[7]["points"]
    assert torch.allclose(rz[:, 2], base[:, 2], atol=1e-5)
    assert torch.allclose(rz[:, :2].norm(dim=1), base[:, :2].norm(dim=1), atol=1e-5)
    assert not torch.allclose(rz[:, :2], base[:, :2], atol=1e-3)
    # scale only: a multiple in [0.8, 1.25]
    sc = triplets(release, augmentations=("scale",), rgb_drop_prob=0.0)[7]["points"]
    ratio = sc[:, :3].norm() / base[:, :3].norm()
    assert 0.8 <= ratio <= 1.25 and torch.allclose(sc[:, :3], base[:, :3] * ratio, atol=1e-5)
    # shift only: one offset of at most 0.1 per axis
    sh = triplets(release, augmentations=("shift",), rgb_drop_prob=0.0)[7]["points"]
    off = sh[:, :3] - base[:, :3]
    assert torch.allclose(off, off[:1].expand_as(off), atol=1e-5) and off.abs().max() <= 0.1 + 1e-6
    # small rotation: lengths kept, angle at most 0.18 rad per axis
    rs = triplets(release, augmentations=("rotate_small",), rgb_drop_prob=0.0)[7]["points"]
    assert torch.allclose(rs[:, :3].norm(dim=1), base[:, :3].norm(dim=1), atol=1e-5)
    # dropout: dropped points become the first point, rgb stays
    ds = triplets(release, augmentations=("dropout",), rgb_drop_prob=0.0)
    dropped = [ds[i]["points"] for i in range(12) for ds.epoch in range(3)]
    assert any((p[1:, :3] == p[0, :3]).all(1).sum() > 0 for p in dropped)
    # rgb drop with probability 1 -> grey 0.4; augment=False -> none of it
    grey = triplets(release, rgb_drop_prob=1.0)[7]["points"]
    assert torch.all(grey[:, 3:] == 0.4)
    plain = triplets(release, augment=False, rgb_drop_prob=1.0)[7]["points"]
    assert torch.equal(plain, base)
    # with everything on, over shapes roughly half of the samples have grey rgb
    full = triplets(release)
    greys = [bool((full[i]["points"][:, 3:] == 0.4).all())
             for i in range(12) for full.epoch in range(4)]
    assert 0.2 < np.mean(greys) < 0.8


def test_views_distinct_with_thumbnail(release):
    ds = triplets(release)
    for ds.epoch in range(10):
        obj, sn = codes(ds[0]["image_feat"]), codes(ds[6]["image_feat"])
        assert obj[0] == 99 and len(set(obj[1:])) == 3 and all(100 <= c < 112 for c in obj[1:])
        assert len(set(sn)) == 4 and all(100 <= c < 112 for c in sn)
    single = triplets(release, num_views=1)
    seen = {codes(single[0]["image_feat"])[0] >= 100 for single.epoch in range(20)}
    assert seen == {True, False}   # OpenShape's one-view rule: thumbnail or a view, half/half


def test_text_rules_objaverse_and_gpt4_filter(tmp_path):
    obj = make_shape("u1", "Objaverse", texts=("name", "second"))
    ds = one_shape(tmp_path, obj)
    picked = {tuple(codes(ds[0]["text_feat"])) for ds.epoch in range(30)}
    assert picked == {(300,)}   # Objaverse: text[0] only, prompt_avg
    flagged = one_shape(tmp_path / "f", obj, flags={"u1": "N"})
    s = flagged[0]
    assert not s["has_text"] and torch.all(s["text_feat"] == 0)
    unfiltered = one_shape(tmp_path / "g", obj, flags={"u1": "N"}, use_gpt4_filter=False)
    assert codes(unfiltered[0]["text_feat"]) == [300]
    original = one_shape(tmp_path / "o", obj, text_prompt="original")
    assert codes(original[0]["text_feat"]) == [200]


def test_text_rules_other_sets_captions_retrieval(tmp_path):
    sn = one_shape(tmp_path / "a", make_shape("s", "ShapeNet", texts=("a", "b", "c")))
    assert {codes(sn[0]["text_feat"])[0] for sn.epoch in range(60)} == {300, 301, 302}
    # retrieved texts use the "original" feature even with prompt_avg selected
    rt = one_shape(tmp_path / "b", make_shape("r", "ShapeNet", texts=(), retrieval=("x", "y")))
    assert {codes(rt[0]["text_feat"])[0] for rt.epoch in range(40)} == {600, 601}
    # captions: a coin picks BLIP or MSFT; the empty MSFT caption gives no text
    cap = one_shape(tmp_path / "c", make_shape("c", "ShapeNet", texts=(), blip="a blip"))
    got = {(bool(cap[0]["has_text"]), codes(cap[0]["text_feat"])[0]) for cap.epoch in range(40)}
    assert got == {(True, 401), (False, 0)}
    # all sources together: one candidate per source, then uniform
    allsrc = one_shape(tmp_path / "d",
                       make_shape("o", "Objaverse", texts=("n",), blip="b", msft="m",
                                  retrieval=("r",)))
    assert {codes(allsrc[0]["text_feat"])[0] for allsrc.epoch in range(80)} == {300, 401, 501, 600}
    only = one_shape(tmp_path / "e",
                     make_shape("o", "Objaverse", texts=("n",), blip="b", retrieval=("r",)),
                     text_sources=("retrieval_text",))
    assert codes(only[0]["text_feat"]) == [600]


def test_augmentation_is_a_function_of_seed_epoch_index(release):
    a, b = triplets(release), triplets(release)
    b[5], b[2]   # access order and history must not matter
    for key in ("points", "image_feat", "text_feat"):
        assert torch.equal(a[3][key], b[3][key])
    a.set_epoch(1)
    assert not torch.equal(a[3]["points"], b[3]["points"])
    assert not torch.equal(triplets(release, seed=1)[3]["points"], b[3]["points"])
    # the same number comes from the documented generator
    rng = np.random.default_rng([0, 0, 3])
    assert torch.equal(triplets(release, augmentations=(), rgb_drop_prob=0.0)[3]["points"][:, 3:],
                       torch.from_numpy(np.load(b.paths[3], allow_pickle=True).item()["rgb"][
                           rng.permutation(N_STORED)[:32]]))


def test_loader_independent_of_worker_count(release):
    out = []
    for workers in (0, 2):
        ds = triplets(release)
        loader, sampler = data.make_train_loader(ds, batch_size=4, seed=3, workers=workers)
        sampler.set_epoch(2)
        out.append(list(loader))
    assert len(out[0]) == len(out[1]) == 3
    for x, y in zip(*out):
        for key in ("points", "image_feat", "text_feat", "has_text", "index"):
            assert torch.equal(x[key], y[key])


def test_fewer_points_are_resampled(tmp_path):
    ds = one_shape(tmp_path, make_shape("few", n=10), num_points=32, augmentations=(),
                   rgb_drop_prob=0.0)
    pts = ds[0]["points"]
    stored = np.load(ds.paths[0], allow_pickle=True).item()["rgb"]
    assert pts.shape == (32, 6)
    rows = {int(np.argmin(np.abs(stored - c.numpy()).sum(1))) for c in pts[:, 3:]}
    assert rows == set(range(10))   # every stored point kept, the rest drawn again


# ---- samplers and loaders ------------------------------------------------------------------------

class Sized:
    def __init__(self, n):
        self.n, self.epoch = n, None

    def __len__(self):
        return self.n

    def set_epoch(self, e):
        self.epoch = e


def test_sharded_sampler_shards_and_drops_last():
    ds = Sized(23)
    shards = [list(data.ShardedSampler(ds, r, 4, seed=1)) for r in range(4)]
    assert all(len(s) == 5 for s in shards)
    flat = sum(shards, [])
    assert len(set(flat)) == 20 and set(flat) <= set(range(23))
    s = data.ShardedSampler(ds, 0, 4, seed=1)
    s.set_epoch(1)
    assert ds.epoch == 1 and list(s) != shards[0]
    assert list(data.ShardedSampler(ds, 0, 1, shuffle=False)) == list(range(23))


def test_sampler_skip_resumes_same_order():
    ds = Sized(30)
    full = data.ShardedSampler(ds, 1, 2, seed=5)
    full.set_epoch(3)
    order = list(full)
    resumed = data.ShardedSampler(ds, 1, 2, seed=5)
    resumed.set_epoch(3)
    resumed.skip(6)
    assert list(resumed) == order[6:] and len(resumed) == len(order) - 6
    resumed.set_epoch(4)
    assert resumed.start == 0 and len(list(resumed)) == 15


def test_loader_resume_mid_epoch_gives_same_batches(release):
    ds = triplets(release)
    loader, sampler = data.make_train_loader(ds, batch_size=3, seed=7)
    sampler.set_epoch(1)
    batches = list(loader)
    ds2 = triplets(release)
    loader2, sampler2 = data.make_train_loader(ds2, batch_size=3, seed=7)
    sampler2.set_epoch(1)
    sampler2.skip(2 * 3)
    rest = list(loader2)
    assert len(rest) == len(batches) - 2 == len(loader2)
    for x, y in zip(batches[2:], rest):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["points"], y["points"])


def test_train_loader_too_small_is_bad_input(release):
    with pytest.raises(BadInput, match="train_all.json"):
        data.make_train_loader(triplets(release), batch_size=8, world_size=2)


class Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2, 6), float(i)), i % 3


def test_eval_loader_counts_every_sample_once():
    ds, world = Items(10), 3
    seen, sizes = [], []
    for rank in range(world):
        loader = data.make_eval_loader(ds, batch_size=2, rank=rank, world_size=world)
        n = 0
        for points, labels, index in loader:
            assert points.shape[1:] == (2, 6) and torch.equal(points[:, 0, 0].long(), index)
            assert torch.equal(labels, index % 3)
            seen += index.tolist()
            n += len(index)
        sizes.append(n)
    assert sorted(seen) == list(range(10)) and sizes == [4, 3, 3]


def knn_release(tmp_path, clusters=4, in_split=None):
    """Shapes in clusters of 4 whose nearest neighbours are the other members of their cluster."""
    shapes = [make_shape(f"c{c}m{m}", seed=c * 4 + m) for c in range(clusters) for m in range(4)]
    names = [s["id"] for s in shapes] + ["outside0", "outside1"]
    index = {}
    for k, s in enumerate(shapes):
        c = k // 4
        mates = [c * 4 + m for m in range(4) if c * 4 + m != k]
        index[s["id"]] = [k] + mates + [len(shapes)]   # the last neighbour is not in the split
    root = write_release(tmp_path / "knn", shapes, knn={"name": names, "index": index})
    return root, os.path.join(root, "meta_data", "point_feat_knn.npy")


def test_knn_batches_group_neighbours(tmp_path):
    root, knn = knn_release(tmp_path)
    ds = triplets(root)
    loader, sampler = data.make_train_loader(ds, batch_size=8, seed=0, knn=knn, knn_group_size=4)
    assert isinstance(sampler, data.KnnBatchSampler)
    sampler.set_epoch(0)
    batches = [b["index"].tolist() for b in loader]
    assert len(batches) == len(loader) == 2 and all(len(b) == 8 for b in batches)
    for b in batches:
        for g in range(0, 8, 4):
            group = b[g:g + 4]
            # seed + its 3 cluster mates
            assert len({k // 4 for k in group}) == 1 and len(set(group)) == 4
    again = data.KnnBatchSampler(ds, 8, knn, 4)
    again.set_epoch(0)
    assert [list(x) for x in again] == batches
    again.set_epoch(1)
    assert [list(x) for x in again] != batches
    # two ranks get different batches; skip resumes
    r0, r1 = (data.KnnBatchSampler(ds, 4, knn, 4, rank=0, world_size=2),
              data.KnnBatchSampler(ds, 4, knn, 4, rank=1, world_size=2))
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == 2 and b0 != b1
    r0.skip(4)
    assert list(r0) == b0[1:] and len(r0) == 1


def test_knn_fills_groups_when_neighbours_are_missing(tmp_path):
    root, knn = knn_release(tmp_path)
    # clusters cut in half
    shapenet = json.load(open(os.path.join(root, "meta_data/split/train_all.json")))[:6]
    save_json(str(tmp_path / "part.json"), shapenet)
    ds = triplets(root, split=str(tmp_path / "part.json"))
    sampler = data.KnnBatchSampler(ds, 4, knn, 4)
    batches = list(sampler)
    assert batches and all(len(b) == 4 and all(0 <= k < 6 for k in b) for b in batches)


def test_knn_bad_inputs(release):
    ds = triplets(release)
    with pytest.raises(BadInput, match="point_feat_knn.npy"):
        data.make_train_loader(ds, 4, knn=os.path.join(release, "meta_data/point_feat_knn.npy"))
    save(os.path.join(release, "meta_data/point_feat_knn.npy"), {"names": []})
    with pytest.raises(BadInput, match="point_feat_knn.npy"):
        data.make_train_loader(ds, 4, knn=os.path.join(release, "meta_data/point_feat_knn.npy"))


# ---- zero-shot benchmarks ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["openshape", "tamm"])
def test_benchmarks_in_both_layouts(tmp_path, layout):
    root = write_release(tmp_path / layout, default_shapes(), layout=layout)
    sets = data.load_benchmarks(root, num_points=20, clip_dim=D)
    assert sorted(sets) == ["lvis", "modelnet40", "scanobjectnn"]
    ds = triplets(root)
    # the TAMM split folder, the GPT-4 filter and data/ are found too
    assert len(ds) == 12 and ds[0]["valid"]
    assert all(os.path.exists(p) for p in ds.paths + sets["lvis"].paths)
    assert all(p.startswith(os.path.join(root, "data") if layout == "tamm" else root)
               for p in ds.paths)
    assert len(triplets(root, split="ablation/train_shapenet_only")) == 6
    for ds in sets.values():
        pts, label = ds[0]
        n = 32 if ds.name == "scanobjectnn" else 20  # ScanObjectNN: all its stored points
        assert pts.shape == (n, 6) and pts.dtype == torch.float32 and isinstance(label, int)
        assert (ds.class_feat.dtype == torch.float32
                and ds.class_feat.shape == (len(ds.class_names), D))


def test_modelnet40_first_points_swap_normalise_rgb(release):
    mn = data.load_benchmarks(release, num_points=20, names=("modelnet40",),
                              clip_dim=D)["modelnet40"]
    assert mn.name == "modelnet40" and mn.class_names == MODELNET_CLASSES  # dict order kept
    assert codes(mn.class_feat) == [0, 1, 2]
    assert [mn[k][1] for k in range(3)] == [2, 0, 1]                       # mug, zebra, airplane
    stored = np.load(os.path.join(release, "meta_data/modelnet40/test_pc.npy"),
                     allow_pickle=True)[1]
    pts = mn[1][0].numpy()
    xyz = stored["xyz"][:20][:, [0, 2, 1]]                                 # first N points, y <-> z
    xyz = xyz - xyz.mean(0)
    assert np.allclose(pts[:, :3], xyz / np.linalg.norm(xyz, axis=1).max(), atol=1e-5)
    assert np.allclose(pts[:, 3:], 101 / 255)
    assert torch.equal(mn[1][0], mn[1][0])                                 # no randomness


def test_scanobjectnn_grey_rgb_fixed_class_order_and_all_stored_points(release):
    so = data.load_benchmarks(release, num_points=50, names=("scanobjectnn",),
                              clip_dim=D)["scanobjectnn"]
    assert so.class_names == data.SCANOBJECTNN_CLASSES
    # rows follow the label order, not the file's order
    assert codes(so.class_feat) == list(range(15))
    assert [so[k][1] for k in range(3)] == [0, 14, 3]
    pts = so[0][0]
    assert pts.shape == (32, 6) and torch.all(pts[:, 3:] == 0.4) and torch.equal(so[0][0], pts)
    # all 32 stored points in their order, never padded to the 50 asked for (TAMM data.py
    # ScanObjectNNTest)
    stored = np.load(os.path.join(release, "meta_data/scanobjectnn/xyz_label.npy"),
                     allow_pickle=True).item()
    xyz = stored["xyz"][0][:, [0, 2, 1]]
    xyz = xyz - xyz.mean(0)
    assert np.allclose(pts[:, :3].numpy(), xyz / np.linalg.norm(xyz, axis=1).max(), atol=1e-5)


def test_permuted_point_order_is_openshapes_and_seeded(release):
    first = data.load_benchmarks(release, num_points=20, names=("modelnet40",),
                                 clip_dim=D)["modelnet40"]
    perm = data.load_benchmarks(release, num_points=20, names=("modelnet40",), clip_dim=D,
                                order="permuted")["modelnet40"]
    stored = np.load(os.path.join(release, "meta_data/modelnet40/test_pc.npy"),
                     allow_pickle=True)[1]["xyz"]
    idx = np.random.default_rng(1).permutation(len(stored))[:20]  # a permutation, then the first N
    xyz = stored[idx][:, [0, 2, 1]] - stored[idx][:, [0, 2, 1]].mean(0)
    assert np.allclose(perm[1][0][:, :3].numpy(), xyz / np.linalg.norm(xyz, axis=1).max(),
                       atol=1e-5)
    assert torch.equal(perm[1][0], perm[1][0]) and not torch.equal(perm[1][0], first[1][0])


def test_lvis_classes_sorted_and_paths_mapped(release):
    lv = data.load_benchmarks(release, num_points=16, names=("lvis",), clip_dim=D)["lvis"]
    assert lv.class_names == ["apple", "mug", "zebra"] and codes(lv.class_feat) == [0, 1, 2]
    assert [lv[k][1] for k in range(4)] == [2, 0, 2, 1]
    assert all(p.startswith(release) for p in lv.paths)
    stored = np.load(lv.paths[1], allow_pickle=True).item()
    assert np.allclose(lv[1][0][:, 3:].numpy(), stored["rgb"][:16])


def test_val_set_in_modelnet_layout(release):
    src = os.path.join(release, "meta_data", "modelnet40")
    dst = os.path.join(release, "meta_data", "val")
    os.makedirs(dst)
    for f in os.listdir(src):
        os.link(os.path.join(src, f), os.path.join(dst, f))
    sets = data.load_benchmarks(release, num_points=8, names=("val", "modelnet40"), clip_dim=D)
    assert sets["val"].name == "val" and len(sets["val"]) == 3
    assert torch.equal(sets["val"][2][0], sets["modelnet40"][2][0])


def test_absent_benchmarks_are_left_out(tmp_path):
    os.makedirs(tmp_path / "empty" / "meta_data")
    assert data.load_benchmarks(str(tmp_path / "empty"), clip_dim=D) == {}


# ---- bad input: every case of the issue names the file -------------------------------------------

def test_missing_root_and_split(tmp_path, release):
    with pytest.raises(BadInput, match="nowhere"):
        data.TrainTriplets(str(tmp_path / "nowhere"))
    with pytest.raises(BadInput, match="nowhere"):
        data.load_benchmarks(str(tmp_path / "nowhere"))
    with pytest.raises(BadInput, match="train_no_lvis.json"):
        triplets(release, split="train_no_lvis")
    with pytest.raises(BadInput, match="nope.json"):
        triplets(release, split=str(tmp_path / "nope.json"))
    with open(tmp_path / "broken.json", "w") as f:
        f.write("[{\"data_path\": ")
    with pytest.raises(BadInput, match="broken.json"):
        triplets(release, split=str(tmp_path / "broken.json"))
    save_json(str(tmp_path / "wrong.json"), [{"id": "x"}])
    with pytest.raises(BadInput, match="wrong.json"):
        triplets(release, split=str(tmp_path / "wrong.json"))


def test_missing_gpt4_filter(release):
    os.remove(os.path.join(release, "meta_data", "gpt4_filtering.json"))
    with pytest.raises(BadInput, match="gpt4_filtering.json"):
        triplets(release)
    assert len(triplets(release, use_gpt4_filter=False)) == 12
    # no Objaverse: not needed
    assert len(triplets(release, split="ablation/train_shapenet_only")) == 6


@pytest.mark.parametrize("missing", ["test_pc.npy", "test_split.json", "cat_name_pt_feat.npy"])
def test_incomplete_modelnet_folder(release, missing):
    os.remove(os.path.join(release, "meta_data", "modelnet40", missing))
    with pytest.raises(BadInput, match=missing):
        data.load_benchmarks(release, clip_dim=D)


@pytest.mark.parametrize("missing", ["xyz_label.npy", "cat_name_pt_feat.npy"])
def test_incomplete_scanobjectnn_folder(release, missing):
    os.remove(os.path.join(release, "meta_data", "scanobjectnn", missing))
    with pytest.raises(BadInput, match=missing):
        data.load_benchmarks(release, clip_dim=D)


@pytest.mark.parametrize("missing", ["split/lvis.json", "lvis_cat_name_pt_feat.npy"])
def test_incomplete_lvis(release, missing):
    os.remove(os.path.join(release, "meta_data", missing))
    with pytest.raises(BadInput, match=os.path.basename(missing)):
        data.load_benchmarks(release, clip_dim=D)


def test_broken_benchmark_files(release):
    mn = os.path.join(release, "meta_data", "modelnet40")
    with pytest.raises(BadInput, match="cat_name_pt_feat.npy"):  # class features of the wrong width
        data.load_benchmarks(release, names=("modelnet40",))
    pcs = np.load(os.path.join(mn, "test_pc.npy"), allow_pickle=True)
    pcs[2]["xyz"][5, 1] = np.nan
    save(os.path.join(mn, "test_pc.npy"), pcs)
    with pytest.raises(BadInput, match=r"test_pc.npy\[2\]: xyz contains NaN"):
        data.load_benchmarks(release, names=("modelnet40",), clip_dim=D)
    with open(os.path.join(mn, "test_pc.npy"), "r+b") as f:
        f.truncate(200)
    with pytest.raises(BadInput, match="test_pc.npy: cannot read"):
        data.load_benchmarks(release, names=("modelnet40",), clip_dim=D)
    with pytest.raises(BadInput, match="unknown benchmark 'shapenet55'"):
        data.load_benchmarks(release, names=("shapenet55",), clip_dim=D)
    lvis = data.load_benchmarks(release, names=("lvis",), clip_dim=D)["lvis"]
    os.remove(lvis.paths[0])
    with pytest.raises(BadInput, match=os.path.basename(lvis.paths[0])):
        lvis[0]


def break_shape(path, how):
    """Damage one per-shape file in the ways the issue lists."""
    shape = np.load(path, allow_pickle=True).item()
    if how == "missing":
        os.remove(path)
        return "file not found"
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return "cannot read"
    if how == "not_a_dict":
        np.save(path, np.zeros((4, 3)))
        return "expected a pickled dict"
    if how.startswith("no_"):
        del shape[how[3:]]
        save(path, shape)
        return f"missing '{how[3:]}'"
    if how in ("nan", "inf"):
        shape["xyz"][3, 0] = np.nan if how == "nan" else np.inf
        save(path, shape)
        return "xyz contains NaN or inf"
    if how == "image_width":
        shape["image_feat"] = np.zeros((12, D + 1), np.float32)
        save(path, shape)
        return "image_feat has shape"
    if how == "text_width":
        shape["text_feat"][0]["prompt_avg"] = np.zeros((1, 1280), np.float32)
        save(path, shape)
        return r"text_feat\[0\]\[prompt_avg\] has shape"
    if how == "few_views":
        shape["image_feat"] = shape["image_feat"][:2]
        save(path, shape)
        return "need 3 views"
    raise ValueError(how)


BROKEN = ["missing", "truncated", "not_a_dict", "no_xyz", "no_rgb", "no_image_feat", "nan", "inf",
          "image_width", "text_width", "few_views"]


@pytest.mark.parametrize("how", BROKEN)
def test_broken_shape_strict_names_file(release, how):
    ds = triplets(release, strict=True)
    problem = break_shape(ds.paths[2], how)
    with pytest.raises(BadInput, match=problem) as err:
        ds[2]
    assert os.path.basename(ds.paths[2]) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("how", BROKEN)
def test_broken_shape_is_skipped_and_counted(release, how):
    ds = triplets(release)
    break_shape(ds.paths[2], how)
    with warnings.catch_warnings():
        # the reader itself is silent: the training loop names broken shapes
        warnings.simplefilter("error")
        first, again = ds[2], ds[2]
    assert (ds.paths[2] in first["error"] and first["error"] == again["error"]
            and ds[3]["error"] == "")
    # the next shape that loads stands in, marked invalid: the batch keeps its size, the loss leaves
    # it out
    assert not first["valid"] and not again["valid"] and first["index"] == 2
    assert (torch.equal(first["points"], ds[3]["points"])
            and torch.equal(first["text_feat"], ds[3]["text_feat"]))
    loader, sampler = data.make_train_loader(ds, batch_size=12)
    (batch,) = list(loader)
    assert [e for e in batch["error"] if e] == [first["error"]]
    assert len(batch["index"]) == 12 and batch["valid"].sum() == 11 and (~batch["valid"]).sum() == 1
    assert (not batch["valid"][batch["index"] == 2].any()
            and batch["valid"][batch["index"] != 2].all())


def test_every_shape_broken_is_one_clear_error(tmp_path):
    ds = one_shape(tmp_path, make_shape("only"))
    os.remove(ds.paths[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BadInput, match="cannot be read"):
            ds[0]


def test_check_shape_is_usable_alone():
    good = make_shape("x")
    data.check_shape(good, "x.npy", clip_dim=D, min_views=4)
    with pytest.raises(BadInput, match="x.npy: xyz has shape"):
        data.check_shape({**good, "xyz": np.zeros((5, 2))}, "x.npy", clip_dim=D)
    with pytest.raises(BadInput, match="x.npy: rgb has shape"):
        data.check_shape({**good, "rgb": np.zeros((5, 3))}, "x.npy", clip_dim=D)
    with pytest.raises(BadInput, match="x.npy: text features are not laid out"):
        data.check_shape({**good, "text_feat": ["oops"]}, "x.npy", clip_dim=D)
