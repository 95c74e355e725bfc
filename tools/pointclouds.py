"""Point-cloud files: your own clouds (.npy / .npz / .ply ASCII or binary / .xyz / .txt) and Point-BERT's
ModelNet40 few-shot folds, prepared as TAMM's evaluation prepares shapes (first N points, y/z swap, unit sphere).

Used by `python evaluate.py --pc FILE ... [--labels ...] [--dump-features OUT.npz]` and `--fewshot-folds DIR`.
"""
import os
import pickle
import re

import numpy as np
import torch

import data
from adapters import zero_shot_scores
from training import BadInput, parse_names, precision_context

TOP_LABELS = 5  # labels printed per point-cloud file


PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


def _parse_ply_header(path, lines):
    """PLY header lines -> (format, [(element, count, [(property, type) or (property, "list", ...)])])."""
    if not lines or lines[0].strip() != "ply":
        raise BadInput(f"{path}: bad PLY header (the file does not start with 'ply')")
    fmt, elements = None, []
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) == 3 and words[1] in PLY_FORMATS:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in PLY_TYPES:
            elements[-1][2].append((words[2], PLY_TYPES[words[1]]))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1][2].append((words[4], "list"))
        else:
            raise BadInput(f"{path}: bad PLY header line {line.strip()!r}")
    if fmt is None:
        raise BadInput(f"{path}: bad PLY header (no 'format ascii|binary_little_endian|binary_big_endian 1.0')")
    return fmt, elements


def read_ply(path):
    """(xyz (N, 3), rgb (N, 3) or None) of the `vertex` element; colours from red/green/blue (uchar or float)."""
    with open(path, "rb") as f:
        raw = f.read()
    end = raw.find(b"end_header")
    newline = raw.find(b"\n", end)
    if end < 0 or newline < 0:
        raise BadInput(f"{path}: bad PLY header (no 'end_header' line)")
    fmt, elements = _parse_ply_header(path, raw[:end].decode("ascii", errors="replace").splitlines())
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise BadInput(f"{path}: bad PLY header (no 'element vertex')")
    before, (_, count, props) = elements[:names.index("vertex")], elements[names.index("vertex")]
    columns = [p[0] for p in props]
    if not {"x", "y", "z"} <= set(columns) or any(t == "list" for _, t in props):
        raise BadInput(f"{path}: bad PLY header (vertex needs float x, y, z properties and no lists)")
    body = raw[newline + 1:]
    if fmt == "ascii":
        rows = [ln for ln in body.decode("ascii", errors="replace").splitlines() if ln.strip()]
        start = sum(c for _, c, _ in before)
        try:
            table = np.array([ln.split() for ln in rows[start:start + count]], dtype=np.float64)
        except ValueError:
            raise BadInput(f"{path}: vertex lines are not {len(columns)} numbers each") from None
        if table.shape != (count, len(columns)):
            raise BadInput(f"{path}: expected {count} vertex lines of {len(columns)} numbers, found {table.shape}")
        values = {c: table[:, k] for k, c in enumerate(columns)}
    else:
        if any(t == "list" for _, _, ps in before for _, t in ps):
            raise BadInput(f"{path}: binary PLY with list properties before the vertex element is not supported")
        endian = PLY_FORMATS[fmt]
        offset = sum(c * np.dtype([(n, endian + t) for n, t in ps]).itemsize for _, c, ps in before)
        dtype = np.dtype([(n, endian + t) for n, t in props])
        if len(body) < offset + count * dtype.itemsize:
            raise BadInput(f"{path}: truncated PLY ({count} vertices of {dtype.itemsize} bytes announced)")
        table = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        values = {c: table[c] for c in columns}
    xyz = np.stack([values[c] for c in "xyz"], 1)
    rgb = None
    if {"red", "green", "blue"} <= set(columns):
        rgb = np.stack([values[c] for c in ("red", "green", "blue")], 1).astype(np.float64)
        if dict(props)["red"] == "u1":  # uchar colours are 0-255 even when every value happens to be <= 1
            rgb = rgb / 255
    return xyz, rgb


def _split_columns(path, arr):
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6) or not np.issubdtype(arr.dtype, np.number):
        raise BadInput(f"{path}: expected a numeric N x 3 (xyz) or N x 6 (xyz rgb) array, found {arr.dtype} {arr.shape}")
    return arr[:, :3], arr[:, 3:] if arr.shape[1] == 6 else None


def read_point_cloud(path):
    """(xyz (N, 3), rgb (N, 3) in [0, 1]) float32 from .npy, .npz, .ply, .xyz or .txt; rgb 0.4 when absent.

    .npy: N x 3 or N x 6 (no pickles). .npz: arrays `xyz` (+ optional `rgb`), else `points`, else the first
    array, read as .npy. .xyz/.txt: whitespace-separated numbers, 3 or 6 columns ('#' starts a comment; a 6th
    column is taken as colour, not normals). rgb above 1 is taken to be on 0-255 and divided by 255."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise BadInput(f"{path}: point-cloud file not found")
    try:
        if ext == ".ply":
            xyz, rgb = read_ply(path)
        elif ext == ".npy":
            xyz, rgb = _split_columns(path, np.load(path, allow_pickle=False))
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "xyz" in z.files:
                    xyz, rgb = z["xyz"], z["rgb"] if "rgb" in z.files else None
                elif z.files:
                    xyz, rgb = _split_columns(path, z["points" if "points" in z.files else z.files[0]])
                else:
                    raise BadInput(f"{path}: the .npz holds no arrays")
        elif ext in (".xyz", ".txt"):
            xyz, rgb = _split_columns(path, np.loadtxt(path, ndmin=2, comments="#"))
        else:
            raise BadInput(f"{path}: unknown point-cloud format {ext!r} (use .npy, .npz, .ply, .xyz or .txt)")
    except (ValueError, OSError, EOFError) as e:  # numpy's messages for damaged, pickled or ragged files
        raise BadInput(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    xyz = np.asarray(xyz, np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0:
        raise BadInput(f"{path}: xyz has shape {xyz.shape}, expected (N, 3) with N > 0")
    rgb = np.full_like(xyz, data.GREY) if rgb is None else np.asarray(rgb, np.float64)
    if rgb.shape != xyz.shape:
        raise BadInput(f"{path}: rgb has shape {rgb.shape}, xyz has {xyz.shape}")
    if not (np.isfinite(xyz).all() and np.isfinite(rgb).all()):
        raise BadInput(f"{path}: contains NaN or inf")
    if rgb.max() > 1:
        rgb = rgb / 255
    if rgb.min() < 0 or rgb.max() > 1:
        raise BadInput(f"{path}: rgb must lie in [0, 1] or [0, 255]")
    return xyz.astype(np.float32), rgb.astype(np.float32)


def prepare_points(xyz, rgb, num_points, up="y"):
    """One cloud -> (num_points, 6) model input, as TAMM's evaluation prepares benchmark shapes.

    The first `num_points` points; a smaller cloud keeps all its points and repeats randomly drawn ones
    (seeded, so a file always gives the same features). `up` is the file's up axis: data.normalize swaps
    y/z because the release is y-up, so a z-up file is swapped beforehand and the two swaps cancel."""
    idx = data.choose_points(len(xyz), num_points, np.random.default_rng(0), first=True)
    xyz = xyz[idx] if up == "y" else xyz[idx][:, [0, 2, 1]]
    return torch.from_numpy(np.concatenate([data.normalize(xyz), rgb[idx]], 1).astype(np.float32))


# ---- Point-BERT's ModelNet40 few-shot folds (TAMM main_linear_probing.py, dataset/ModelNetDatasetFewShot.py) ----

FOLDS, FOLD_QUERIES = 10, 20  # folds 0-9 per setting; 20 query shapes per class in each fold's test list


def fewshot_settings(folder):
    """{(way, shot): [fold 0..9 paths]} of DIR/{way}way_{shot}shot/{fold}.pkl; BadInput if a fold is missing."""
    settings = {}
    for name in sorted(os.listdir(folder)):
        if m := re.fullmatch(r"(\d+)way_(\d+)shot", name):
            paths = [os.path.join(folder, name, f"{k}.pkl") for k in range(FOLDS)]
            if missing := [p for p in paths if not os.path.isfile(p)]:
                raise BadInput(f"{missing[0]}: fold missing ({len(missing)} of {FOLDS} folds of {name} not found)")
            settings[int(m[1]), int(m[2])] = paths
    if not settings:
        raise BadInput(f"--fewshot-folds {folder}: no {{way}}way_{{shot}}shot/ folders (Point-BERT's ModelNetFewshot)")
    return settings


def read_fewshot_fold(path, way, shot, seed=0):
    """One fold (a PICKLE: only open trusted files) -> (train (way*shot, N, 6), labels, test (way*20, N, 6), labels).

    The release's preprocessing: xyz only (the stored normals are dropped), y/z swapped, normalised, rgb = 0 (not
    the 0.4 of colourless benchmark shapes), all stored points; the train subset's points shuffled, the test's not."""
    try:
        with open(path, "rb") as f:
            fold = pickle.load(f)
    except Exception as e:  # unpickling a damaged or foreign file can raise almost anything
        raise BadInput(f"{path}: cannot read the fold ({type(e).__name__})") from None
    out, rng = [], np.random.default_rng(seed)
    for subset, size in (("train", way * shot), ("test", way * FOLD_QUERIES)):
        items = fold.get(subset) if isinstance(fold, dict) else None
        if not isinstance(items, list) or not all(isinstance(x, (tuple, list)) and len(x) == 3 for x in items):
            raise BadInput(f"{path}: expected {{'train': [...], 'test': [...]}} of (points, label, class_id) tuples")
        if len(items) != size:
            raise BadInput(f"{path}: {len(items)} {subset} shapes, a {way}-way {shot}-shot fold has {size}")
        try:
            clouds = [np.asarray(p, np.float32)[:, :3] for p, _, _ in items]
            labels = torch.tensor([int(label) for _, label, _ in items])
            points = torch.stack([torch.from_numpy(np.concatenate([data.normalize(
                xyz[rng.permutation(len(xyz))] if subset == "train" else xyz), np.zeros_like(xyz)], 1)) for xyz in clouds])
        except (TypeError, ValueError, IndexError, RuntimeError) as e:
            raise BadInput(f"{path}: {subset} points are not (N, 3+) arrays of one size ({type(e).__name__})") from None
        if not (0 <= labels.min() and labels.max() < way):
            raise BadInput(f"{path}: {subset} labels outside 0..{way - 1}")
        out += [points.float(), labels]
    return tuple(out)


def check_flags(args):
    """evaluate.py's --pc flags, at parse time: the combinations, every file read, the labels, the CLIP choice."""
    if args.pc and args.compare:
        raise BadInput("--pc takes one --ckpt, not --compare")
    if args.pc and not (args.labels is not None or args.dump_features):
        raise BadInput("--pc needs --labels (zero-shot) and/or --dump-features OUT.npz")
    if not args.pc and (args.labels is not None or args.dump_features):
        raise BadInput(f"{'--labels' if args.labels is not None else '--dump-features'} needs --pc FILE ... "
                       f"(the point clouds to classify or encode)")
    args.clouds = [read_point_cloud(path) for path in args.pc or []]
    args.labels = parse_names(args.labels, "--labels") if args.labels is not None else None
    if args.labels:
        from tools import clip_features
        clip_features.check_clip(args.clip_model, args.clip_pretrained, ("--clip-model", "--clip-pretrained"))


@torch.no_grad()
def run_point_clouds(args, model, env, num_points):
    """--pc: encode the files in order; classify against --labels and/or write --dump-features."""
    points = torch.stack([prepare_points(xyz, rgb, num_points, args.up) for xyz, rgb in args.clouds])
    cast, _ = precision_context(env.device, args.precision)
    with cast:
        outs = [model(points[i:i + args.batch_size].to(env.device)) for i in range(0, len(points), args.batch_size)]
    feats = {k: torch.cat([o[k] for o in outs]).float().cpu() for k in ("backbone", "text", "image")}
    predictions = {}
    if args.labels:
        from tools import clip_features
        clip, tokenizer, _ = clip_features.load_clip(args.clip_model, args.clip_pretrained, str(env.device))
        class_feat = torch.as_tensor(clip_features.encode_class_names(args.labels, clip, tokenizer, device=str(env.device)))
        if class_feat.shape[1] != model.clip_dim:
            raise BadInput(f"--clip-model {args.clip_model}: gives {class_feat.shape[1]}-d text features, the "
                           f"checkpoint's heads output {model.clip_dim}-d (the teacher is ViT-bigG-14)")
        text, _, fused = zero_shot_scores(feats["text"], feats["image"], class_feat, args.alpha)
        top = (text if model.heads == "openshape" else fused).topk(min(TOP_LABELS, len(args.labels)), dim=1)
        for path, vals, idx in zip(args.pc, top.values, top.indices):
            predictions[path] = [(args.labels[int(i)], float(v)) for v, i in zip(vals, idx)]
            if env.is_main:
                print(f"{path}: " + " | ".join(f"{name} {v:.3f}" for name, v in predictions[path]))
    if args.dump_features and env.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(args.dump_features)), exist_ok=True)  # checked, not made, at parse
        with open(args.dump_features, "wb") as f:  # a file handle keeps the exact name (np.savez adds .npz)
            np.savez(f, **{k: v.numpy() for k, v in feats.items()}, files=np.array(args.pc))
        print(f"wrote features of {len(args.pc)} clouds to {args.dump_features}")
    return {"predictions": predictions, "features": feats}
