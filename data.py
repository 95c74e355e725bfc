"""Data of TAMM: the OpenShape release on disk -> training triplets, zero-shot benchmarks, loaders, download.

TAMM (paper Sec. 4.1) trains on OpenShape's "ensembled" data (ShapeNet, 3D-FUTURE, ABO, Objaverse) and
evaluates zero-shot on ModelNet40, Objaverse-LVIS and ScanObjectNN. This file reads the public release
exactly as the official code does (tamm-facts.md sections 4-5):

- Training (`TrainTriplets`): a split JSON lists shapes, each a per-shape `.npy` holding a pickled dict with
  points (xyz stored y-up, rgb in [0, 1]) and precomputed CLIP ViT-bigG-14 features of 12 rendered views (plus
  a thumbnail for Objaverse) and of several texts. One sample = 10,000 points [xyz, rgb] after OpenShape's
  preprocessing (swap y/z, centre, divide by the max norm, augment), 4 distinct view features (TAMM; the
  thumbnail + 3 views when there is a thumbnail) and one text feature picked as OpenShape does (name text,
  a BLIP or MSFT caption, a retrieved text; `prompt_avg` features except `original` for retrieved texts;
  Objaverse names flagged "N" by the GPT-4 filter are dropped).
- Evaluation (`load_benchmarks`): ModelNet40, Objaverse-LVIS, ScanObjectNN and a `val` set in the ModelNet40
  layout, with their class-name text features; TAMM takes the first N points, no augmentation.
- Loaders: `ShardedSampler` (DistributedSampler-like, resumable mid-epoch), `KnnBatchSampler` (OpenShape's hard
  negatives from `point_feat_knn.npy`), `make_train_loader`, `make_eval_loader` (every sample on one rank).
- `python data.py download`: fetches the release (~205 GB) from the Hugging Face dataset.

Data root: the folder holding `meta_data/` (OpenShape layout, or TAMM's `meta_data/Pre-Training/split/...` and
`meta_data/Zero-Shot/...`) and the unpacked archives. The split files store absolute paths that start with
`/mnt/data`; that prefix is replaced by the root (`path_prefix` to change it).

Randomness: every random choice for sample i in epoch e comes from `np.random.default_rng([seed, e, i])`, never
from global RNGs, so a batch does not depend on the number of workers and a resumed run sees the same data.

Security: the release's `.npy` files are Python pickles (`np.load(..., allow_pickle=True)`): loading one can run
arbitrary code. Only read files from a source you trust (the official Hugging Face dataset).

    python data.py download --out /data/openshape --only meta_data              # 1 archive, to look around
    python data.py download --out /data/openshape --unpack                      # everything, resumable
    python -c "import data; d = data.TrainTriplets('/data/openshape'); print(len(d), d[0]['points'].shape)"
"""
import argparse
import fnmatch
import importlib
import json
import math
import os
import shutil
import tarfile
import warnings
import zipfile

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from utils import BadInput, check_writable, hub_offline, hub_reachable, run_cli

# ---- defaults: the official stage-2 config (OpenShape train.yaml, TAMM pointbert.yaml) ------------------------
CLIP_DIM = 1280               # OpenCLIP ViT-bigG-14 feature width (tamm-facts.md 1)
NUM_POINTS = 10000            # dataset.num_points
NUM_VIEWS = 4                 # TAMM: 4 image views per shape and step
RGB_DROP_PROB = 0.5           # dataset.rgb_random_drop_prob
GREY = 0.4                    # colour of dropped rgb, and ScanObjectNN's missing rgb (OpenShape)
TEXT_PROMPT = "prompt_avg"    # dataset.use_prompt_engineering: True (retrieved texts always use "original")
TEXT_SOURCES = ("text", "caption", "retrieval_text")    # dataset.text_source
AUGMENTATIONS = ("dropout", "scale", "shift", "rotate_small", "rotate_z")  # augment_pc + random_z_rotate
PATH_PREFIX = "/mnt/data"     # prefix of every data_path in the released split files
MAX_DROPOUT = 0.875           # PointNet++ random_point_dropout, used by OpenShape's augment_pc
SCALE_RANGE = (0.8, 1.25)     # random_scale_point_cloud
SHIFT_RANGE = 0.1             # shift_point_cloud
ROT_SIGMA, ROT_CLIP = 0.06, 0.18   # rotate_perturbation_point_cloud (radians)
KNN_NEIGHBORS = 31            # OpenShape picks hard negatives among a seed's 31 nearest neighbours
KNN_GROUP_SIZE = 4            # our default: OpenShape's config ships hard negatives switched off (size 1)

# ScanObjectNN labels index this fixed list (OpenShape hard-codes it), not the order of the feature file.
SCANOBJECTNN_CLASSES = ["bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
                        "bed", "pillow", "sink", "sofa", "toilet"]

# Where files may live under the root: the OpenShape layout first, then TAMM's.
SPLIT_DIRS = ("meta_data/split", "meta_data/Pre-Training/split")
GPT4_FILTER = ("meta_data/gpt4_filtering.json", "meta_data/Pre-Training/gpt4_filtering.json")
KNN_FILE = ("meta_data/point_feat_knn.npy", "meta_data/Pre-Training/point_feat_knn.npy")
BENCHMARK_DIRS = {"modelnet40": ("meta_data/modelnet40", "meta_data/Zero-Shot/modelnet40"),
                  "scanobjectnn": ("meta_data/scanobjectnn", "meta_data/Zero-Shot/scanobjectnn"),
                  "val": ("meta_data/val",)}
LVIS_SPLIT = ("meta_data/split/lvis.json", "meta_data/Pre-Training/split/lvis.json",
              "meta_data/Zero-Shot/split/lvis.json", "meta_data/Zero-Shot/lvis.json")
LVIS_FEAT = ("meta_data/lvis_cat_name_pt_feat.npy", "meta_data/Zero-Shot/lvis_cat_name_pt_feat.npy")

HF_DATASET = "OpenShape/openshape-training-data"
DOWNLOAD_PARTS = {"meta_data": "meta_data.zip", "shapenet": "ShapeNet.tar.gz", "objaverse": "Objaverse/*",
                  "3d-future": "3D-FUTURE.tar.gz", "abo": "ABO.tar.gz"}


# ---- reading files -----------------------------------------------------------------------------------------

def find_file(root, candidates):
    """The first of `candidates` (paths relative to root) that exists, else None."""
    for rel in candidates:
        if os.path.exists(os.path.join(root, rel)):
            return os.path.join(root, rel)
    return None


def map_path(data_path, root, prefix=PATH_PREFIX):
    """Replace the release's absolute `prefix` (/mnt/data) of a split entry's data_path by the data root."""
    if prefix and (data_path + "/").startswith(prefix.rstrip("/") + "/"):
        return os.path.join(root, data_path[len(prefix):].lstrip("/"))
    return data_path if os.path.isabs(data_path) else os.path.join(root, data_path)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not readable JSON ({e})") from None


def load_entries(path, keys):
    """A JSON list of dicts that all have `keys` (split files, lvis.json, test_split.json)."""
    entries = load_json(path)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and set(keys) <= e.keys() for e in entries):
        raise BadInput(f"{path}: expected a JSON list of entries with keys {list(keys)}")
    return entries


def load_npy(path, item=False):
    """np.load a release file; with `item`, unwrap the pickled object (a dict in the release)."""
    try:
        arr = np.load(path, allow_pickle=True)
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except Exception as e:  # unpickling a damaged file can raise almost anything
        raise BadInput(f"{path}: cannot read ({type(e).__name__}); truncated or not a .npy file") from None
    if not item:
        return arr
    if arr.shape != () or not isinstance(arr.item(), dict):
        found = type(arr.item()).__name__ if arr.shape == () else f"an array of shape {arr.shape}"
        raise BadInput(f"{path}: expected a pickled dict, found {found}")
    return arr.item()


def _feature_arrays(shape):
    """(name, array) for every CLIP feature stored in a per-shape dict."""
    for key in ("image_feat", "thumbnail_feat"):
        if key in shape:
            yield key, shape[key]
    for key in ("text_feat", "retrieval_text_feat"):
        for k, variants in enumerate(shape.get(key, [])):
            for variant, feat in variants.items():
                yield f"{key}[{k}][{variant}]", feat
    for key in ("blip_caption_feat", "msft_caption_feat"):
        for variant, feat in shape.get(key, {}).items():
            yield f"{key}[{variant}]", feat


def check_shape(shape, path, clip_dim=CLIP_DIM, min_views=0):
    """Raise BadInput naming `path` unless `shape` is a usable per-shape dict of the release format.

    Checks: a dict with `xyz` (N, 3) and `rgb` (N, 3), all finite; every stored CLIP feature `clip_dim` wide;
    with `min_views` > 0 also `image_feat` with at least that many views."""
    if not isinstance(shape, dict):
        raise BadInput(f"{path}: expected a dict, found {type(shape).__name__}")
    for key in ("xyz", "rgb", "image_feat") if min_views else ("xyz", "rgb"):
        if key not in shape:
            raise BadInput(f"{path}: missing '{key}'")
    xyz, rgb = np.asarray(shape["xyz"]), np.asarray(shape["rgb"])
    if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0:
        raise BadInput(f"{path}: xyz has shape {xyz.shape}, expected (N, 3)")
    if rgb.shape != xyz.shape:
        raise BadInput(f"{path}: rgb has shape {rgb.shape}, xyz has {xyz.shape}")
    for key, arr in (("xyz", xyz), ("rgb", rgb)):
        if not np.isfinite(arr).all():
            raise BadInput(f"{path}: {key} contains NaN or inf")
    try:
        for name, feat in _feature_arrays(shape):
            if np.ndim(feat) == 0 or np.shape(feat)[-1] != clip_dim:
                raise BadInput(f"{path}: {name} has shape {np.shape(feat)}, expected CLIP width {clip_dim}")
    except (AttributeError, TypeError) as e:
        raise BadInput(f"{path}: text features are not laid out as in the release ({e})") from None
    if min_views and (np.ndim(shape["image_feat"]) != 2 or len(shape["image_feat"]) < min_views):
        raise BadInput(f"{path}: image_feat has shape {np.shape(shape['image_feat'])}, need {min_views} views")


# ---- point preprocessing (tamm-facts.md 5) -------------------------------------------------------------------

def choose_points(n, num_points, rng, first=False):
    """Indices of `num_points` of `n` stored points: the first ones (TAMM evaluation) or a random subset.

    With fewer stored points than requested, all of them are kept and the rest is drawn with replacement."""
    if n >= num_points:
        return np.arange(num_points) if first else rng.permutation(n)[:num_points]
    base = np.arange(n) if first else rng.permutation(n)
    return np.concatenate([base, rng.integers(0, n, num_points - n)])


def normalize(xyz):
    """Swap y/z (the release is y-up, the model z-up), centre, and divide by the largest norm (OpenShape)."""
    xyz = xyz[:, [0, 2, 1]]
    xyz = xyz - xyz.mean(axis=0)
    scale = np.linalg.norm(xyz, axis=1).max()
    return xyz / scale if scale > 1e-6 else np.zeros_like(xyz)


def _rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)


def augment_points(xyz, rng, ops=AUGMENTATIONS):
    """OpenShape's training augmentation, in its order: PointNet++ augment_pc, then a random turn about z."""
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

def resolve_split(root, split):
    """A split name (train_all, train_no_lvis, ablation/train_shapenet_only) or a JSON path -> its path."""
    if split.endswith(".json") and os.path.isfile(split):
        return split
    found = find_file(root, [f"{d}/{split}.json" for d in SPLIT_DIRS])
    if found is None:
        raise BadInput(f"{os.path.join(root, SPLIT_DIRS[0], split + '.json')}: split file not found "
                       f"(also looked in {SPLIT_DIRS[1]}/)")
    return found


def check_root(root):
    if not os.path.isdir(root):
        raise BadInput(f"{root}: data folder does not exist")


class TrainTriplets(Dataset):
    """(points, image-view features, text feature) of every shape in a split, as OpenShape/TAMM train on them.

    `__getitem__(i)` -> {"points" (N, 6) [xyz, rgb], "image_feat" (V, D), "text_feat" (D,), "has_text", "index"},
    or None for a broken file when not `strict` (a warning names it once; `collate_train` drops and counts it)."""

    def __init__(self, root, split="train_all", num_points=NUM_POINTS, num_views=NUM_VIEWS, augment=True,
                 rgb_drop_prob=RGB_DROP_PROB, text_prompt=TEXT_PROMPT, use_gpt4_filter=True,
                 path_prefix=PATH_PREFIX, clip_dim=CLIP_DIM, seed=0, strict=False,
                 augmentations=AUGMENTATIONS, text_sources=TEXT_SOURCES):
        check_root(root)
        self.split_path = resolve_split(root, split)
        entries = load_entries(self.split_path, ["data_path"])
        self.ids = [e.get("id", str(k)) for k, e in enumerate(entries)]
        self.paths = [map_path(e["data_path"], root, path_prefix) for e in entries]
        self.is_objaverse = [e.get("dataset") == "Objaverse" for e in entries]
        self.flagged = set()  # Objaverse uids whose name text the GPT-4 filter rejected
        if use_gpt4_filter and "text" in text_sources and any(self.is_objaverse):
            path = find_file(root, GPT4_FILTER) or os.path.join(root, GPT4_FILTER[0])
            flags = load_json(path)
            if not isinstance(flags, dict) or not all(isinstance(v, dict) for v in flags.values()):
                raise BadInput(f"{path}: expected {{uid: {{'flag': 'Y' or 'N', ...}}}}")
            self.flagged = {uid for uid, v in flags.items() if v.get("flag") == "N"}
        self.num_points, self.num_views, self.clip_dim = num_points, num_views, clip_dim
        self.augmentations = augmentations if augment else ()
        self.rgb_drop_prob = rgb_drop_prob if augment else 0.0
        self.text_prompt, self.text_sources = text_prompt, text_sources
        self.seed, self.epoch, self.strict = seed, 0, strict
        self._warned = set()

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        try:
            return self._read(i)
        except BadInput as e:
            if self.strict:
                raise
            if self.paths[i] not in self._warned:
                self._warned.add(self.paths[i])
                warnings.warn(f"skipping broken shape: {e}")
            return None

    def _read(self, i):
        path = self.paths[i]
        shape = load_npy(path, item=True)
        thumb_counts = "thumbnail_feat" in shape and self.num_views > 1  # the thumbnail is one of the views
        check_shape(shape, path, self.clip_dim, min_views=self.num_views - 1 if thumb_counts else self.num_views)
        try:
            return self._sample(shape, i, np.random.default_rng([self.seed, self.epoch, i]))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BadInput(f"{path}: texts are not laid out as in the release ({type(e).__name__}: {e})") from None

    def _sample(self, shape, i, rng):
        xyz, rgb = np.asarray(shape["xyz"], np.float32), np.asarray(shape["rgb"], np.float32)
        idx = choose_points(len(xyz), self.num_points, rng)
        xyz = augment_points(normalize(xyz[idx]), rng, self.augmentations)
        rgb = np.full((len(idx), 3), GREY, np.float32) if rng.random() < self.rgb_drop_prob else rgb[idx]
        text = self._pick_text(shape, self.ids[i], self.is_objaverse[i], rng)
        return {"points": torch.from_numpy(np.concatenate([xyz, rgb], 1).astype(np.float32)),
                "image_feat": torch.from_numpy(self._pick_views(shape, rng)),
                "text_feat": torch.zeros(self.clip_dim) if text is None else torch.from_numpy(text),
                "has_text": torch.tensor(text is not None),
                "index": i}

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
        found = []
        texts = shape.get("text", [])
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
        if not found:
            return None
        return np.asarray(found[rng.integers(len(found))], np.float32).reshape(-1)


def collate_train(batch):
    """Stack a batch, keeping its size: broken shapes (None) are replaced by repeats of loaded ones, marked
    False in `valid` so the loss leaves them out, and counted in `num_skipped`.

    Keeping the size matters under DDP: every rank must gather features of the same length. An all-broken
    batch has 0 rows (the training loop skips that step on every rank)."""
    good = [b for b in batch if b is not None]
    if not good:
        return {"points": torch.empty(0, 0, 6), "image_feat": torch.empty(0, 0, 0), "text_feat": torch.empty(0, 0),
                "has_text": torch.empty(0, dtype=torch.bool), "index": torch.empty(0, dtype=torch.long),
                "valid": torch.empty(0, dtype=torch.bool), "num_skipped": len(batch)}
    filled = good + [good[k % len(good)] for k in range(len(batch) - len(good))]
    out = {k: torch.stack([b[k] for b in filled]) for k in ("points", "image_feat", "text_feat", "has_text")}
    out["index"] = torch.tensor([b["index"] for b in filled], dtype=torch.long)
    out["valid"] = torch.arange(len(batch)) < len(good)
    out["num_skipped"] = len(batch) - len(good)
    return out


# ---- samplers and loaders ------------------------------------------------------------------------------------

class _EpochSampler(Sampler):
    """What both training samplers share: an epoch that also reaches the dataset, and a resume point."""

    def __init__(self, dataset, rank, world_size, seed):
        self.dataset, self.rank, self.world_size, self.seed = dataset, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        """Start epoch `epoch` from its beginning; the dataset's augmentation follows the same epoch."""
        self.epoch, self.start = epoch, 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def skip(self, n):
        """Resume mid-epoch: this rank already consumed the first `n` samples of the epoch (steps * batch size)."""
        self.start = n


class ShardedSampler(_EpochSampler):
    """DistributedSampler for training: a (seed, epoch) shuffle, cut to a multiple of world_size (drop_last),
    rank r takes every world_size-th index, starting after `start` (see `skip`)."""

    def __init__(self, dataset, rank=0, world_size=1, seed=0, shuffle=True):
        super().__init__(dataset, rank, world_size, seed)
        self.shuffle, self.num_samples = shuffle, len(dataset) // world_size

    def __iter__(self):
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        mine = order[: self.num_samples * self.world_size][self.rank::self.world_size]
        return iter(mine[self.start:].tolist())

    def __len__(self):
        return max(0, self.num_samples - self.start)


class KnnBatchSampler(_EpochSampler):
    """OpenShape's hard negatives: each batch is batch_size / group_size seed shapes, each with group_size - 1
    shapes drawn among its `num_neighbors` nearest neighbours in point-feature space (point_feat_knn.npy).

    An epoch has len(dataset) / group_size seeds (as in OpenShape) in a (seed, epoch) shuffle; batches are dealt
    to ranks in turn, the remainder dropped. Neighbours outside the split are passed over; if too few remain the
    group is filled with random shapes. `skip(n)` counts samples, like ShardedSampler."""

    def __init__(self, dataset, batch_size, knn_path, group_size=KNN_GROUP_SIZE, num_neighbors=KNN_NEIGHBORS,
                 rank=0, world_size=1, seed=0):
        super().__init__(dataset, rank, world_size, seed)
        if batch_size % group_size:
            raise BadInput(f"--batch-size {batch_size} is not a multiple of the knn group size {group_size}")
        knn = load_npy(knn_path, item=True)
        if not {"name", "index"} <= knn.keys():
            raise BadInput(f"{knn_path}: expected a dict with 'name' and 'index'")
        self.knn, self.batch_size, self.group_size, self.num_neighbors = knn, batch_size, group_size, num_neighbors
        self.uid_to_index = {uid: k for k, uid in enumerate(dataset.ids)}
        seeds_per_batch = batch_size // group_size
        self.num_batches = (len(dataset) // group_size // seeds_per_batch) // world_size

    def _group(self, seed_index, rng):
        neighbours = self.knn["index"].get(self.dataset.ids[seed_index], [])[1:self.num_neighbors + 1]  # [0] = self
        ranked = [self.knn["name"][j] for j in np.asarray(neighbours)[rng.permutation(len(neighbours))]]
        group = [seed_index] + [self.uid_to_index[u] for u in ranked if u in self.uid_to_index][:self.group_size - 1]
        return group + rng.integers(0, len(self.dataset), self.group_size - len(group)).tolist()

    def __iter__(self):
        n = len(self.dataset)
        rng = np.random.default_rng([self.seed, self.epoch])
        seeds = rng.permutation(n)[: n // self.group_size]
        per_batch = self.batch_size // self.group_size
        my_batches = range(self.rank, self.num_batches * self.world_size, self.world_size)
        batches = []
        for b in range(self.num_batches * self.world_size):  # every rank builds all, so rng draws stay in step
            batch = [k for s in seeds[b * per_batch:(b + 1) * per_batch] for k in self._group(int(s), rng)]
            if b in my_batches:
                batches.append(batch)
        return iter(batches[self.start // self.batch_size:])

    def __len__(self):
        return max(0, self.num_batches - self.start // self.batch_size)


def make_train_loader(dataset, batch_size, rank=0, world_size=1, seed=0, workers=0, knn=None,
                      knn_group_size=KNN_GROUP_SIZE):
    """(loader, sampler) for training: drop_last batches of `collate_train`; `knn` = path of point_feat_knn.npy
    switches on hard-negative batches. Call `sampler.set_epoch(e)` before each epoch."""
    # own generator: DataLoader otherwise draws its worker seed from the global RNG at every epoch, which would
    # make the model's dropout stream depend on when an epoch's iterator was created (breaks exact resume)
    common = dict(num_workers=workers, collate_fn=collate_train, pin_memory=torch.cuda.is_available(),
                  generator=torch.Generator().manual_seed(seed),
                  persistent_workers=False)  # fresh workers each epoch pick up the dataset's new epoch
    if knn:
        sampler = KnnBatchSampler(dataset, batch_size, knn, knn_group_size, rank=rank, world_size=world_size,
                                  seed=seed)
        loader = DataLoader(dataset, batch_sampler=sampler, **common)
    else:
        sampler = ShardedSampler(dataset, rank, world_size, seed)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    if len(loader) == 0:
        raise BadInput(f"{getattr(dataset, 'split_path', 'dataset')}: {len(dataset)} shapes are not enough for one "
                       f"batch of {batch_size} on each of {world_size} ranks")
    return loader, sampler


class _WithIndex(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


def make_eval_loader(dataset, batch_size, rank=0, world_size=1, workers=0):
    """Batches of (points, labels, global indices) over samples rank, rank + world, ...: every sample is seen by
    exactly one rank and none is padded or repeated (unlike DistributedSampler), so gathered counts are exact."""
    return DataLoader(_WithIndex(dataset), batch_size=batch_size, sampler=range(rank, len(dataset), world_size),
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)


# ---- zero-shot benchmarks ------------------------------------------------------------------------------------

class _Clouds:
    """Lazy (xyz, rgb in [0, 1]) access to in-memory point arrays, or to per-shape files when `paths` is given."""

    def __init__(self, xyz=None, rgb=None, rgb_scale=1.0, paths=None, clip_dim=CLIP_DIM):
        self.xyz, self.rgb, self.rgb_scale, self.paths, self.clip_dim = xyz, rgb, rgb_scale, paths, clip_dim

    def __len__(self):
        return len(self.paths if self.paths is not None else self.xyz)

    def __getitem__(self, i):
        if self.paths is not None:
            shape = load_npy(self.paths[i], item=True)
            check_shape(shape, self.paths[i], self.clip_dim)
            return np.asarray(shape["xyz"], np.float32), np.asarray(shape["rgb"], np.float32)
        xyz = np.asarray(self.xyz[i], np.float32)
        if self.rgb is None:
            return xyz, np.full_like(xyz, GREY)
        return xyz, np.asarray(self.rgb[i], np.float32) * self.rgb_scale


class ZeroShotSet(Dataset):
    """One evaluation benchmark: items (points (N, 6) [xyz, rgb], label); `class_feat` (C, D) text features of
    `class_names`. TAMM's evaluation: the first N points, swap y/z, normalise, no augmentation."""

    def __init__(self, name, class_names, class_feat, labels, clouds, num_points=NUM_POINTS):
        self.name, self.class_names, self.clouds, self.num_points = name, list(class_names), clouds, num_points
        self.class_feat = torch.as_tensor(np.asarray(class_feat, np.float32))
        self.labels = [int(v) for v in labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        xyz, rgb = self.clouds[i]
        idx = choose_points(len(xyz), self.num_points, np.random.default_rng(i), first=True)
        return torch.from_numpy(np.concatenate([normalize(xyz[idx]), rgb[idx]], 1).astype(np.float32)), self.labels[i]


def _class_feats(path, clip_dim, names=None):
    """cat_name_pt_feat.npy -> (names, (C, D)); class order = dict order unless `names` fixes it."""
    feats = load_npy(path, item=True)
    names = list(feats) if names is None else names
    missing = [n for n in names if n not in feats]
    if missing:
        raise BadInput(f"{path}: no feature for classes {missing[:5]}")
    try:
        mat = np.concatenate([np.asarray(feats[n]["open_clip_text_feat"], np.float32).reshape(1, -1) for n in names])
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{path}: expected {{class name: {{'open_clip_text_feat': (1, D)}}}}") from None
    if mat.shape[1] != clip_dim:
        raise BadInput(f"{path}: class features have width {mat.shape[1]}, expected CLIP width {clip_dim}")
    return names, mat


def _need(folder, files):
    """Paths of `files` in a benchmark folder that exists; BadInput naming the first one missing."""
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.exists(p):
            raise BadInput(f"{p}: file not found (the benchmark folder {folder} is incomplete)")
    return paths


def read_modelnet40(folder, name="modelnet40", num_points=NUM_POINTS, clip_dim=CLIP_DIM):
    """ModelNet40 layout (also `val`): test_pc.npy (dicts with xyz and rgb on 0-255) + test_split.json."""
    pc_path, split_path, feat_path = _need(folder, ["test_pc.npy", "test_split.json", "cat_name_pt_feat.npy"])
    pcs, split = load_npy(pc_path), load_entries(split_path, ["category"])
    if pcs.ndim != 1 or len(pcs) != len(split):
        raise BadInput(f"{split_path}: {len(split)} entries but {pc_path} has shape {pcs.shape}")
    for k, pc in enumerate(pcs):
        check_shape(pc, f"{pc_path}[{k}]", clip_dim)
    names, feats = _class_feats(feat_path, clip_dim)
    index = {n: k for k, n in enumerate(names)}
    unknown = sorted({e["category"] for e in split} - index.keys())
    if unknown:
        raise BadInput(f"{feat_path}: no feature for categories {unknown[:5]} of {split_path}")
    clouds = _Clouds([pc["xyz"] for pc in pcs], [pc["rgb"] for pc in pcs], rgb_scale=1 / 255)
    return ZeroShotSet(name, names, feats, [index[e["category"]] for e in split], clouds, num_points)


def read_scanobjectnn(folder, num_points=NUM_POINTS, clip_dim=CLIP_DIM):
    """ScanObjectNN: xyz_label.npy {"xyz" (M, 2048, 3), "label" (M,), optional "rgb"}; rgb 0.4 when absent."""
    data_path, feat_path = _need(folder, ["xyz_label.npy", "cat_name_pt_feat.npy"])
    data = load_npy(data_path, item=True)
    for key in ("xyz", "label"):
        if key not in data:
            raise BadInput(f"{data_path}: missing '{key}'")
    xyz = np.asarray(data["xyz"])
    if xyz.ndim != 3 or xyz.shape[2] != 3 or len(xyz) != len(data["label"]):
        raise BadInput(f"{data_path}: xyz {xyz.shape} and label {np.shape(data['label'])} do not match")
    if not np.isfinite(xyz).all():
        raise BadInput(f"{data_path}: xyz contains NaN or inf")
    if "rgb" in data and np.shape(data["rgb"]) != xyz.shape:
        raise BadInput(f"{data_path}: rgb has shape {np.shape(data['rgb'])}, xyz has {xyz.shape}")
    names, feats = _class_feats(feat_path, clip_dim, SCANOBJECTNN_CLASSES)
    labels = [int(v) for v in data["label"]]
    if not all(0 <= v < len(names) for v in labels):
        raise BadInput(f"{data_path}: labels outside the {len(names)} ScanObjectNN classes")
    return ZeroShotSet("scanobjectnn", names, feats, labels, _Clouds(xyz, data.get("rgb")), num_points)


def read_lvis(split_path, feat_path, root, num_points=NUM_POINTS, path_prefix=PATH_PREFIX, clip_dim=CLIP_DIM):
    """Objaverse-LVIS: lvis.json entries {uid, data_path, category}; classes = sorted unique categories, whose
    features are the rows of lvis_cat_name_pt_feat.npy in that order."""
    split = load_entries(split_path, ["data_path", "category"])
    names = sorted({e["category"] for e in split})
    feats = np.asarray(load_npy(feat_path), np.float32)
    if feats.shape != (len(names), clip_dim):
        raise BadInput(f"{feat_path}: shape {feats.shape}, expected ({len(names)}, {clip_dim}) for the "
                       f"{len(names)} categories of {split_path}")
    index = {n: k for k, n in enumerate(names)}
    clouds = _Clouds(paths=[map_path(e["data_path"], root, path_prefix) for e in split], clip_dim=clip_dim)
    return ZeroShotSet("lvis", names, feats, [index[e["category"]] for e in split], clouds, num_points)


def load_benchmarks(root, num_points=NUM_POINTS, names=("modelnet40", "lvis", "scanobjectnn"),
                    path_prefix=PATH_PREFIX, clip_dim=CLIP_DIM):
    """{name: ZeroShotSet} for every benchmark in `names` whose files are under root (OpenShape or TAMM layout).

    A benchmark that is absent is left out; one that is present but incomplete is a BadInput."""
    check_root(root)
    out = {}
    for name in names:
        if name == "lvis":
            split_path, feat_path = find_file(root, LVIS_SPLIT), find_file(root, LVIS_FEAT)
            if split_path or feat_path:
                if not (split_path and feat_path):
                    missing = os.path.join(root, (LVIS_FEAT if split_path else LVIS_SPLIT)[0])
                    raise BadInput(f"{missing}: file not found (needed for the lvis benchmark)")
                out[name] = read_lvis(split_path, feat_path, root, num_points, path_prefix, clip_dim)
        elif name in BENCHMARK_DIRS:
            folder = find_file(root, BENCHMARK_DIRS[name])
            if folder and name == "scanobjectnn":
                out[name] = read_scanobjectnn(folder, num_points, clip_dim)
            elif folder:
                out[name] = read_modelnet40(folder, name, num_points, clip_dim)
        else:
            raise BadInput(f"unknown benchmark '{name}' (choose from lvis, {', '.join(BENCHMARK_DIRS)})")
    return out


# ---- download ------------------------------------------------------------------------------------------------

def _network_errors():
    """What the hub client raises when the network is down; its HTTP library depends on its version."""
    from huggingface_hub.errors import HfHubHTTPError
    errors = [ConnectionError, TimeoutError, HfHubHTTPError]  # ConnectionError covers OfflineModeIsEnabled
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except ImportError:
            pass
    return tuple(errors)


def unpack(out, archives):
    """Extract downloaded .tar.gz/.zip archives into `out` once (a marker under out/.unpacked/ remembers it)."""
    os.makedirs(os.path.join(out, ".unpacked"), exist_ok=True)
    for name in tqdm(archives, desc="unpack", unit="archive"):
        marker = os.path.join(out, ".unpacked", name.replace("/", "_") + ".done")
        if os.path.exists(marker):
            continue
        if name.endswith(".zip"):
            with zipfile.ZipFile(os.path.join(out, name)) as z:
                z.extractall(out)
        else:
            with tarfile.open(os.path.join(out, name)) as t:
                t.extractall(out, filter="data")  # refuse absolute paths and links out of `out`
        open(marker, "w").close()


def download(out, parts=tuple(DOWNLOAD_PARTS), do_unpack=False):
    """Fetch parts of the OpenShape release into `out` (resumable: finished files are kept and skipped)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    check_writable(out)
    patterns = [DOWNLOAD_PARTS[p] for p in parts]
    if not hub_offline() and not hub_reachable(constants.ENDPOINT):  # fail in seconds, not after retries
        raise BadInput(f"{HF_DATASET}: cannot download from the Hugging Face Hub (no answer from "
                       f"{constants.ENDPOINT}); check the network connection")
    try:
        info = HfApi().dataset_info(HF_DATASET, files_metadata=True, timeout=30)
        files = [s for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
        total = sum(s.size or 0 for s in files)
        free = shutil.disk_usage(out).free
        print(f"{HF_DATASET}: {len(files)} files, {total / 1e9:.1f} GB to fetch into {out} "
              f"({free / 1e9:.0f} GB free{'' if free > total else ' - NOT ENOUGH'})")
        snapshot_download(HF_DATASET, repo_type="dataset", local_dir=out, allow_patterns=patterns)
    except _network_errors() as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{HF_DATASET}: cannot download from the Hugging Face Hub ({reason[:200]}); "
                       f"check the network connection") from None
    except OSError as e:  # disk full, permissions
        raise BadInput(f"{out}: download failed ({e})") from None
    if do_unpack:
        unpack(out, sorted(s.rfilename for s in files if s.rfilename.endswith((".zip", ".tar.gz"))))


def main(argv=None):
    parser = argparse.ArgumentParser(description="OpenShape/TAMM data tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help=f"fetch the release from the Hugging Face dataset {HF_DATASET}")
    dl.add_argument("--out", required=True, help="data root to download into (becomes --data of training)")
    dl.add_argument("--only", nargs="+", choices=list(DOWNLOAD_PARTS), default=list(DOWNLOAD_PARTS),
                    help="parts to fetch (default: all, about 205 GB)")
    dl.add_argument("--unpack", action="store_true", help="extract the archives into --out after download")
    args = parser.parse_args(argv)
    download(args.out, args.only, args.unpack)


if __name__ == "__main__":
    run_cli(main)
