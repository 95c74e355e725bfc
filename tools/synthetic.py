"""A procedural 3D shape world with a simulated CLIP teacher,
written in the OpenShape release format.

The real training data (OpenShape release, about 205 GB) and CLIP ViT-bigG-14 cannot be fetched
everywhere, yet tests, CI and a newcomer's first run need data that exists offline and goes through
the *same* reader, training and evaluation code. This file writes such data in exactly the release's
layout (docs/data-format.md).

Shapes: 12 categories assembled from boxes, cone frustums (cylinders, cones), ellipsoids and tori,
with random proportions, part counts, colours, overall scale and rotation about the up axis. Points
are sampled on the part surfaces in proportion to area, rgb in [0, 1] per part; xyz is stored y-up
like the release.

The CLIP features are SIMULATED: no CLIP model runs here, the numbers mean nothing outside this
world, and real benchmark numbers need the OpenShape release (`python -m tools.download`). The
seeded teacher models the properties the method relies on:
  - Text encoder: a bag of words. Each category has a 1280-d unit direction (categories of one
    family, such as furniture or vessels, share a component), synonyms lie near it, colour and other
    words get their own directions, and every string adds its own fixed noise, so one string always
    gives one feature. `prompt_avg` averages the string put into PROMPTS, as the release averages 64
    templates: a slightly different, less noisy version of `original`. Class-name features
    (`cat_name_pt_feat`) are made the same way from the bare class name, so they sit close to the
    texts of their category.
  - Image encoder of renders: a shape's hidden description (category, colour, part attributes, an
    instance detail that no text mentions) goes through a FIXED distortion: each category leaks into
    a look-alike category (renders of mugs look partly like vases, in a fixed cycle) and a shared
    render-style offset is added; then each of the 12 views (and the Objaverse thumbnail) adds its
    own noise. This stands in for the render-vs-photo gap: raw view features find the right class
    name only about half the time, and stage 1's CLIP Image Adapter (train_stage1.py) learns to undo
    most of it.
  - Release noise: Objaverse names that are junk (flag "N" in gpt4_filtering.json), empty MSFT
    captions, missing retrieval texts, retrieval texts about a neighbouring category of the same
    family.

Layout under ROOT (`data_path` in the split files starts with /mnt/data/, as in the release):
  {Objaverse,ShapeNet}/<group>/<id>.npy                  per-shape dicts (training and LVIS shapes)
  meta_data/split/{train_all,train_no_lvis,lvis}.json,
  meta_data/split/ablation/train_shapenet_only.json
  meta_data/{gpt4_filtering.json, point_feat_knn.npy, lvis_cat_name_pt_feat.npy}
  meta_data/modelnet40/{test_pc.npy, test_split.json, cat_name_pt_feat.npy}
                                                         held-out test set
  meta_data/val/{test_pc.npy, test_split.json, cat_name_pt_feat.npy}
                                                         validation set, same layout
  WORLD_COMPLETE.json                                    written last; the parameters of the build
LVIS shapes are disjoint from training (so train_no_lvis = train_all). Every set draws its shapes
from its own seed stream of the same generator; the teacher is shared.

    python -m tools.synthetic  # build (or reuse) the default cache data/synthetic-<hash>
    python -m tools.synthetic --out /tmp/world --num-shapes 1000 --num-points 2048 --seed 0
    python -c "from tools import synthetic; print(synthetic.ensure_world(num_shapes=200))"
"""
import functools
import hashlib
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch.distributed
from tqdm import tqdm

from cli import COUNT, POSITIVE_INT, Parser, output_dir, run_cli
from files import BadInput, save_npy

NUM_SHAPES = 300            # training shapes: few, so that no variant of the ablation saturates
                            # (README)
NUM_POINTS = 2048           # stored per shape. The release stores 10,000; CPU demos train the tiny
                            # encoder on 1-2k points, and the reader resamples with replacement when
                            # asked for more
NUM_HELD_OUT_PER_CLASS = 40  # per class in test, val and LVIS: enough for 10-way 20-shot + 20
                             # queries
DIM = 1280                  # ViT-bigG-14 feature width
NUM_VIEWS = 12              # rendered views per shape in the release
OBJAVERSE_FRACTION = 0.6    # training shapes in the Objaverse-like set (thumbnail, name text, GPT-4
                            # filter)
GROUP_SIZE = 500            # Objaverse shapes per group folder ("000-000", "000-001", ...)
KNN = 16                    # neighbours per shape in point_feat_knn.npy (self first)
POINT_NOISE = 0.1           # scan noise, std of every point's jitter (shapes span 0.5-1): blurs
                            # thin parts
MARKER = "WORLD_COMPLETE.json"
CACHE = Path(__file__).resolve().parent.parent / "data"  # the repository's data/, git-ignored

# Simulated-teacher constants, tuned so raw view features retrieve the right class name for about
# half of the shapes and a CIA trained for a minute on CPU retrieves most of them
# (tests/test_synthetic.py checks both).
FAMILY_WEIGHT = 0.6         # shared family component of the category directions (chair and sofa are
                            # close)
SYNONYM_SPREAD = 0.6        # how far a synonym ("couch") sits from its category direction
STRING_NOISE = 0.3          # per-string noise of the text encoder
LEAK = (0.5, 1.5)           # per-category weight of the look-alike category in renders
RENDER_OFFSET = 0.4         # shared render-style direction added to every view
DETAIL = 0.4                # instance detail seen by the views only
VIEW_NOISE = 0.5            # per-view noise in random directions (in 1280-d it barely moves class
                            # scores)
VIEW_CONFUSION = 0.25       # per-view noise along the category directions (a view from above hides
                            # the legs)
PROMPTS = ["{}", "a 3D model of {}.", "a photo of a {}.", "a rendering of a {}.",
           "a point cloud of {}.", "a picture of the {}.", "an object: {}.",
           "a close-up of the {}."]  # the release averages 64

PALETTE = {"red": (0.8, 0.12, 0.1), "green": (0.15, 0.6, 0.2), "blue": (0.15, 0.3, 0.8),
           "yellow": (0.9, 0.8, 0.15), "white": (0.92, 0.92, 0.9), "black": (0.08, 0.08, 0.1),
           "brown": (0.45, 0.28, 0.12), "grey": (0.5, 0.5, 0.52), "orange": (0.95, 0.5, 0.1),
           "purple": (0.5, 0.2, 0.6)}
STOPWORDS = {"a", "an", "the", "of", "with", "on", "in", "and", "for", "to"}
JUNK = ["untitled", "model", "scene", "object", "mesh", "final", "export", "sketchfab", "new",
        "copy"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
SELLER = ["modern", "vintage", "cheap", "handmade", "minimalist", "classic", "designer", "wooden",
          "plastic"]


# ----------------------------------------------------------------------------- surface primitives
# Each primitive returns (area, sample(rng, n) -> (n, 3) points on its surface in its own frame).

def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rot(axis, angle):
    """3x3 rotation about x (0), y (1) or z (2)."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def _rejection(rng, n, propose):
    """Draw from propose(m) -> (points, acceptance probability) until n points are accepted."""
    kept = [np.zeros((0, 3))]
    while sum(map(len, kept)) < n:
        pts, prob = propose(2 * n + 8)
        kept.append(pts[rng.random(len(pts)) < prob])
    return np.concatenate(kept)[:n]


def box(sx, sy, sz):
    """Box centred at the origin."""
    face = np.array([sy * sz, sx * sz, sx * sy])  # area of one face normal to x, y, z

    def sample(rng, n):
        p = rng.uniform(-0.5, 0.5, (n, 3))
        p[np.arange(n), rng.choice(3, n, p=face / face.sum())] = rng.choice([-0.5, 0.5], n)
        return p * (sx, sy, sz)
    return 2 * face.sum(), sample


def frustum(r0, r1, h, bottom=True, top=True):
    """Cone frustum along z, radius r0 at -h/2 and r1 at +h/2 (a cylinder when equal), optional end
    caps."""
    areas = np.array([np.pi * (r0 + r1) * np.hypot(h, r1 - r0), np.pi * r0 ** 2 * bottom,
                      np.pi * r1 ** 2 * top])

    def sample(rng, n):
        part, u, v, a = (rng.choice(3, n, p=areas / areas.sum()), rng.random(n), rng.random(n),
                         rng.random(n))
        # on the side the radius grows linearly, so the height is drawn with density
        # proportional to it
        t = (u if np.isclose(r0, r1)
             else (np.sqrt(r0 ** 2 + u * (r1 ** 2 - r0 ** 2)) - r0) / (r1 - r0))
        r = np.where(part == 0, r0 + (r1 - r0) * t, np.where(part == 1, r0, r1) * np.sqrt(v))
        t = np.where(part == 0, t, part - 1)
        return np.stack([r * np.cos(2 * np.pi * a), r * np.sin(2 * np.pi * a), (t - 0.5) * h], 1)
    return areas.sum(), sample


def ellipsoid(a, b, c):
    """Ellipsoid with semi-axes a, b, c (area by Thomsen's formula, p = 1.6075)."""
    def sample(rng, n):
        def propose(m):
            u = _unit(rng.standard_normal((m, 3)))
            # the map u -> (a, b, c) * u stretches area by abc * |u / (a, b, c)|;
            # divided by its maximum
            return u * (a, b, c), min(a, b, c) * np.linalg.norm(u / (a, b, c), axis=1)
        return _rejection(rng, n, propose)
    p = 1.6075
    return 4 * np.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p), sample


def torus(ring, tube, arc=2 * np.pi):
    """Torus around z, cut to `arc` radians of the ring (a mug handle is half a torus)."""
    def sample(rng, n):
        def propose(m):
            u, v = rng.uniform(0, arc, m), rng.uniform(0, 2 * np.pi, m)
            # area element is proportional to the distance from the axis
            r = ring + tube * np.cos(v)
            return np.stack([r * np.cos(u), r * np.sin(u), tube * np.sin(v)], 1), r / (ring + tube)
        return _rejection(rng, n, propose)
    return arc * 2 * np.pi * tube * ring, sample


def P(primitive, colour, at=(0.0, 0.0, 0.0), rot=None):
    """A placed, coloured part: primitive, then rotation about its own centre, then translation."""
    return (primitive, np.asarray(colour), np.eye(3) if rot is None else rot,
            np.asarray(at, dtype=float))


def _legs(r, h, dx, dy, colour):
    return [P(frustum(r, r, h), colour, (sx * dx, sy * dy, h / 2))
            for sx in (-1, 1) for sy in (-1, 1)]


# ---------------------------------------------------------------- categories (z-up while building)
# Each builder takes (rng, main colour, second colour) and returns
# (parts, attribute phrase for captions).

def table(rng, c1, c2):
    w, d, h, th = (rng.uniform(0.8, 1.6), rng.uniform(0.5, 1.0), rng.uniform(0.5, 0.9),
                   rng.uniform(0.03, 0.08))
    round_top = rng.random() < 0.3
    parts = [P(frustum(w / 2, w / 2, th) if round_top else box(w, d, th), c1, (0, 0, h))]
    if rng.random() < 0.25:
        parts += [P(frustum(0.05, 0.05, h), c2, (0, 0, h / 2)),
                  P(frustum(w / 4, w / 4, 0.03), c2, (0, 0, 0.015))]
        return parts, "on a pedestal"
    r = rng.uniform(0.02, 0.05)
    dx, dy = (w * 0.3, w * 0.3) if round_top else (w / 2 - 2 * r, d / 2 - 2 * r)
    return parts + _legs(r, h, dx, dy, c2), "with a round top" if round_top else "with four legs"


def chair(rng, c1, c2):
    s, hs, hb = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.55), rng.uniform(0.3, 0.7)
    parts = [P(box(s, s, 0.05), c1, (0, 0, hs)),
             P(box(s, 0.05, hb), c1, (0, -s / 2, hs + hb / 2), _rot(0, rng.uniform(-0.25, 0)))]
    parts += _legs(rng.uniform(0.015, 0.035), hs, s / 2 - 0.04, s / 2 - 0.04, c2)
    if rng.random() < 0.4:
        parts += [P(box(0.05, s, 0.04), c1, (x, 0, hs + 0.22)) for x in (-s / 2, s / 2)]
        return parts, "with arms"
    return parts, "with a high back" if hb > 0.5 else "with a low back"


def lamp(rng, c1, c2):
    hp, rb = rng.uniform(0.6, 1.4), rng.uniform(0.12, 0.25)
    parts = [P(frustum(rb, rb * 0.7, 0.04), c2, (0, 0, 0.02)),
             P(frustum(0.015, 0.015, hp), c2, (0, 0, hp / 2))]
    if rng.random() < 0.3:
        r = rng.uniform(0.1, 0.2)
        return parts + [P(ellipsoid(r, r, r), c1, (0, 0, hp + r * 0.8))], "with a globe"
    r0, r1, hs = rng.uniform(0.15, 0.3), rng.uniform(0.06, 0.14), rng.uniform(0.15, 0.3)
    return parts + [P(frustum(r0, r1, hs, bottom=False, top=False), c1, (0, 0, hp))], "with a shade"


def mug(rng, c1, c2):
    r, h = rng.uniform(0.3, 0.45), rng.uniform(0.6, 1.0)
    # half ring, turned upright
    handle = torus(h * rng.uniform(0.22, 0.32), rng.uniform(0.03, 0.06), np.pi)
    parts = [P(frustum(r, r * rng.uniform(1.0, 1.15), h, top=False), c1, (0, 0, h / 2)),
             P(handle, c2 if rng.random() < 0.3 else c1, (r, 0, h / 2),
               _rot(0, np.pi / 2) @ _rot(2, -np.pi / 2))]
    return parts, "with a handle"


def bottle(rng, c1, c2):
    r, hb, rn, hn, hs = (rng.uniform(0.12, 0.22), rng.uniform(0.5, 0.9), rng.uniform(0.04, 0.07),
                         rng.uniform(0.12, 0.3), rng.uniform(0.08, 0.2))
    parts = [P(frustum(r, r, hb, top=False), c1, (0, 0, hb / 2)),
             P(frustum(r, rn, hs, bottom=False, top=False), c1, (0, 0, hb + hs / 2)),
             P(frustum(rn, rn, hn, bottom=False, top=False), c1, (0, 0, hb + hs + hn / 2)),
             P(frustum(rn * 1.15, rn * 1.15, 0.05), c2, (0, 0, hb + hs + hn + 0.025))]
    return parts, "with a long neck" if hn > 0.22 else "with a cap"


def bookshelf(rng, c1, c2):
    w, d, h, th, n = (rng.uniform(0.6, 1.4), rng.uniform(0.25, 0.4), rng.uniform(1.0, 2.0), 0.04,
                      rng.integers(2, 6))
    parts = [P(box(th, d, h), c1, (x, 0, h / 2)) for x in (-w / 2, w / 2)]
    levels = np.linspace(th / 2, h - th / 2, n + 1)
    parts += [P(box(w, d, th), c1, (0, 0, z)) for z in levels]
    if rng.random() < 0.7:
        parts.append(P(box(w, th, h), c1, (0, -d / 2, h / 2)))
    for z in levels[:-1]:  # a row of books on some shelves
        if rng.random() < 0.5:
            lw, lh = w * rng.uniform(0.2, 0.9), (levels[1] - levels[0]) * rng.uniform(0.5, 0.85)
            colour = _pick(rng, list(PALETTE.values()))
            parts.append(P(box(lw, d * 0.8, lh), colour, ((lw - w) / 2, 0, z + th / 2 + lh / 2)))
    return parts, f"with {NUMBERS[n]} shelves"


def airplane(rng, c1, c2):
    length, rf, span, chord, sweep = (rng.uniform(2.0, 3.0), rng.uniform(0.12, 0.2),
                                      rng.uniform(1.6, 2.8), rng.uniform(0.3, 0.55),
                                      rng.uniform(0.0, 0.5))
    x0 = length * rng.uniform(-0.05, 0.15)
    parts = [P(ellipsoid(length / 2, rf, rf), c1),
             P(box(0.35, 0.03, 0.4), c2, (-length / 2 + 0.2, 0, rf + 0.15)),
             P(box(0.25, span * 0.35, 0.03), c1, (-length / 2 + 0.15, 0, 0))]
    parts += [P(box(chord, span / 2, 0.03), c1,  # half wings swept back about their own centre
                (x0 - np.sin(sweep) * span / 4, s * np.cos(sweep) * span / 4, 0),
                _rot(2, s * sweep))
              for s in (-1, 1)]
    engines = rng.choice([0, 2, 4])
    ys = [0.2, -0.2, 0.35, -0.35][:engines]
    parts += [P(frustum(0.08, 0.08, 0.4), c2, (x0, y * span, -0.12), _rot(1, np.pi / 2))
              for y in ys]
    return parts, {0: "a glider", 2: "with two engines", 4: "with four engines"}[engines]


def car(rng, c1, c2):
    length, w, h = rng.uniform(1.6, 2.2), rng.uniform(0.7, 0.9), rng.uniform(0.25, 0.4)
    rw = rng.uniform(0.14, 0.22)
    cabin, ch = length * rng.uniform(0.4, 0.65), h * rng.uniform(0.6, 1.1)
    parts = [P(box(length, w, h), c1, (0, 0, rw + h / 2 - 0.05)),
             P(box(cabin, w * 0.9, ch), c1,
               (length * rng.uniform(-0.15, 0.1), 0, rw + h - 0.05 + ch / 2))]
    wheel = frustum(rw, rw, 0.1)
    parts += [P(wheel, PALETTE["black"], (sx * (length / 2 - rw * 1.3), sy * w / 2, rw),
                _rot(0, np.pi / 2))
              for sx in (-1, 1) for sy in (-1, 1)]
    return parts, "a van" if cabin > 0.55 * length else "a sedan"


def bed(rng, c1, c2):
    length, w, hf = rng.uniform(1.8, 2.2), rng.uniform(1.0, 1.8), rng.uniform(0.15, 0.3)
    hh, hm = rng.uniform(0.4, 0.9), rng.uniform(0.12, 0.25)  # headboard above the frame, mattress
    parts = [P(box(length, w, 0.1), c2, (0, 0, hf)),
             P(box(length * 0.97, w * 0.95, hm), c1, (0, 0, hf + hm / 2 + 0.05)),
             P(box(0.08, w, hh + hf), c2, (-length / 2, 0, (hh + hf) / 2))]
    parts += _legs(0.04, hf, length / 2 - 0.1, w / 2 - 0.1, c2)
    if rng.random() < 0.5:
        parts.append(P(box(0.08, w, hf + hh / 2), c2, (length / 2, 0, (hf + hh / 2) / 2)))
    n = rng.integers(1, 3)
    parts += [P(ellipsoid(0.18, w / (2 * n) * 0.8, 0.07), PALETTE["white"],
                (-length / 2 + 0.3, (i + 0.5) * w / n - w / 2, hf + hm + 0.1)) for i in range(n)]
    return parts, f"with {NUMBERS[n]} pillows"


def sofa(rng, c1, c2):
    length, d, hs, hb = (rng.uniform(1.5, 2.4), rng.uniform(0.8, 1.0), rng.uniform(0.35, 0.45),
                         rng.uniform(0.35, 0.6))
    parts = [P(box(length, d, hs), c1, (0, 0, hs / 2)),
             P(box(length, 0.2, hb), c1, (0, -d / 2 + 0.1, hs + hb / 2))]
    ha = hs + rng.uniform(0.15, 0.3)
    armless = rng.random() < 0.15
    if not armless:
        parts += [P(box(0.2, d, ha), c1, (sx * (length / 2 + 0.1), 0, ha / 2)) for sx in (-1, 1)]
    n = rng.integers(1, 4)
    parts += [P(box(length / n * 0.95, d * 0.75, 0.1), c2,
                ((i + 0.5) * length / n - length / 2, 0.1, hs + 0.05))
              for i in range(n)]
    return parts, "without arms" if armless else f"with {NUMBERS[n]} cushions"


def vase(rng, c1, c2):
    n = rng.integers(3, 6)
    radii, heights = rng.uniform(0.15, 0.45, n + 1), rng.uniform(0.15, 0.35, n)
    z = np.concatenate([[0], np.cumsum(heights)])
    parts = [P(frustum(radii[i], radii[i + 1], heights[i], bottom=i == 0, top=False), c1,
               (0, 0, z[i] + heights[i] / 2)) for i in range(n)]
    return parts, "tall" if z[-1] > 1.0 else "round"


def guitar(rng, c1, c2):
    lower, electric = rng.uniform(0.32, 0.42), rng.random() < 0.35
    upper, neck = lower * rng.uniform(0.7, 0.85), rng.uniform(0.8, 1.1)
    # body thickness, neck start
    t, top = 0.04 if electric else rng.uniform(0.08, 0.12), 2.2 * lower + upper
    parts = [P(ellipsoid(lower, t, lower * 1.1), c1, (0, 0, lower * 1.1)),
             P(ellipsoid(upper, t, upper * 1.1), c1, (0, 0, 2.2 * lower + upper * 0.2)),
             P(box(0.08, 0.05, neck), c2, (0, 0, top + neck / 2)),
             P(box(0.13, 0.04, 0.2), c2, (0, 0, top + neck + 0.1))]
    return parts, "electric" if electric else "acoustic"


# name: (builder, family, synonyms, ShapeNet synset id)
_SPEC = {
    "table": (table, "furniture", ["table", "desk", "dining table", "coffee table"], "04379243"),
    "chair": (chair, "furniture", ["chair", "armchair", "office chair", "side chair"], "03001627"),
    "lamp": (lamp, "light", ["lamp", "floor lamp", "desk lamp", "lampstand"], "03636649"),
    "mug": (mug, "vessel", ["mug", "cup", "coffee mug"], "03797390"),
    "bottle": (bottle, "vessel", ["bottle", "wine bottle", "water bottle"], "02876657"),
    "bookshelf": (bookshelf, "furniture", ["bookshelf", "bookcase", "shelving"], "02871439"),
    "airplane": (airplane, "vehicle", ["airplane", "aeroplane", "jet", "airliner"], "02691156"),
    "car": (car, "vehicle", ["car", "automobile", "hatchback", "coupe"], "02958343"),
    "bed": (bed, "furniture", ["bed", "double bed", "bedstead"], "02818832"),
    "sofa": (sofa, "furniture", ["sofa", "couch", "settee"], "04256520"),
    "vase": (vase, "vessel", ["vase", "urn", "flower vase"], "03593526"),
    "guitar": (guitar, "instrument", ["guitar", "acoustic guitar", "electric guitar"], "03467517"),
}
CATEGORIES = list(_SPEC)
_WORD_CATEGORY = {w: k for k, c in enumerate(CATEGORIES) for syn in _SPEC[c][2]
                  for w in syn.split()[-1:]}


def make_shape(rng, category, num_points):
    """Sample one shape: y-up float32 xyz (num_points, 3), rgb in [0, 1], main colour name, caption
    phrase."""
    names = list(PALETTE)
    i, j = rng.choice(len(names), 2, replace=False)
    c1, c2 = (np.clip(np.array(PALETTE[names[k]]) + rng.normal(0, 0.04, 3), 0, 1) for k in (i, j))
    parts, phrase = _SPEC[category][0](rng, c1, c2)
    counts = rng.multinomial(num_points,
                             np.array([p[0][0] for p in parts]) / sum(p[0][0] for p in parts))
    xyz = np.concatenate([prim[1](rng, k) @ rot.T + at
                          for (prim, _, rot, at), k in zip(parts, counts)])
    rgb = np.concatenate([np.broadcast_to(colour, (k, 3))
                          for (_, colour, _, _), k in zip(parts, counts)])
    xyz = (xyz - (xyz.max(0) + xyz.min(0)) / 2) @ _rot(2, rng.uniform(0, 2 * np.pi)).T
    # the reader normalises scale away
    xyz = xyz / np.linalg.norm(xyz, axis=1).max() * rng.uniform(0.5, 1.0)
    xyz = xyz + rng.normal(0, POINT_NOISE, xyz.shape)
    rgb = np.clip(rgb + rng.normal(0, 0.02, rgb.shape), 0, 1)
    # stored in random order like a real scan: TAMM's evaluation takes the *first* N points, which
    # must not be the first parts of the shape
    order = rng.permutation(num_points)
    return (xyz[order][:, [0, 2, 1]].astype(np.float32),  # y-up
            rgb[order].astype(np.float32), names[i], phrase)


# ----------------------------------------------------------------------- the simulated CLIP teacher

class Teacher:
    """Simulated CLIP (see the module docstring): a bag-of-words text encoder and a distorted render
    encoder."""

    def __init__(self, seed):
        self.seed = seed
        rng = np.random.default_rng([seed, 1])
        families = sorted({s[1] for s in _SPEC.values()})
        family = dict(zip(families, _unit(rng.standard_normal((len(families), DIM)))))
        own = _unit(rng.standard_normal((len(CATEGORIES), DIM)))
        self.cat = _unit(np.stack([FAMILY_WEIGHT * family[_SPEC[c][1]] for c in CATEGORIES]) + own)
        order = rng.permutation(len(CATEGORIES))
        self.lookalike = np.empty(len(CATEGORIES), int)
        # one cycle: no two categories simply swap places
        self.lookalike[order] = np.roll(order, -1)
        self.leak = rng.uniform(*LEAK, len(CATEGORIES))
        self.render = _unit(rng.standard_normal(DIM))
        # many strings repeat ("chair", "a 3D model of chair."); caching them halves the build time
        self.word = functools.lru_cache(maxsize=None)(self.word)
        self.text_feat = functools.lru_cache(maxsize=16384)(self.text_feat)

    def _random(self, stream, key):
        # seeded by crc32: Python's hash() is salted per process; this is stable
        return _unit(np.random.default_rng([self.seed, stream, zlib.crc32(key.encode())])
                     .standard_normal(DIM))

    def word(self, w):
        """(weight, unit direction) of one word: a category word lies at (a synonym near) its
        category direction."""
        k = _WORD_CATEGORY.get(w)
        if k is None:
            return 0.5 if w in PALETTE else 0.05 if w in STOPWORDS else 0.3, self._random(2, w)
        return 1.0, (self.cat[k] if w == CATEGORIES[k]
                     else _unit(self.cat[k] + SYNONYM_SPREAD * self._random(2, w)))

    def encode(self, text):
        """(DIM,) unit feature of one string."""
        v = STRING_NOISE * self._random(3, text)
        for w in re.findall(r"[a-z]+", text.lower()):
            weight, vec = self.word(w)
            v = v + weight * vec
        return _unit(v)

    def text_feat(self, text):
        """Release layout {"original": (1, DIM), "prompt_avg": (1, DIM)}; all-zero for an empty
        caption."""
        if not text:
            return {"original": np.zeros((1, DIM), np.float32),
                    "prompt_avg": np.zeros((1, DIM), np.float32)}
        avg = _unit(np.mean([self.encode(p.format(text)) for p in PROMPTS], 0))
        return {"original": self.encode(text)[None].astype(np.float32),
                "prompt_avg": avg[None].astype(np.float32)}

    def class_feat(self, name):
        return self.text_feat(name)["prompt_avg"]

    def views(self, rng, category, colour, phrase, n):
        """(n, DIM) render features: hidden description -> fixed distortion -> per-view noise."""
        s = _unit(self.encode(f"{colour} {category} {phrase}")
                  + DETAIL * _unit(rng.standard_normal(DIM)))
        # category k leaks into lookalike[k]
        s = s + (self.leak * (self.cat @ s)) @ self.cat[self.lookalike]
        s = _unit(s) + RENDER_OFFSET * self.render
        noise = VIEW_NOISE * _unit(rng.standard_normal((n, DIM)))
        noise += VIEW_CONFUSION * rng.standard_normal((n, len(CATEGORIES))) @ self.cat
        return _unit(s + noise).astype(np.float32)


def _pick(rng, items):
    return items[rng.integers(len(items))]


def _texts(rng, dataset, category, colour, phrase):
    """(text list, GPT-4 flag, BLIP caption, MSFT caption, retrieval texts) of one shape."""
    syns = _SPEC[category][2]
    syn = _pick(rng, syns)
    if dataset == "ShapeNet":
        extra = rng.choice(syns[1:], rng.integers(0, len(syns)), replace=False)
        text, flag = [category] + [str(t) for t in extra], "Y"
    elif rng.random() < 0.1:  # a junk Objaverse name, which the GPT-4 filter catches
        text, flag = [f"{_pick(rng, JUNK)}_{_pick(rng, JUNK)}.{rng.integers(1000):03d}"], "N"
    else:
        forms = [f"{colour.title()} {syn.title()}", f"{syn.replace(' ', '_')}_lowpoly",
                 f"{syn} {rng.integers(1, 99)}"]
        text, flag = [_pick(rng, forms)], "Y"
    blip = f"a {colour} {syn} {phrase}"
    msft = _pick(rng, ["", f"a {syn} on a white background", f"a 3d model of a {syn}",
                       f"a {colour} object"])
    family = [c for c in CATEGORIES if _SPEC[c][1] == _SPEC[category][1]]
    retrieval = []
    for _ in range(rng.integers(0, 4)):
        about = _SPEC[_pick(rng, family)][2] if rng.random() < 0.2 else syns
        retrieval.append(f"{_pick(rng, SELLER)} {colour} {_pick(rng, about)} for sale")
    return text, flag, blip, msft, retrieval


def _write_shape(folder, teacher, rng, dataset, group, category, num_points):
    """Write one per-shape dict of the release (docs/data-format.md); return (id, GPT-4 flag, mean
    view)."""
    uid = rng.bytes(16).hex()
    xyz, rgb, colour, phrase = make_shape(rng, category, num_points)
    text, flag, blip, msft, retrieval = _texts(rng, dataset, category, colour, phrase)
    views = teacher.views(rng, category, colour, phrase, NUM_VIEWS + (dataset == "Objaverse"))
    d = {"dataset": dataset, "group": group, "id": uid, "xyz": xyz, "rgb": rgb,
         "image_feat": views[:NUM_VIEWS]}
    if dataset == "Objaverse":
        d["thumbnail_feat"] = views[NUM_VIEWS]
    d.update(text=text, text_feat=[teacher.text_feat(t) for t in text],
             blip_caption=blip, msft_caption=msft,
             blip_caption_feat=teacher.text_feat(blip), msft_caption_feat=teacher.text_feat(msft),
             retrieval_text=retrieval,
             retrieval_text_feat=[teacher.text_feat(t) for t in retrieval])
    save_npy(folder / dataset / group / f"{uid}.npy", d)
    return uid, flag, _unit(views[:NUM_VIEWS].mean(0))


# ----------------------------------------------------------------------------- writing the world

def _params(num_shapes=NUM_SHAPES, num_points=NUM_POINTS,
            num_test_per_class=NUM_HELD_OUT_PER_CLASS, seed=0):
    # the source hash makes an edited generator miss the cache instead of reusing stale data
    return {"num_shapes": int(num_shapes), "num_points": int(num_points),
            "num_test_per_class": int(num_test_per_class), "seed": int(seed),
            "source": hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]}


def _save_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _write(folder, p, progress):
    """All files of a world into `folder`. Each set has its own seed stream, so sets never share a
    shape."""
    seed = p["seed"]
    k = p["num_test_per_class"]
    n_cls = len(CATEGORIES)
    teacher, meta = Teacher(seed), folder / "meta_data"
    bar = tqdm(total=p["num_shapes"] + 3 * k * n_cls, desc="synthetic world", unit="shape",
               disable=None if progress else True)
    train, lvis, flags, mean_views = [], [], {}, []
    for i in range(p["num_shapes"]):
        rng, category = np.random.default_rng([seed, 10, i]), CATEGORIES[i % n_cls]
        dataset = "Objaverse" if rng.random() < OBJAVERSE_FRACTION else "ShapeNet"
        group = f"000-{i // GROUP_SIZE:03d}" if dataset == "Objaverse" else _SPEC[category][3]
        uid, flag, mean_view = _write_shape(folder, teacher, rng, dataset, group, category,
                                            p["num_points"])
        train.append({"id": uid, "data_path": f"/mnt/data/{dataset}/{group}/{uid}.npy",
                      "dataset": dataset, "group": group})
        if dataset == "Objaverse":
            flags[uid] = {"flag": flag}
        mean_views.append(mean_view)
        bar.update()
    # LVIS shapes get the group after the training ones
    group = f"000-{-(-p['num_shapes'] // GROUP_SIZE):03d}"
    for i in range(k * n_cls):
        rng, category = np.random.default_rng([seed, 13, i]), CATEGORIES[i // k]
        uid, flag, _ = _write_shape(folder, teacher, rng, "Objaverse", group, category,
                                    p["num_points"])
        lvis.append({"uid": uid, "data_path": f"/mnt/data/Objaverse/{group}/{uid}.npy",
                     "category": category, "group": group})
        flags[uid] = {"flag": flag}
        bar.update()
    for name, stream, prefix in [("modelnet40", 11, ""), ("val", 12, "val_")]:
        clouds, split = [], []
        for i in range(k * n_cls):
            category = CATEGORIES[i // k]
            xyz, rgb, _, _ = make_shape(np.random.default_rng([seed, stream, i]), category,
                                        p["num_points"])
            # the ModelNet40 file stores rgb 0-255
            clouds.append({"xyz": xyz, "rgb": rgb * np.float32(255)})
            split.append({"name": f"{prefix}{category}_{i % k + 1:04d}", "category": category})
            bar.update()
        save_npy(meta / name / "test_pc.npy", np.array(clouds, dtype=object))
        _save_json(meta / name / "test_split.json", split)
        save_npy(meta / name / "cat_name_pt_feat.npy",
                  {c: {"open_clip_text_feat": teacher.class_feat(c)} for c in CATEGORIES})
    bar.close()
    shapenet = [e for e in train if e["dataset"] == "ShapeNet"]
    for name, entries in [("train_all", train), ("train_no_lvis", train),
                          ("ablation/train_shapenet_only", shapenet), ("lvis", lvis)]:
        _save_json(meta / "split" / f"{name}.json", entries)
    save_npy(meta / "lvis_cat_name_pt_feat.npy",
             np.concatenate([teacher.class_feat(c) for c in sorted(CATEGORIES)]))
    _save_json(meta / "gpt4_filtering.json", flags)
    labels = np.arange(p["num_shapes"]) % n_cls
    save_npy(meta / "point_feat_knn.npy",
             _knn([e["id"] for e in train], labels, np.stack(mean_views)))


def _knn(ids, labels, feats):
    """OpenShape's hard-negative index: per shape, itself and then its nearest same-category
    shapes."""
    sim = feats @ feats.T
    sim[labels[:, None] != labels[None, :]] = -np.inf
    np.fill_diagonal(sim, np.inf)
    keep = np.minimum(KNN, np.bincount(labels)[labels])
    order = np.argsort(-sim, axis=1, kind="stable")
    return {"name": ids,
            "index": {uid: order[i, :keep[i]].astype(np.int64) for i, uid in enumerate(ids)}}


def _is_complete(root, params):
    try:
        return json.loads((root / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def build_world(root, num_shapes=NUM_SHAPES, num_points=NUM_POINTS,
                num_test_per_class=NUM_HELD_OUT_PER_CLASS, seed=0, progress=True):
    """Write a fresh world to `root` (replacing an earlier world there) and return its path.

    It is written into a temporary sibling folder, the marker last, then renamed into place, so
    `root` is never a half-written world. A folder that holds other things than a world is refused,
    not deleted."""
    params = _params(num_shapes, num_points, num_test_per_class, seed)
    root = Path(root).resolve()
    ours = {"Objaverse", "ShapeNet", "meta_data", MARKER}
    if root.exists() and (not root.is_dir() or not {c.name for c in root.iterdir()} <= ours):
        raise BadInput(f"{root}: exists and is not a synthetic world; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    # left by interrupted builds whose process is gone
    for old in root.parent.glob(f".tmp-{root.name}-*"):
        if not _alive(old.name.rsplit("-", 1)[-1]):
            shutil.rmtree(old, ignore_errors=True)
    tmp = root.parent / f".tmp-{root.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, params, progress)
        (tmp / MARKER).write_text(json.dumps(params))
        if _is_complete(root, params):  # another process finished the same world meanwhile
            shutil.rmtree(tmp)
            return root
        shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            # lost a race only if the winner wrote the same world
            if not _is_complete(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def ensure_world(root=None, **kw):
    """Path of a complete world with these parameters (build_world's), built on first use.

    Default root: data/synthetic-<hash of the parameters and of this file>. A world whose marker is
    missing or records other parameters (an interrupted or older build) is rebuilt, never used."""
    params = _params(**{k: v for k, v in kw.items() if k != "progress"})
    if root is None:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()
        root = CACHE / f"synthetic-{digest[:10]}"
    root = Path(root).resolve()
    if _is_complete(root, params):
        return root
    return build_world(root, **kw)


def shared_world(local_rank=0, distributed=False):
    """The default world of every entry point (no --data): built once per node by local rank 0 while
    the other ranks wait (nodes need not share a file system), then found in its cache by
    everyone."""
    if local_rank == 0:
        ensure_world()
    if distributed:
        torch.distributed.barrier()
    return ensure_world()


def teacher_of(root):
    """Which teacher made the CLIP features under a data root: {"name": "synthetic", "seed": s} for
    a world of this file (its marker records the seed), {"name": "clip"} for real data. Checkpoints
    keep it, so evaluate.py encodes your labels with the teacher the model was trained against."""
    try:
        params = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return {"name": "clip"}
    return {"name": "synthetic", "seed": int(params.get("seed", 0))}


def category_words():
    """The words the simulated text encoder ties to a category (its names and synonyms, such as
    "couch"); any other word gets a random direction of its own, so a label without one means
    nothing here."""
    return set(_WORD_CATEGORY)


def main(argv=None):
    ap = Parser("Build (or reuse) the synthetic OpenShape-format world.")
    ap.add_argument("--out", type=output_dir, default=None,
                    help="world folder (default: a cache folder under data/)")
    ap.add_argument("--num-shapes", type=POSITIVE_INT, default=NUM_SHAPES, help="training shapes")
    ap.add_argument("--num-points", type=POSITIVE_INT, default=NUM_POINTS,
                    help="points stored per shape")
    ap.add_argument("--num-test-per-class", type=POSITIVE_INT, default=NUM_HELD_OUT_PER_CLASS,
                    help="shapes per class in each of test, val and LVIS")
    ap.add_argument("--seed", type=COUNT, default=0)
    args = ap.parse_args(argv)
    root = ensure_world(args.out, **{k: v for k, v in vars(args).items() if k != "out"})
    print(root)
    return root


if __name__ == "__main__":
    run_cli(main)
