"""The OpenShape release on disk -> training triplets and zero-shot benchmarks (TAMM section 4.1).

TAMM trains on OpenShape's "ensembled" data (ShapeNet, 3D-FUTURE, ABO, Objaverse) and evaluates zero-shot on
ModelNet40, Objaverse-LVIS and ScanObjectNN; docs/data-format.md describes every file. This file reads them as
the official code does (OpenShape src/data.py, TAMM data.py):
- `TrainTriplets`: one sample = the points [xyz, rgb] after OpenShape's preprocessing (swap y/z, centre, divide
  by the max norm, augment), 4 distinct CLIP view features (the thumbnail + 3 views when there is a thumbnail)
  and one text feature picked as OpenShape does.
- `load_benchmarks`: the zero-shot sets and their class-name text features; TAMM takes the first N points.
- The samplers that deal these samples to ranks live in checkpoint.py, beside the resume contract they serve.

Data root: the folder holding `meta_data/` in OpenShape's layout or TAMM's (`meta_data/Pre-Training/split/...`,
`meta_data/Zero-Shot/...`). Split files store absolute paths that start with /mnt/data: that prefix becomes
the root (OpenShape) or root/data (TAMM's configs map it to the folder `data` beside meta_data).

Randomness: every random choice for sample i in epoch e comes from np.random.default_rng([seed, e, i]), never
from global RNGs, so a batch does not depend on the worker count and a resumed run sees the same data.
Security: the release's .npy files are pickles (np.load(allow_pickle=True)): loading one can run arbitrary code.
Only read files from a source you trust (the official Hugging Face dataset).

    python -c "import data; d = data.TrainTriplets('/data/openshape'); print(len(d), d[0]['points'].shape)"
"""
import math
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from checkpoint import load_entries, load_json, load_npy
from training import BadInput

# ---- defaults: the official stage-2 config (OpenShape src/configs/train.yaml, TAMM configs/Pre-Training/pointbert.yaml)
CLIP_DIM = 1280               # OpenCLIP ViT-bigG-14 feature width
NUM_POINTS = 10000            # dataset.num_points
NUM_VIEWS = 4                 # TAMM: dataset.num_imgs
RGB_DROP_PROB = 0.5           # dataset.rgb_random_drop_prob
GREY = 0.4                    # colour of dropped rgb and of colourless points (OpenShape and TAMM data.py)
TEXT_PROMPT = "prompt_avg"    # dataset.use_prompt_engineering (retrieved texts always use "original")
TEXT_SOURCES = ("text", "caption", "retrieval_text")    # dataset.text_source of stage 2
AUGMENTATIONS = ("dropout", "scale", "shift", "rotate_small", "rotate_z")  # augment_pc + random_z_rotate
PATH_PREFIX = "/mnt/data"     # prefix of every data_path in the released split files
MAX_DROPOUT, SCALE_RANGE, SHIFT_RANGE = 0.875, (0.8, 1.25), 0.1   # PointNet++ augmentations in OpenShape utils/data.py
ROT_SIGMA, ROT_CLIP = 0.06, 0.18                                  # rotate_perturbation_point_cloud (radians)
MAX_STAND_INS = 100           # a broken shape is replaced by one of the next shapes that loads
# ScanObjectNN labels index this fixed list (OpenShape hard-codes it), not the order of the feature file.
SCANOBJECTNN_CLASSES = ["bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
                        "bed", "pillow", "sink", "sofa", "toilet"]

# Where each file may live under the root: OpenShape's layout first, then TAMM's (configs/Pre-Training/pointbert.yaml).
SPLIT_DIRS = ("meta_data/split", "meta_data/Pre-Training/split")
GPT4_FILTER = ("meta_data/gpt4_filtering.json", "meta_data/Pre-Training/gpt4_filtering.json")
KNN_FILE = ("meta_data/point_feat_knn.npy", "meta_data/Pre-Training/point_feat_knn.npy")
BENCHMARK_DIRS = {"modelnet40": ("meta_data/modelnet40", "meta_data/Zero-Shot/modelnet40"),
                  "scanobjectnn": ("meta_data/scanobjectnn", "meta_data/Zero-Shot/scanobjectnn"), "val": ("meta_data/val",)}
RELEASE_SPLITS = ("train_all", "train_no_lvis", "ablation/train_shapenet_only", "lvis")  # what meta_data/split/ holds
LVIS_SPLIT = ("meta_data/split/lvis.json", "meta_data/Pre-Training/split/lvis.json")
LVIS_FEAT = ("meta_data/lvis_cat_name_pt_feat.npy", "meta_data/Zero-Shot/LVIS/lvis_cat_name_pt_feat.npy")


# ---- reading files -----------------------------------------------------------------------------------------

def find_file(root, candidates):
    """The first of `candidates` (paths relative to root) that exists, else None."""
    return next((os.path.join(root, r) for r in candidates if os.path.exists(os.path.join(root, r))), None)


def map_path(data_path, root, prefix=PATH_PREFIX):
    """Replace the release's absolute `prefix` (/mnt/data) of a split entry's data_path by `root`."""
    if prefix and (data_path + "/").startswith(prefix.rstrip("/") + "/"):
        return os.path.join(root, data_path[len(prefix):].lstrip("/"))
    return data_path if os.path.isabs(data_path) else os.path.join(root, data_path)


def shape_paths(entries, root, prefix=PATH_PREFIX):
    """Every entry's file: /mnt/data -> root, or -> root/data where the shapes are there (TAMM's layout)."""
    data_dir = os.path.join(root, "data")
    tamm = entries and not os.path.exists(map_path(entries[0]["data_path"], root, prefix)) \
        and os.path.exists(map_path(entries[0]["data_path"], data_dir, prefix))
    return [map_path(e["data_path"], data_dir if tamm else root, prefix) for e in entries]


def check_shape(shape, path, clip_dim=CLIP_DIM, min_views=0):
    """BadInput naming `path` unless `shape` is a usable per-shape dict: finite `xyz` (N, 3) and `rgb` (N, 3),
    every stored CLIP feature `clip_dim` wide, with `min_views` > 0 at least that many `image_feat` views."""
    if not isinstance(shape, dict):
        raise BadInput(f"{path}: expected a dict, found {type(shape).__name__}")
    if missing := [k for k in ("xyz", "rgb", "image_feat")[:3 if min_views else 2] if k not in shape]:
        raise BadInput(f"{path}: missing '{missing[0]}'")
    xyz, rgb = np.asarray(shape["xyz"]), np.asarray(shape["rgb"])
    if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0:
        raise BadInput(f"{path}: xyz has shape {xyz.shape}, expected (N, 3)")
    if rgb.shape != xyz.shape:
        raise BadInput(f"{path}: rgb has shape {rgb.shape}, xyz has {xyz.shape}")
    if bad := [key for key, arr in (("xyz", xyz), ("rgb", rgb)) if not np.isfinite(arr).all()]:
        raise BadInput(f"{path}: {bad[0]} contains NaN or inf")
    try:
        feats = [(k, shape[k]) for k in ("image_feat", "thumbnail_feat") if k in shape]
        feats += [(f"{k}[{j}][{v}]", f) for k in ("text_feat", "retrieval_text_feat")
                  for j, variants in enumerate(shape.get(k, [])) for v, f in variants.items()]
        feats += [(f"{k}[{v}]", f) for k in ("blip_caption_feat", "msft_caption_feat") for v, f in shape.get(k, {}).items()]
    except (AttributeError, TypeError) as e:
        raise BadInput(f"{path}: text features are not laid out as in the release ({e})") from None
    for name, f in feats:
        if np.ndim(f) == 0 or np.shape(f)[-1] != clip_dim:
            raise BadInput(f"{path}: {name} has shape {np.shape(f)}, expected CLIP width {clip_dim}")
    if min_views and (np.ndim(shape["image_feat"]) != 2 or len(shape["image_feat"]) < min_views):
        raise BadInput(f"{path}: image_feat has shape {np.shape(shape['image_feat'])}, need {min_views} views")


# ---- point preprocessing (OpenShape src/data.py and utils/data.py) ----------------------------------------------

def choose_points(n, num_points, rng, first=False):
    """Indices of `num_points` of `n` stored points: the first ones (TAMM's evaluation) or a random subset;
    all of them when num_points is None. Fewer stored than asked: all, then the rest drawn with replacement."""
    num_points = num_points or n
    base = np.arange(n) if first else rng.permutation(n)
    return base[:num_points] if n >= num_points else np.concatenate([base, rng.integers(0, n, num_points - n)])


def normalize(xyz):
    """Swap y/z (the release is y-up, the model z-up), centre, and divide by the largest norm."""
    xyz = xyz[:, [0, 2, 1]]
    xyz = xyz - xyz.mean(axis=0)
    scale = np.linalg.norm(xyz, axis=1).max()
    return xyz / scale if scale > 1e-6 else np.zeros_like(xyz)


def _rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)


def augment_points(xyz, rng, ops=AUGMENTATIONS):
    """OpenShape's training augmentation, in its order: PointNet++'s augment_pc, then a random turn about z."""
    if "dropout" in ops:  # dropped points collapse onto the first point, so the count stays fixed
        drop = rng.random(len(xyz)) <= rng.random() * MAX_DROPOUT
        xyz[drop] = xyz[0]
    if "scale" in ops:
        xyz = xyz * rng.uniform(*SCALE_RANGE)
    if "shift" in ops:
        xyz = xyz + rng.uniform(-SHIFT_RANGE, SHIFT_RANGE, 3).astype(np.float32)
    if "rotate_small" in ops:
        ax, ay, az = np.clip(ROT_SIGMA * rng.standard_normal(3), -ROT_CLIP, ROT_CLIP)
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        xyz = xyz @ (_rot_z(az) @ ry @ rx).astype(np.float32)
    if "rotate_z" in ops:
        xyz = xyz @ _rot_z(rng.uniform(0, 2 * math.pi))
    return xyz


# ---- training triplets ---------------------------------------------------------------------------------------

def resolve_split(root, split, flag=""):
    """A split name (train_all, train_no_lvis, ablation/train_shapenet_only) or a JSON path -> its path. Without a
    root (the synthetic world, built later, which has the release's splits) only the name is checked; `flag`
    prefixes the error when this checks a command line."""
    if split.endswith(".json") and os.path.isfile(split):
        return split
    if not root:
        if split not in RELEASE_SPLITS:
            raise BadInput(f"--split {split}: not a split of the synthetic world ({', '.join(RELEASE_SPLITS)}) "
                           f"nor a JSON file")
        return split
    found = find_file(root, [f"{d}/{split}.json" for d in SPLIT_DIRS])
    if found is None:
        raise BadInput(f"{flag}{os.path.join(root, SPLIT_DIRS[0], split + '.json')}: split file not found "
                       f"(also looked in {SPLIT_DIRS[1]}/)")
    return found


def check_split(root, split):
    """--split before any work (the error names the flag and the file)."""
    return resolve_split(root, split, flag=f"--split {split}: ")


def check_root(root):
    if not os.path.isdir(root):
        raise BadInput(f"{root}: data folder does not exist")


class TrainTriplets(Dataset):
    """(points, image-view features, text feature) of every shape in a split, as OpenShape/TAMM train on them.

    `ds[i]` -> {"points" (N, 6) [xyz, rgb], "image_feat" (V, D), "text_feat" (D,), "has_text", "valid", "index"}.
    A broken file stops a `strict` dataset (BadInput naming it); otherwise a warning names it once and the next
    shape that loads stands in with valid=False, so the batch keeps its size and the loss leaves it out."""

    def __init__(self, root, split="train_all", num_points=NUM_POINTS, num_views=NUM_VIEWS, augment=True,
                 rgb_drop_prob=RGB_DROP_PROB, text_prompt=TEXT_PROMPT, use_gpt4_filter=True, path_prefix=PATH_PREFIX,
                 clip_dim=CLIP_DIM, seed=0, strict=False, augmentations=AUGMENTATIONS, text_sources=TEXT_SOURCES):
        check_root(root)
        self.split_path = resolve_split(root, split)
        entries = load_entries(self.split_path, ["data_path"])
        self.ids = [e.get("id", str(k)) for k, e in enumerate(entries)]
        self.paths = shape_paths(entries, root, path_prefix)
        self.is_objaverse = [e.get("dataset") == "Objaverse" for e in entries]
        self.flagged = set()  # Objaverse uids whose name text the GPT-4 filter rejected
        if use_gpt4_filter and "text" in text_sources and any(self.is_objaverse):
            path = find_file(root, GPT4_FILTER) or os.path.join(root, GPT4_FILTER[0])
            flags = load_json(path)
            if not isinstance(flags, dict) or not all(isinstance(v, dict) for v in flags.values()):
                raise BadInput(f"{path}: expected {{uid: {{'flag': 'Y' or 'N', ...}}}}")
            self.flagged = {uid for uid, v in flags.items() if v.get("flag") == "N"}
        self.num_points, self.num_views, self.clip_dim = num_points, num_views, clip_dim
        self.augmentations, self.rgb_drop_prob = (augmentations, rgb_drop_prob) if augment else ((), 0.0)
        self.text_prompt, self.text_sources = text_prompt, text_sources
        self.seed, self.epoch, self.strict, self._warned = seed, 0, strict, set()

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        for j in range(i, i + MAX_STAND_INS):
            try:
                return {**self._read(j % len(self)), "valid": torch.tensor(j == i), "index": i}
            except BadInput as e:
                if self.strict:
                    raise
                if self.paths[j % len(self)] not in self._warned:
                    self._warned.add(self.paths[j % len(self)])
                    warnings.warn(f"skipping broken shape: {e}")
        raise BadInput(f"{self.split_path}: {MAX_STAND_INS} shapes in a row from entry {i} cannot be read")

    def _read(self, i):
        path = self.paths[i]
        shape = load_npy(path, item=True)
        thumb_counts = "thumbnail_feat" in shape and self.num_views > 1  # the thumbnail is one of the views
        check_shape(shape, path, self.clip_dim, min_views=self.num_views - thumb_counts)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        xyz, rgb = np.asarray(shape["xyz"], np.float32), np.asarray(shape["rgb"], np.float32)
        idx = choose_points(len(xyz), self.num_points, rng)
        xyz = augment_points(normalize(xyz[idx]), rng, self.augmentations)
        rgb = np.full((len(idx), 3), GREY, np.float32) if rng.random() < self.rgb_drop_prob else rgb[idx]
        try:
            text = self._pick_text(shape, self.ids[i], self.is_objaverse[i], rng)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BadInput(f"{path}: texts are not laid out as in the release ({type(e).__name__}: {e})") from None
        return {"points": torch.from_numpy(np.concatenate([xyz, rgb], 1).astype(np.float32)),
                "image_feat": torch.from_numpy(self._pick_views(shape, rng)),
                "text_feat": torch.zeros(self.clip_dim) if text is None else torch.from_numpy(text),
                "has_text": torch.tensor(text is not None)}

    def _pick_views(self, shape, rng):
        """TAMM: `num_views` distinct views; a shape with a thumbnail (Objaverse) always contributes it."""
        views = np.asarray(shape["image_feat"], np.float32)
        if "thumbnail_feat" not in shape:
            return views[rng.choice(len(views), self.num_views, replace=False)]
        thumb = np.asarray(shape["thumbnail_feat"], np.float32).reshape(1, -1)
        if self.num_views == 1:  # OpenShape's single-view rule: the thumbnail half of the time
            return thumb if rng.random() < 0.5 else views[rng.integers(len(views))][None]
        return np.concatenate([thumb, views[rng.choice(len(views), self.num_views - 1, replace=False)]])

    def _pick_text(self, shape, uid, objaverse, rng):
        """OpenShape: one candidate per source (name text, BLIP or MSFT caption, retrieved text), then one of them."""
        found, texts = [], shape.get("text", [])
        if "text" in self.text_sources and len(texts) > 0:
            if not objaverse:
                found.append(shape["text_feat"][rng.integers(len(texts))][self.text_prompt])
            elif uid not in self.flagged:  # Objaverse: the name (text[0]) unless GPT-4 rejected it
                found.append(shape["text_feat"][0][self.text_prompt])
        if "caption" in self.text_sources:  # a coin picks BLIP or MSFT; an empty one gives no caption
            key = "blip_caption" if rng.random() < 0.5 else "msft_caption"
            if len(shape.get(key, "")) > 0:
                found.append(shape[key + "_feat"][self.text_prompt])
        retrieved = shape.get("retrieval_text", [])
        if "retrieval_text" in self.text_sources and len(retrieved) > 0:
            found.append(shape["retrieval_text_feat"][rng.integers(len(retrieved))]["original"])
        return np.asarray(found[rng.integers(len(found))], np.float32).reshape(-1) if found else None


# ---- zero-shot benchmarks ------------------------------------------------------------------------------------

class ZeroShotSet(Dataset):
    """One benchmark: items (points (N, 6) [xyz, rgb], label); `class_feat` (C, D) text features of `class_names`.
    `load(i)` -> (xyz, rgb in [0, 1]). TAMM's evaluation takes the first N points (`order="first"`; N None: all
    stored points); OpenShape's loaders permute them first (`order="permuted"`, seeded by the index)."""

    def __init__(self, name, class_names, class_feat, labels, load, num_points=NUM_POINTS, order="first"):
        self.name, self.class_names, self.load, self.num_points, self.order = name, list(class_names), load, num_points, order
        self.class_feat = torch.as_tensor(np.asarray(class_feat, np.float32))
        self.labels = [int(v) for v in labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        xyz, rgb = self.load(i)
        idx = choose_points(len(xyz), self.num_points, np.random.default_rng(i), first=self.order == "first")
        return torch.from_numpy(np.concatenate([normalize(xyz[idx]), rgb[idx]], 1).astype(np.float32)), self.labels[i]


def _class_feats(path, clip_dim, names=None):
    """cat_name_pt_feat.npy -> (names, (C, D)); class order = dict order unless `names` fixes it."""
    feats = load_npy(path, item=True)
    names = list(feats) if names is None else names
    if any(n not in feats for n in names):
        raise BadInput(f"{path}: no feature for classes {[n for n in names if n not in feats][:5]}")
    try:
        mat = np.concatenate([np.asarray(feats[n]["open_clip_text_feat"], np.float32).reshape(1, -1) for n in names])
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{path}: expected {{class name: {{'open_clip_text_feat': (1, D)}}}}") from None
    if mat.shape[1] != clip_dim:
        raise BadInput(f"{path}: class features have width {mat.shape[1]}, expected CLIP width {clip_dim}")
    return names, mat


def _need(folder, files):
    """Paths of `files` in a benchmark folder that exists; BadInput naming the first one missing."""
    for p in (paths := [os.path.join(folder, f) for f in files]):
        if not os.path.exists(p):
            raise BadInput(f"{p}: file not found (the benchmark folder {folder} is incomplete)")
    return paths


def read_modelnet40(folder, name="modelnet40", clip_dim=CLIP_DIM, **kw):
    """ModelNet40 layout (also `val`): test_pc.npy (dicts with xyz, rgb on 0-255) + test_split.json + class features."""
    pc_path, split_path, feat_path = _need(folder, ["test_pc.npy", "test_split.json", "cat_name_pt_feat.npy"])
    pcs, split = load_npy(pc_path), load_entries(split_path, ["category"])
    if pcs.ndim != 1 or len(pcs) != len(split):
        raise BadInput(f"{split_path}: {len(split)} entries but {pc_path} has shape {pcs.shape}")
    for k, pc in enumerate(pcs):
        check_shape(pc, f"{pc_path}[{k}]", clip_dim)
    names, feats = _class_feats(feat_path, clip_dim)
    if unknown := sorted({e["category"] for e in split} - set(names)):
        raise BadInput(f"{feat_path}: no feature for categories {unknown[:5]} of {split_path}")
    load = lambda i: (np.asarray(pcs[i]["xyz"], np.float32), np.asarray(pcs[i]["rgb"], np.float32) / 255)
    return ZeroShotSet(name, names, feats, [names.index(e["category"]) for e in split], load, **kw)


def read_scanobjectnn(folder, clip_dim=CLIP_DIM, **kw):
    """ScanObjectNN: xyz_label.npy {"xyz" (M, 2048, 3), "label" (M,), optional "rgb"}; grey rgb when absent.
    TAMM feeds all 2,048 stored points (its num_points, 10,000, is more than there are): so do we."""
    data_path, feat_path = _need(folder, ["xyz_label.npy", "cat_name_pt_feat.npy"])
    data = load_npy(data_path, item=True)
    if missing := [k for k in ("xyz", "label") if k not in data]:
        raise BadInput(f"{data_path}: missing '{missing[0]}'")
    xyz = np.asarray(data["xyz"], np.float32)
    if xyz.ndim != 3 or xyz.shape[2] != 3 or len(xyz) != len(data["label"]) or not np.isfinite(xyz).all():
        raise BadInput(f"{data_path}: xyz {xyz.shape} must be finite (M, N, 3) with one label each ({np.shape(data['label'])})")
    rgb = np.asarray(data["rgb"], np.float32) if "rgb" in data else np.full_like(xyz, GREY)
    if rgb.shape != xyz.shape:
        raise BadInput(f"{data_path}: rgb has shape {rgb.shape}, xyz has {xyz.shape}")
    names, feats = _class_feats(feat_path, clip_dim, SCANOBJECTNN_CLASSES)
    if not all(0 <= int(v) < len(names) for v in data["label"]):
        raise BadInput(f"{data_path}: labels outside the {len(names)} ScanObjectNN classes")
    return ZeroShotSet("scanobjectnn", names, feats, data["label"], lambda i: (xyz[i], rgb[i]), **{**kw, "num_points": None})


def read_lvis(split_path, feat_path, root, path_prefix=PATH_PREFIX, clip_dim=CLIP_DIM, **kw):
    """Objaverse-LVIS: lvis.json {uid, data_path, category}; classes = the sorted unique categories, whose
    features are the rows of lvis_cat_name_pt_feat.npy in that order."""
    split = load_entries(split_path, ["data_path", "category"])
    names = sorted({e["category"] for e in split})
    feats = np.asarray(load_npy(feat_path), np.float32)
    if feats.shape != (len(names), clip_dim):
        raise BadInput(f"{feat_path}: shape {feats.shape}, expected ({len(names)}, {clip_dim}) for the "
                       f"{len(names)} categories of {split_path}")
    paths = shape_paths(split, root, path_prefix)

    def load(i):
        shape = load_npy(paths[i], item=True)
        check_shape(shape, paths[i], clip_dim)
        return np.asarray(shape["xyz"], np.float32), np.asarray(shape["rgb"], np.float32)
    ds = ZeroShotSet("lvis", names, feats, [names.index(e["category"]) for e in split], load, **kw)
    ds.paths = paths  # the shape files, for messages and tests
    return ds


def has_benchmark(root, name):
    """True if some file of benchmark `name` is under root (load_benchmarks then reads it, or names what is
    missing); a cheap check before any work."""
    return bool(find_file(root, LVIS_SPLIT + LVIS_FEAT if name == "lvis" else BENCHMARK_DIRS.get(name, ())))


def load_benchmarks(root, num_points=NUM_POINTS, names=("modelnet40", "lvis", "scanobjectnn"),
                    path_prefix=PATH_PREFIX, clip_dim=CLIP_DIM, order="first"):
    """{name: ZeroShotSet} for every benchmark in `names` whose files are under root (OpenShape or TAMM layout).
    A benchmark that is absent is left out; one that is present but incomplete is BadInput."""
    check_root(root)
    kw, out = dict(clip_dim=clip_dim, num_points=num_points, order=order), {}
    for name in names:
        if name == "lvis":
            split_path, feat_path = find_file(root, LVIS_SPLIT), find_file(root, LVIS_FEAT)
            if (split_path or feat_path) and not (split_path and feat_path):
                raise BadInput(f"{os.path.join(root, (LVIS_FEAT if split_path else LVIS_SPLIT)[0])}: file not found "
                               f"(needed for the lvis benchmark)")
            if split_path:
                out[name] = read_lvis(split_path, feat_path, root, path_prefix, **kw)
        elif name in BENCHMARK_DIRS:
            if folder := find_file(root, BENCHMARK_DIRS[name]):
                out[name] = read_scanobjectnn(folder, **kw) if name == "scanobjectnn" else read_modelnet40(folder, name, **kw)
        else:
            raise BadInput(f"unknown benchmark '{name}' (choose from lvis, {', '.join(BENCHMARK_DIRS)})")
    return out
