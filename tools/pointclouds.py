"""Point-cloud files: your own clouds (.npy, .npz, .ply ASCII or binary, .xyz, .txt, .csv) and
Point-BERT's ModelNet40 few-shot folds, prepared as TAMM's evaluation prepares shapes (first N
points, y/z swap, unit sphere).

A library of evaluate.py (`--pc FILE_OR_FOLDER ...` and `--fewshot-folds DIR`), not a command.
"""
import os
import pickle
import re
import sys

import numpy as np
import torch

import data
from files import BadInput

EXTENSIONS = (".npy", ".npz", ".ply", ".xyz", ".txt", ".csv")

PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
             "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
             "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}

# column names a text file's header may use for the coordinates and the colours
XYZ_NAMES = ("x", "y", "z")
RGB_NAMES = (("r", "g", "b"), ("red", "green", "blue"))


def expand_paths(paths):
    """--pc values -> files: a file stays; a folder gives its point-cloud files, sorted by name."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(f for f in os.listdir(path) if f.lower().endswith(EXTENSIONS))
            if not found:
                raise BadInput(f"{path}: a folder without point-cloud files "
                               f"({', '.join(EXTENSIONS)})")
            files += [os.path.join(path, f) for f in found]
        else:
            files.append(path)
    return files


# ---- PLY -----------------------------------------------------------------------------------------


def _parse_ply_header(path, lines):
    """PLY header lines -> (format, [(element, count, [(property, type) or
    (property, "list")])])."""
    if not lines or lines[0].strip() != "ply":
        raise BadInput(f"{path}: bad PLY header (the file does not start with 'ply')")
    fmt = None
    elements = []
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
        raise BadInput(f"{path}: bad PLY header (no 'format ascii|binary_little_endian|"
                       f"binary_big_endian 1.0')")
    return fmt, elements


def read_ply(path):
    """(xyz (N, 3), rgb (N, 3) or None) of the `vertex` element; colours from red/green/blue."""
    with open(path, "rb") as f:
        raw = f.read()
    end = raw.find(b"end_header")
    newline = raw.find(b"\n", end)
    if end < 0 or newline < 0:
        raise BadInput(f"{path}: bad PLY header (no 'end_header' line)")
    fmt, elements = _parse_ply_header(path,
                                      raw[:end].decode("ascii", errors="replace").splitlines())
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise BadInput(f"{path}: bad PLY header (no 'element vertex')")
    before = elements[: names.index("vertex")]
    _, count, props = elements[names.index("vertex")]
    columns = [p[0] for p in props]
    if not {"x", "y", "z"} <= set(columns) or any(t == "list" for _, t in props):
        raise BadInput(f"{path}: bad PLY header (vertex needs float x, y, z properties and "
                       f"no lists)")
    body = raw[newline + 1 :]
    if fmt == "ascii":
        rows = [line for line in body.decode("ascii", errors="replace").splitlines()
                if line.strip()]
        start = sum(c for _, c, _ in before)
        try:
            table = np.array([line.split() for line in rows[start : start + count]],
                             dtype=np.float64)
        except ValueError:
            raise BadInput(f"{path}: vertex lines are not {len(columns)} numbers each") from None
        if table.shape != (count, len(columns)):
            raise BadInput(f"{path}: expected {count} vertex lines of {len(columns)} numbers, "
                           f"found {table.shape}")
        values = {c: table[:, k] for k, c in enumerate(columns)}
    else:
        if any(t == "list" for _, _, ps in before for _, t in ps):
            raise BadInput(f"{path}: binary PLY with list properties before the vertex element is "
                           f"not supported")
        endian = PLY_FORMATS[fmt]
        offset = sum(c * np.dtype([(n, endian + t) for n, t in ps]).itemsize for _, c, ps in before)
        dtype = np.dtype([(n, endian + t) for n, t in props])
        if len(body) < offset + count * dtype.itemsize:
            raise BadInput(f"{path}: truncated PLY ({count} vertices of {dtype.itemsize} bytes "
                           f"announced)")
        table = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        values = {c: table[c] for c in columns}
    xyz = np.stack([values[c] for c in "xyz"], 1)
    rgb = None
    if {"red", "green", "blue"} <= set(columns):
        rgb = np.stack([values[c] for c in ("red", "green", "blue")], 1).astype(np.float64)
        # uchar colours are 0-255 even when every value happens to be <= 1
        if dict(props)["red"] == "u1":
            rgb = rgb / 255
    return xyz, rgb


# ---- arrays and text -----------------------------------------------------------------------------


def _split_columns(path, arr):
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6) or not np.issubdtype(arr.dtype, np.number):
        raise BadInput(f"{path}: expected a numeric N x 3 (xyz) or N x 6 (xyz rgb) array, found "
                       f"{arr.dtype} {arr.shape}")
    return arr[:, :3], arr[:, 3:] if arr.shape[1] == 6 else None


def _numbers(line):
    return re.split(r"[\s,;]+", line.strip())


def read_text(path):
    """.xyz/.txt/.csv: one point per line, numbers separated by spaces, tabs, commas or semicolons;
    '#' starts a comment. A first line of names (such as `x y z` or `x,y,z,red,green,blue`) picks
    the columns by name; without one, 3 columns are xyz and 6 are xyz rgb (a 6th column is colour,
    not a normal)."""
    header = None
    rows = []
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = _numbers(line)
            try:
                rows.append([float(v) for v in fields])
            except ValueError:
                if rows or header is not None:
                    raise BadInput(f"{path}: line {n} is not numbers: {line[:60]!r}") from None
                header = [name.lower() for name in fields]
    if not rows or len({len(r) for r in rows}) != 1:
        raise BadInput(f"{path}: expected the same number of columns on every line")
    table = np.array(rows)
    if header is None:
        return _split_columns(path, table)
    if len(header) != table.shape[1] or not set(XYZ_NAMES) <= set(header):
        raise BadInput(f"{path}: the header {' '.join(header)!r} must name every column, x, y "
                       f"and z among them")
    xyz = table[:, [header.index(c) for c in XYZ_NAMES]]
    for names in RGB_NAMES:
        if set(names) <= set(header):
            return xyz, table[:, [header.index(c) for c in names]]
    return xyz, None


def read_point_cloud(path):
    """(xyz (N, 3), rgb (N, 3) in [0, 1]) float32 from .npy, .npz, .ply, .xyz, .txt or .csv; rgb 0.4
    when absent.

    .npy: N x 3 or N x 6 (no pickles). .npz: arrays `xyz` (+ optional `rgb`), else `points`, else
    the first array, read as .npy. Text: see read_text. rgb above 1 is taken to be on 0-255 and
    divided by 255."""
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a folder (pass it to --pc to read the point clouds inside)")
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
                    xyz, rgb = _split_columns(path,
                                              z["points" if "points" in z.files else z.files[0]])
                else:
                    raise BadInput(f"{path}: the .npz holds no arrays")
        elif ext in (".xyz", ".txt", ".csv"):
            xyz, rgb = read_text(path)
        else:
            raise BadInput(f"{path}: unknown point-cloud format {ext!r} "
                           f"(use {', '.join(EXTENSIONS)})")
    # numpy's messages for damaged, pickled or ragged files
    except (ValueError, OSError, EOFError) as e:
        raise BadInput(f"{path}: cannot read ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]})") from None
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

    The first `num_points` points; a smaller cloud keeps all its points and repeats randomly drawn
    ones (seeded, so a file always gives the same features). `up` is the file's up axis:
    data.normalize swaps y/z because the release is y-up, so a z-up file is swapped beforehand and
    the two swaps cancel."""
    idx = data.choose_points(len(xyz), num_points, np.random.default_rng(0), first=True)
    xyz = xyz[idx] if up == "y" else xyz[idx][:, [0, 2, 1]]
    return torch.from_numpy(np.concatenate([data.normalize(xyz), rgb[idx]], 1).astype(np.float32))


# ---- Point-BERT's ModelNet40 few-shot folds ------------------------------------------------------
# (TAMM main_linear_probing.py, dataset/ModelNetDatasetFewShot.py)

FOLDS = 10          # folds 0-9 per setting
FOLD_QUERIES = 20   # query shapes per class in each fold's test list


def fewshot_settings(folder):
    """{(way, shot): [fold 0..9 paths]} of DIR/{way}way_{shot}shot/{fold}.pkl; BadInput if a fold is
    missing."""
    settings = {}
    for name in sorted(os.listdir(folder)):
        match = re.fullmatch(r"(\d+)way_(\d+)shot", name)
        if not match:
            continue
        paths = [os.path.join(folder, name, f"{k}.pkl") for k in range(FOLDS)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise BadInput(f"{missing[0]}: fold missing ({len(missing)} of {FOLDS} folds of {name} "
                           f"not found)")
        settings[int(match[1]), int(match[2])] = paths
    if not settings:
        raise BadInput(f"--fewshot-folds {folder}: no {{way}}way_{{shot}}shot/ folders "
                       f"(Point-BERT's ModelNetFewshot)")
    return settings


def read_fewshot_fold(path, way, shot, seed=0):
    """One fold (a PICKLE: only open trusted files) -> (train (way*shot, N, 6), labels,
    test (way*20, N, 6), labels).

    The release's preprocessing: xyz only (the stored normals are dropped), y/z swapped, normalised,
    rgb 0 (not the 0.4 of colourless benchmark shapes), all stored points; the train subset's points
    are shuffled, the test subset's are not."""
    try:
        with open(path, "rb") as f:
            fold = pickle.load(f)
    except Exception as e:  # unpickling a damaged or foreign file can raise almost anything
        raise BadInput(f"{path}: cannot read the fold ({type(e).__name__})") from None
    out = []
    rng = np.random.default_rng(seed)
    for subset, size in (("train", way * shot), ("test", way * FOLD_QUERIES)):
        items = fold.get(subset) if isinstance(fold, dict) else None
        if not isinstance(items, list) or not all(isinstance(x, (tuple, list)) and len(x) == 3
                                                  for x in items):
            raise BadInput(f"{path}: expected {{'train': [...], 'test': [...]}} of "
                           f"(points, label, class_id) tuples")
        if len(items) != size:
            raise BadInput(f"{path}: {len(items)} {subset} shapes, a {way}-way {shot}-shot fold "
                           f"has {size}")
        try:
            clouds = []
            for points, _, _ in items:
                xyz = np.asarray(points, np.float32)[:, :3]
                if subset == "train":
                    xyz = xyz[rng.permutation(len(xyz))]
                xyz = data.normalize(xyz)
                clouds.append(torch.from_numpy(np.concatenate([xyz, np.zeros_like(xyz)], 1)))
            points = torch.stack(clouds)
            labels = torch.tensor([int(label) for _, label, _ in items])
        except (TypeError, ValueError, IndexError, RuntimeError) as e:
            raise BadInput(f"{path}: {subset} points are not (N, 3+) arrays of one size "
                           f"({type(e).__name__})") from None
        if not (0 <= labels.min() and labels.max() < way):
            raise BadInput(f"{path}: {subset} labels outside 0..{way - 1}")
        out += [points.float(), labels]
    return tuple(out)


if __name__ == "__main__":
    sys.exit("tools/pointclouds.py is a library, not a command: evaluate.py --pc FILE_OR_FOLDER "
             "reads your point clouds with it (python evaluate.py --help)")
