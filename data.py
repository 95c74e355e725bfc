"""The OpenShape release on disk, and the samplers that deal it to the ranks (paper section 4.1).

TAMM trains on OpenShape's "ensembled" data (ShapeNet, 3D-FUTURE, ABO, Objaverse) and evaluates
zero-shot on ModelNet40, Objaverse-LVIS and ScanObjectNN; docs/data-format.md describes every file.
This file reads them as the official code does (OpenShape src/data.py, TAMM data.py):
- `TrainTriplets`: one sample is the points [xyz, rgb] after OpenShape's preprocessing (swap y/z,
  centre, divide by the largest norm, augment), 4 distinct CLIP view features (the thumbnail + 3
  views when there is a thumbnail) and one text feature, picked as OpenShape picks it.
- `load_benchmarks`: the zero-shot sets and their class-name text features; TAMM takes the first N
  points.
- `make_train_loader` and `endless_batches`: the batches of a run as a function of its step, so a
  resumed run sees exactly the batches it missed; `make_eval_loader` puts every shape on exactly one
  rank.

Data root: the folder holding `meta_data/`, in OpenShape's layout or TAMM's
(`meta_data/Pre-Training/split`, `meta_data/Zero-Shot/...`). Split files store absolute paths that
start with /mnt/data: that prefix becomes the root (OpenShape) or root/data (TAMM's configs map it
to the folder `data` beside meta_data).

Randomness: every random choice for sample i in epoch e comes from np.random.default_rng([seed, e,
i]), never from a global RNG, so a batch does not depend on the worker count and a resumed run sees
the same data. Security: the release's .npy files are pickles (np.load(allow_pickle=True)): loading
one can run code. Only read files from a source you trust (the official Hugging Face dataset).

    python -c "import data; d = data.TrainTriplets('/data/openshape'); print(len(d), d[0].keys())"
"""
import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from adapters import CLIP_DIM
from files import BadInput, load_entries, load_json, load_npy

# ---- defaults: the official stage-2 config (OpenShape src/configs/train.yaml, TAMM pointbert.yaml)
NUM_POINTS = 10000            # dataset.num_points
NUM_VIEWS = 4                 # TAMM: dataset.num_imgs
RGB_DROP_PROB = 0.5           # dataset.rgb_random_drop_prob
GREY = 0.4                    # colour of dropped rgb and of colourless points (both data.py files)
TEXT_PROMPT = "prompt_avg"    # dataset.use_prompt_engineering (retrieved texts use "original")
TEXT_SOURCES = ("text", "caption", "retrieval_text")  # dataset.text_source of stage 2
PATH_PREFIX = "/mnt/data"     # prefix of every data_path in the released split files
MAX_STAND_INS = 100           # a broken shape is replaced by one of the next shapes that loads

# PointNet++'s augmentations as OpenShape applies them (OpenShape src/utils/data.py), in this order
AUGMENTATIONS = ("dropout", "scale", "shift", "rotate_small", "rotate_z")
MAX_DROPOUT = 0.875           # random_point_dropout: a ratio drawn in [0, 0.875) per cloud
SCALE_RANGE = (0.8, 1.25)     # random_scale_point_cloud
SHIFT_RANGE = 0.1             # shift_point_cloud: +-0.1 per axis
ROT_SIGMA = 0.06              # rotate_perturbation_point_cloud: angle per axis ~ N(0, 0.06^2) ...
ROT_CLIP = 0.18               # ... clipped at +-0.18 rad

# ScanObjectNN labels index this fixed list (OpenShape hard-codes it), not the order of the feature
# file.
SCANOBJECTNN_CLASSES = ["bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf",
                        "table", "bed", "pillow", "sink", "sofa", "toilet"]

# Where each file may live under the root: OpenShape's layout first, then TAMM's (its
# pointbert.yaml).
SPLIT_DIRS = ("meta_data/split", "meta_data/Pre-Training/split")
GPT4_FILTER = ("meta_data/gpt4_filtering.json", "meta_data/Pre-Training/gpt4_filtering.json")
KNN_FILE = ("meta_data/point_feat_knn.npy", "meta_data/Pre-Training/point_feat_knn.npy")
BENCHMARK_DIRS = {
    "modelnet40": ("meta_data/modelnet40", "meta_data/Zero-Shot/modelnet40"),
    "scanobjectnn": ("meta_data/scanobjectnn", "meta_data/Zero-Shot/scanobjectnn"),
    "val": ("meta_data/val",),
}
LVIS_SPLIT = ("meta_data/split/lvis.json", "meta_data/Pre-Training/split/lvis.json")
LVIS_FEAT = ("meta_data/lvis_cat_name_pt_feat.npy",
             "meta_data/Zero-Shot/LVIS/lvis_cat_name_pt_feat.npy")
RELEASE_SPLITS = ("train_all", "train_no_lvis", "ablation/train_shapenet_only", "lvis")


# ---- finding files -------------------------------------------------------------------------------


def find_file(root, candidates):
    """The first of `candidates` (paths relative to root) that exists, else None."""
    for relative in candidates:
        path = os.path.join(root, relative)
        if os.path.exists(path):
            return path
    return None


def map_path(data_path, root, prefix=PATH_PREFIX):
    """Replace the release's absolute `prefix` (/mnt/data) of a split entry's data_path by
    `root`."""
    if prefix and (data_path + "/").startswith(prefix.rstrip("/") + "/"):
        return os.path.join(root, data_path[len(prefix):].lstrip("/"))
    return data_path if os.path.isabs(data_path) else os.path.join(root, data_path)


def shape_paths(entries, root, prefix=PATH_PREFIX):
    """Every entry's file: /mnt/data -> root, or -> root/data where the shapes are there (TAMM's
    layout)."""
    data_dir = os.path.join(root, "data")
    first = entries[0]["data_path"] if entries else None
    tamm = first is not None and not os.path.exists(map_path(first, root, prefix)) \
        and os.path.exists(map_path(first, data_dir, prefix))
    return [map_path(e["data_path"], data_dir if tamm else root, prefix) for e in entries]


def check_root(root):
    if not os.path.isdir(root):
        raise BadInput(f"{root}: data folder does not exist")


def resolve_split(root, split, flag=""):
    """A split name (train_all, train_no_lvis, ablation/train_shapenet_only) or a JSON path -> its
    path.

    Without a root (the synthetic world, built later, which has the release's splits) only the name
    is checked; `flag` prefixes the error when this checks a command line."""
    if split.endswith(".json") and os.path.isfile(split):
        return split
    if not root:
        if split not in RELEASE_SPLITS:
            raise BadInput(f"--split {split}: not a split of the synthetic world "
                           f"({', '.join(RELEASE_SPLITS)}) nor a JSON file")
        return split
    found = find_file(root, [f"{folder}/{split}.json" for folder in SPLIT_DIRS])
    if found is None:
        expected = os.path.join(root, SPLIT_DIRS[0], split + ".json")
        raise BadInput(f"{flag}{expected}: split file not found (also looked in {SPLIT_DIRS[1]}/)")
    return found


def check_split(root, split):
    """--split before any work (the error names the flag and the file)."""
    return resolve_split(root, split, flag=f"--split {split}: ")


# ---- one shape's file ----------------------------------------------------------------------------


def check_shape(shape, path, clip_dim=CLIP_DIM, min_views=0):
    """BadInput naming `path` unless `shape` is a usable per-shape dict: finite `xyz` (N, 3) and
    `rgb` (N, 3), every stored CLIP feature `clip_dim` wide, and with `min_views` > 0 that many
    `image_feat` views."""
    if not isinstance(shape, dict):
        raise BadInput(f"{path}: expected a dict, found {type(shape).__name__}")
    required = ("xyz", "rgb", "image_feat") if min_views else ("xyz", "rgb")
    missing = [key for key in required if key not in shape]
    if missing:
        raise BadInput(f"{path}: missing '{missing[0]}'")
    xyz = np.asarray(shape["xyz"])
    rgb = np.asarray(shape["rgb"])
    if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0:
        raise BadInput(f"{path}: xyz has shape {xyz.shape}, expected (N, 3)")
    if rgb.shape != xyz.shape:
        raise BadInput(f"{path}: rgb has shape {rgb.shape}, xyz has {xyz.shape}")
    for key, values in (("xyz", xyz), ("rgb", rgb)):
        if not np.isfinite(values).all():
            raise BadInput(f"{path}: {key} contains NaN or inf")
    try:
        feats = [(key, shape[key]) for key in ("image_feat", "thumbnail_feat") if key in shape]
        for key in ("text_feat", "retrieval_text_feat"):
            for j, variants in enumerate(shape.get(key, [])):
                feats += [(f"{key}[{j}][{v}]", f) for v, f in variants.items()]
        for key in ("blip_caption_feat", "msft_caption_feat"):
            feats += [(f"{key}[{v}]", f) for v, f in shape.get(key, {}).items()]
    except (AttributeError, TypeError) as e:
        raise BadInput(f"{path}: text features are not laid out as in the release ({e})") from None
    for name, f in feats:
        if np.ndim(f) == 0 or np.shape(f)[-1] != clip_dim:
            raise BadInput(f"{path}: {name} has shape {np.shape(f)}, expected CLIP width "
                           f"{clip_dim}")
    views = shape.get("image_feat")
    if min_views and (np.ndim(views) != 2 or len(views) < min_views):
        raise BadInput(f"{path}: image_feat has shape {np.shape(views)}, need {min_views} views")


# ---- point preprocessing (OpenShape src/data.py and src/utils/data.py) ---------------------------


def choose_points(n, num_points, rng, first=False):
    """Indices of `num_points` of `n` stored points: the first ones (TAMM's evaluation) or a random
    subset; all of them when num_points is None. Fewer stored than asked: all, then the rest drawn
    with replacement."""
    num_points = num_points or n
    base = np.arange(n) if first else rng.permutation(n)
    if n >= num_points:
        return base[:num_points]
    return np.concatenate([base, rng.integers(0, n, num_points - n)])


def normalize(xyz):
    """Swap y/z (the release is y-up, the model z-up), centre, and divide by the largest norm."""
    xyz = xyz[:, [0, 2, 1]]
    xyz = xyz - xyz.mean(axis=0)
    scale = np.linalg.norm(xyz, axis=1).max()
    return xyz / scale if scale > 1e-6 else np.zeros_like(xyz)


def rotation_x(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rotation_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rotation_z(a):
    """In float32, the points' dtype, so a turn about z alone multiplies them directly; the small
    random rotation composes three of these in float64 and rounds once. (Which roundings happen
    sets every augmented point's last bit, and with it a seeded run's numbers.)"""
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)


def augment_points(xyz, rng, ops=AUGMENTATIONS):
    """OpenShape's training augmentation, in its order: PointNet++'s augment_pc, then a turn about
    z."""
    if "dropout" in ops:  # dropped points collapse onto the first point, so the count stays fixed
        drop = rng.random(len(xyz)) <= rng.random() * MAX_DROPOUT
        xyz[drop] = xyz[0]
    if "scale" in ops:
        xyz = xyz * rng.uniform(*SCALE_RANGE)
    if "shift" in ops:
        xyz = xyz + rng.uniform(-SHIFT_RANGE, SHIFT_RANGE, 3).astype(np.float32)
    if "rotate_small" in ops:
        ax, ay, az = np.clip(ROT_SIGMA * rng.standard_normal(3), -ROT_CLIP, ROT_CLIP)
        xyz = xyz @ (rotation_z(az) @ rotation_y(ay) @ rotation_x(ax)).astype(np.float32)
    if "rotate_z" in ops:
        xyz = xyz @ rotation_z(rng.uniform(0, 2 * math.pi))
    return xyz


# ---- training triplets ---------------------------------------------------------------------------


class TrainTriplets(Dataset):
    """(points, image-view features, text feature) of every shape in a split, as OpenShape and TAMM
    train.

    `ds[i]` -> {"points" (N, 6) [xyz, rgb], "image_feat" (V, D), "text_feat" (D,), "has_text",
    "valid", "index", "error"}. A broken file stops a `strict` dataset (BadInput naming it).
    Otherwise the next shape that loads stands in with valid=False and the problem in "error", so
    the batch keeps its size, the loss leaves the stand-in out, and the training loop names the
    broken file (not each worker on its own)."""

    def __init__(self, root, split="train_all", num_points=NUM_POINTS, num_views=NUM_VIEWS,
                 augment=True, rgb_drop_prob=RGB_DROP_PROB, text_prompt=TEXT_PROMPT,
                 use_gpt4_filter=True, path_prefix=PATH_PREFIX, clip_dim=CLIP_DIM, seed=0,
                 strict=False, augmentations=AUGMENTATIONS, text_sources=TEXT_SOURCES):
        check_root(root)
        self.split_path = resolve_split(root, split)
        entries = load_entries(self.split_path, ["data_path"])
        self.ids = [e.get("id", str(k)) for k, e in enumerate(entries)]
        self.paths = shape_paths(entries, root, path_prefix)
        self.is_objaverse = [e.get("dataset") == "Objaverse" for e in entries]
        self.flagged = set()  # Objaverse uids whose name text the GPT-4 filter rejected
        if use_gpt4_filter and "text" in text_sources and any(self.is_objaverse):
            self.flagged = read_gpt4_filter(root)
        self.num_points = num_points
        self.num_views = num_views
        self.clip_dim = clip_dim
        self.augmentations = augmentations if augment else ()
        self.rgb_drop_prob = rgb_drop_prob if augment else 0.0
        self.text_prompt = text_prompt
        self.text_sources = text_sources
        self.seed = seed
        self.epoch = 0
        self.strict = strict

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        error = ""
        for j in range(i, i + MAX_STAND_INS):
            try:
                sample = self._read(j % len(self))
                break
            except BadInput as e:
                if self.strict:
                    raise
                error = error or str(e)  # shape i's own problem
        else:
            raise BadInput(f"{self.split_path}: {MAX_STAND_INS} shapes in a row from entry {i} "
                           f"cannot be read (the first: {error})")
        return {**sample, "valid": torch.tensor(j == i), "index": i, "error": error}

    def _read(self, i):
        path = self.paths[i]
        shape = load_npy(path, item=True)
        thumbnail_counts = "thumbnail_feat" in shape and self.num_views > 1  # one of the views
        check_shape(shape, path, self.clip_dim, min_views=self.num_views - thumbnail_counts)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        xyz = np.asarray(shape["xyz"], np.float32)
        rgb = np.asarray(shape["rgb"], np.float32)
        idx = choose_points(len(xyz), self.num_points, rng)
        xyz = augment_points(normalize(xyz[idx]), rng, self.augmentations)
        if rng.random() < self.rgb_drop_prob:
            rgb = np.full((len(idx), 3), GREY, np.float32)
        else:
            rgb = rgb[idx]
        try:
            text = self._pick_text(shape, self.ids[i], self.is_objaverse[i], rng)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BadInput(f"{path}: texts are not laid out as in the release "
                           f"({type(e).__name__}: {e})") from None
        points = np.concatenate([xyz, rgb], 1).astype(np.float32)
        return {
            "points": torch.from_numpy(points),
            "image_feat": torch.from_numpy(self._pick_views(shape, rng)),
            "text_feat": torch.zeros(self.clip_dim) if text is None else torch.from_numpy(text),
            "has_text": torch.tensor(text is not None),
        }

    def _pick_views(self, shape, rng):
        """TAMM: `num_views` distinct views; a shape with a thumbnail (Objaverse) always contributes
        it."""
        views = np.asarray(shape["image_feat"], np.float32)
        if "thumbnail_feat" not in shape:
            return views[rng.choice(len(views), self.num_views, replace=False)]
        thumbnail = np.asarray(shape["thumbnail_feat"], np.float32).reshape(1, -1)
        if self.num_views == 1:  # OpenShape's single-view rule: the thumbnail half of the time
            return thumbnail if rng.random() < 0.5 else views[rng.integers(len(views))][None]
        others = views[rng.choice(len(views), self.num_views - 1, replace=False)]
        return np.concatenate([thumbnail, others])

    def _pick_text(self, shape, uid, objaverse, rng):
        """OpenShape: one candidate per source (name text, BLIP or MSFT caption, retrieved text),
        then one."""
        candidates = []
        texts = shape.get("text", [])
        if "text" in self.text_sources and len(texts) > 0:
            if not objaverse:
                candidates.append(shape["text_feat"][rng.integers(len(texts))][self.text_prompt])
            elif uid not in self.flagged:  # Objaverse: the name (text[0]) unless GPT-4 rejected it
                candidates.append(shape["text_feat"][0][self.text_prompt])
        if "caption" in self.text_sources:  # a coin picks BLIP or MSFT; an empty one gives none
            key = "blip_caption" if rng.random() < 0.5 else "msft_caption"
            if len(shape.get(key, "")) > 0:
                candidates.append(shape[key + "_feat"][self.text_prompt])
        retrieved = shape.get("retrieval_text", [])
        if "retrieval_text" in self.text_sources and len(retrieved) > 0:
            feats = shape["retrieval_text_feat"][rng.integers(len(retrieved))]
            candidates.append(feats["original"])
        if not candidates:
            return None
        return np.asarray(candidates[rng.integers(len(candidates))], np.float32).reshape(-1)


def read_gpt4_filter(root):
    """The Objaverse uids whose name text GPT-4 rejected (flag "N" in
    meta_data/gpt4_filtering.json)."""
    path = find_file(root, GPT4_FILTER) or os.path.join(root, GPT4_FILTER[0])
    flags = load_json(path)
    if not isinstance(flags, dict) or not all(isinstance(v, dict) for v in flags.values()):
        raise BadInput(f"{path}: expected {{uid: {{'flag': 'Y' or 'N', ...}}}}")
    return {uid for uid, v in flags.items() if v.get("flag") == "N"}


# ---- zero-shot benchmarks ------------------------------------------------------------------------


class ZeroShotSet(Dataset):
    """One benchmark: items (points (N, 6) [xyz, rgb], label); `class_feat` (C, D) are the text
    features of `class_names`. `load(i)` -> (xyz, rgb in [0, 1]). TAMM's evaluation takes the first
    N points (order="first"; N None: all stored points); OpenShape's permutes them first
    (order="permuted", seeded by the index)."""

    def __init__(self, name, class_names, class_feat, labels, load, num_points=NUM_POINTS,
                 order="first"):
        self.name = name
        self.class_names = list(class_names)
        self.class_feat = torch.as_tensor(np.asarray(class_feat, np.float32))
        self.labels = [int(v) for v in labels]
        self.load = load
        self.num_points = num_points
        self.order = order

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        xyz, rgb = self.load(i)
        rng = np.random.default_rng(i)
        idx = choose_points(len(xyz), self.num_points, rng, first=self.order == "first")
        points = np.concatenate([normalize(xyz[idx]), rgb[idx]], 1).astype(np.float32)
        return torch.from_numpy(points), self.labels[i]


def read_class_feats(path, clip_dim, names=None):
    """cat_name_pt_feat.npy -> (names, (C, D)); class order = the dict's order unless `names` fixes
    it."""
    feats = load_npy(path, item=True)
    names = list(feats) if names is None else names
    unknown = [n for n in names if n not in feats]
    if unknown:
        raise BadInput(f"{path}: no feature for classes {unknown[:5]}")
    try:
        rows = [np.asarray(feats[n]["open_clip_text_feat"], np.float32).reshape(1, -1)
                for n in names]
        matrix = np.concatenate(rows)
    except (KeyError, TypeError, ValueError):
        layout = "{class name: {'open_clip_text_feat': (1, D)}}"
        raise BadInput(f"{path}: expected {layout}") from None
    if matrix.shape[1] != clip_dim:
        raise BadInput(f"{path}: class features have width {matrix.shape[1]}, expected CLIP width "
                       f"{clip_dim}")
    return names, matrix


def _need(folder, files):
    """Paths of `files` in a benchmark folder that exists; BadInput naming the first one missing."""
    paths = [os.path.join(folder, f) for f in files]
    for path in paths:
        if not os.path.exists(path):
            raise BadInput(f"{path}: file not found (the benchmark folder {folder} is incomplete)")
    return paths


def read_modelnet40(folder, name="modelnet40", clip_dim=CLIP_DIM, **kw):
    """ModelNet40's layout (also `val`): test_pc.npy (dicts with xyz, rgb on 0-255), test_split.json
    and cat_name_pt_feat.npy."""
    files = ["test_pc.npy", "test_split.json", "cat_name_pt_feat.npy"]
    pc_path, split_path, feat_path = _need(folder, files)
    clouds = load_npy(pc_path)
    split = load_entries(split_path, ["category"])
    if clouds.ndim != 1 or len(clouds) != len(split):
        raise BadInput(f"{split_path}: {len(split)} entries but {pc_path} has shape {clouds.shape}")
    for k, cloud in enumerate(clouds):
        check_shape(cloud, f"{pc_path}[{k}]", clip_dim)
    names, feats = read_class_feats(feat_path, clip_dim)
    unknown = sorted({e["category"] for e in split} - set(names))
    if unknown:
        raise BadInput(f"{feat_path}: no feature for categories {unknown[:5]} of {split_path}")

    def load(i):
        xyz = np.asarray(clouds[i]["xyz"], np.float32)
        rgb = np.asarray(clouds[i]["rgb"], np.float32) / 255  # stored on 0-255
        return xyz, rgb

    labels = [names.index(e["category"]) for e in split]
    return ZeroShotSet(name, names, feats, labels, load, **kw)


def read_scanobjectnn(folder, clip_dim=CLIP_DIM, **kw):
    """ScanObjectNN: xyz_label.npy {"xyz" (M, 2048, 3), "label" (M,), optional "rgb"}; grey when
    absent. TAMM feeds all 2,048 stored points (its num_points, 10,000, is more than there are): so
    do we."""
    data_path, feat_path = _need(folder, ["xyz_label.npy", "cat_name_pt_feat.npy"])
    stored = load_npy(data_path, item=True)
    missing = [key for key in ("xyz", "label") if key not in stored]
    if missing:
        raise BadInput(f"{data_path}: missing '{missing[0]}'")
    xyz = np.asarray(stored["xyz"], np.float32)
    labels = stored["label"]
    if xyz.ndim != 3 or xyz.shape[2] != 3 or len(xyz) != len(labels) or not np.isfinite(xyz).all():
        raise BadInput(f"{data_path}: xyz {xyz.shape} must be finite (M, N, 3) with one label each "
                       f"({np.shape(labels)})")
    rgb = np.asarray(stored["rgb"], np.float32) if "rgb" in stored else np.full_like(xyz, GREY)
    if rgb.shape != xyz.shape:
        raise BadInput(f"{data_path}: rgb has shape {rgb.shape}, xyz has {xyz.shape}")
    names, feats = read_class_feats(feat_path, clip_dim, SCANOBJECTNN_CLASSES)
    if not all(0 <= int(v) < len(names) for v in labels):
        raise BadInput(f"{data_path}: labels outside the {len(names)} ScanObjectNN classes")
    kw["num_points"] = None  # every stored point
    return ZeroShotSet("scanobjectnn", names, feats, labels, lambda i: (xyz[i], rgb[i]), **kw)


def read_lvis(split_path, feat_path, root, path_prefix=PATH_PREFIX, clip_dim=CLIP_DIM, **kw):
    """Objaverse-LVIS: lvis.json {uid, data_path, category}; classes = the sorted unique categories,
    whose features are the rows of lvis_cat_name_pt_feat.npy in that order."""
    split = load_entries(split_path, ["data_path", "category"])
    names = sorted({e["category"] for e in split})
    feats = np.asarray(load_npy(feat_path), np.float32)
    if feats.shape != (len(names), clip_dim):
        raise BadInput(f"{feat_path}: shape {feats.shape}, expected ({len(names)}, {clip_dim}) for "
                       f"the {len(names)} categories of {split_path}")
    paths = shape_paths(split, root, path_prefix)

    def load(i):
        shape = load_npy(paths[i], item=True)
        check_shape(shape, paths[i], clip_dim)
        return np.asarray(shape["xyz"], np.float32), np.asarray(shape["rgb"], np.float32)

    labels = [names.index(e["category"]) for e in split]
    benchmark = ZeroShotSet("lvis", names, feats, labels, load, **kw)
    benchmark.paths = paths  # the shape files, for messages and tests
    return benchmark


def has_benchmark(root, name):
    """True if some file of benchmark `name` is under root (load_benchmarks then reads it, or names
    what is missing): a cheap check before any work."""
    candidates = LVIS_SPLIT + LVIS_FEAT if name == "lvis" else BENCHMARK_DIRS.get(name, ())
    return find_file(root, candidates) is not None


def load_benchmarks(root, num_points=NUM_POINTS, names=("modelnet40", "lvis", "scanobjectnn"),
                    path_prefix=PATH_PREFIX, clip_dim=CLIP_DIM, order="first"):
    """{name: ZeroShotSet} for every benchmark in `names` whose files are under root (OpenShape's or
    TAMM's layout). A benchmark that is absent is left out; one that is present but incomplete is
    BadInput."""
    check_root(root)
    kw = dict(clip_dim=clip_dim, num_points=num_points, order=order)
    sets = {}
    for name in names:
        if name == "lvis":
            split_path = find_file(root, LVIS_SPLIT)
            feat_path = find_file(root, LVIS_FEAT)
            if (split_path or feat_path) and not (split_path and feat_path):
                absent = (LVIS_FEAT if split_path else LVIS_SPLIT)[0]
                raise BadInput(f"{os.path.join(root, absent)}: file not found (needed for the lvis "
                               f"benchmark)")
            if split_path:
                sets[name] = read_lvis(split_path, feat_path, root, path_prefix, **kw)
        elif name in BENCHMARK_DIRS:
            folder = find_file(root, BENCHMARK_DIRS[name])
            if folder and name == "scanobjectnn":
                sets[name] = read_scanobjectnn(folder, **kw)
            elif folder:
                sets[name] = read_modelnet40(folder, name, **kw)
        else:
            known = ", ".join(BENCHMARK_DIRS)
            raise BadInput(f"unknown benchmark '{name}' (choose from lvis, {known})")
    return sets


# ---- dealing the data to the ranks: the batches of a run are a function of its step --------------


class ShardedSampler(Sampler):
    """DistributedSampler for training: a (seed, epoch) shuffle cut to a multiple of world_size
    (drop_last); rank r takes every world_size-th index. `skip(n)`: this rank already consumed n
    samples of the epoch."""

    def __init__(self, dataset, rank=0, world_size=1, seed=0, shuffle=True):
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.num_samples = len(dataset) // world_size

    def set_epoch(self, epoch):
        """Start epoch `epoch` from its beginning; the dataset's augmentation follows the same
        epoch."""
        self.epoch = epoch
        self.start = 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def skip(self, n):
        self.start = n

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        mine = order[: self.num_samples * self.world_size][self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())

    def __len__(self):
        return max(0, self.num_samples - self.start)


KNN_NEIGHBORS = 31   # hard negatives among a seed's 31 nearest neighbours (OpenShape src/data.py)
KNN_GROUP_SIZE = 4   # shapes per group; the released configs ship 1 (hard negatives off)


class KnnBatchSampler(ShardedSampler):
    """OpenShape's hard negatives (meta_data/point_feat_knn.npy): a batch is batch_size / group_size
    seed shapes, each with group_size - 1 shapes among its `num_neighbors` nearest neighbours in
    point-feature space.

    An epoch has len(dataset) / group_size seeds in a (seed, epoch) shuffle; batches are dealt to
    the ranks in turn. Neighbours outside the split are passed over; a group short of them gets
    random shapes."""

    def __init__(self, dataset, batch_size, knn_path, group_size=KNN_GROUP_SIZE,
                 num_neighbors=KNN_NEIGHBORS, rank=0, world_size=1, seed=0):
        super().__init__(dataset, rank, world_size, seed)
        if batch_size % group_size:
            raise BadInput(f"--batch-size {batch_size} is not a multiple of the knn group size "
                           f"{group_size}")
        self.knn = load_npy(knn_path, item=True)
        if not {"name", "index"} <= self.knn.keys():
            raise BadInput(f"{knn_path}: expected a dict with 'name' and 'index'")
        self.batch_size = batch_size
        self.group_size = group_size
        self.num_neighbors = num_neighbors
        self.uid_to_index = {uid: k for k, uid in enumerate(dataset.ids)}
        self.num_batches = len(dataset) // batch_size // world_size

    def _group(self, seed_index, rng):
        uid = self.dataset.ids[seed_index]
        neighbours = self.knn["index"].get(uid, [])[1 : self.num_neighbors + 1]  # [0]: the shape
        shuffled = np.asarray(neighbours)[rng.permutation(len(neighbours))]
        in_split = [self.uid_to_index[u] for u in (self.knn["name"][j] for j in shuffled)
                    if u in self.uid_to_index]
        group = [seed_index] + in_split[: self.group_size - 1]
        return group + rng.integers(0, len(self.dataset), self.group_size - len(group)).tolist()

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        seeds = rng.permutation(len(self.dataset))[: len(self.dataset) // self.group_size]
        per_batch = self.batch_size // self.group_size
        # every rank builds every batch, so the rng draws stay in step; rank r keeps r, r + world,
        # ...
        batches = []
        for b in range(self.num_batches * self.world_size):
            batch_seeds = seeds[b * per_batch : (b + 1) * per_batch]
            batches.append([k for s in batch_seeds for k in self._group(int(s), rng)])
        return iter(batches[self.rank :: self.world_size][self.start // self.batch_size :])

    def __len__(self):
        return max(0, self.num_batches - self.start // self.batch_size)


def make_train_loader(dataset, batch_size, rank=0, world_size=1, seed=0, workers=0, knn=None,
                      knn_group_size=KNN_GROUP_SIZE):
    """(loader, sampler) of drop_last training batches; `knn`: path of point_feat_knn.npy (hard
    negatives)."""
    # its own generator: DataLoader would otherwise draw worker seeds from the global RNG at every
    # epoch, which would make the model's dropout stream depend on when an epoch's iterator was
    # created
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
                  generator=torch.Generator().manual_seed(seed))
    if knn:
        sampler = KnnBatchSampler(dataset, batch_size, knn, knn_group_size, rank=rank,
                                  world_size=world_size, seed=seed)
        loader = DataLoader(dataset, batch_sampler=sampler, **common)
    else:
        sampler = ShardedSampler(dataset, rank, world_size, seed)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            **common)
    if len(loader) == 0:
        name = getattr(dataset, "split_path", "dataset")
        raise BadInput(f"{name}: {len(dataset)} shapes are not enough for one batch of "
                       f"{batch_size} on each of {world_size} ranks")
    return loader, sampler


def endless_batches(loader, sampler, step, local_batch):
    """The batches of a run from global step `step` on, epoch after epoch (epoch = step // batches
    per epoch). The data position is a function of the step alone, so a resumed run sees exactly the
    batches it missed."""
    epoch, done = divmod(step, len(loader))
    while True:
        sampler.set_epoch(epoch)  # a new shuffle; the dataset's augmentation follows the epoch too
        sampler.skip(done * local_batch)
        yield from loader
        epoch, done = epoch + 1, 0


class WithIndex(Dataset):
    """ds[i] + (i,): evaluation gathers the indices with the features, to count every shape exactly
    once."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


def make_eval_loader(dataset, batch_size, rank=0, world_size=1, workers=0):
    """Batches of (points, labels, indices) over shapes rank, rank + world, ...: each shape on
    exactly one rank, none padded or repeated (unlike DistributedSampler), so gathered counts are
    exact."""
    # its own generator: creating the iterator would otherwise draw from the global RNG, so
    # validating during training would change the training's dropout stream
    mine = range(rank, len(dataset), world_size)
    return DataLoader(WithIndex(dataset), batch_size=batch_size, sampler=mine, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator())
