"""CLIP features with open_clip for your own labels and shapes
(the frozen teacher of TAMM, paper Sec. 3).

TAMM never runs CLIP while training: the OpenShape release ships precomputed ViT-bigG-14 features of
the rendered views and texts of every shape, and of the class names of each evaluation set
(docs/data-format.md).
This file makes the same features for data that is not in the release:

- `classes`: class names -> prompt-ensembled text features (each name filled into PROMPT_TEMPLATES,
  every prompt encoded and L2-normalised, averaged over templates, re-normalised; open_clip's
  zero-shot recipe), written as `cat_name_pt_feat.npy` (`{name: {"open_clip_text_feat": (1, D)}}`,
  class order = dict order; ModelNet40/ScanObjectNN layout) or as a plain (C, D) array
  (Objaverse-LVIS layout: rows follow the order given, and the LVIS reader pairs them with the
  *sorted* category names, so give the names sorted).
- `shapes`: a folder of rendered views of new shapes -> one release-format `.npy` dict per shape
  plus a `split.json` listing them (the split-file format the training reader takes). The folder
  looks like

      IMAGES/<shape id>/*.png|*.jpg|*.jpeg|*.bmp|*.webp
          rendered views, in file-name order -> image_feat rows
      IMAGES/<shape id>/thumbnail.<ext>
          optional; -> thumbnail_feat (D,) as for Objaverse
      IMAGES/<shape id>/points.npy
          required: (N, 6) xyz + rgb in [0, 1], or (N, 3) xyz
      IMAGES/<shape id>/captions.txt
          optional: one text per non-empty line

  The texts of a shape are its entry in `--captions FILE` (JSON: {shape id: [text, ...] or "text"})
  followed by the lines of its captions.txt; each gets `original` and `prompt_avg` features. Views
  are not points, so points.npy is required (the trainer needs xyz/rgb); store it y-up like the
  release (the reader swaps y/z). Points are read as `evaluate.py --pc` reads files
  (tools/pointclouds.py: rgb on 0-255 is divided by 255, no rgb gives 0.4, as OpenShape and TAMM
  colour colourless points). BLIP/MSFT captions are "" with all-zero features and retrieval texts
  are empty: the reader only uses non-empty ones. All features are L2-normalised float32.

Weights: `--pretrained` is an open_clip tag (default laion2b_s39b_b160k, downloaded once into the
Hugging Face cache, ~10 GB), a local weights file, or `none` (random weights, for demos and tests).
Without network the tag works only if the cache (HF_HOME) already holds it; otherwise download the
file on a machine with network and pass its path.

    python -m tools.clip_features classes --names "chair,table,lamp" \\
        --out cat_name_pt_feat.npy  # CPU works
    python -m tools.clip_features classes --names-file lvis_names.txt --layout lvis \\
        --out lvis_cat_name_pt_feat.npy
    python -m tools.clip_features shapes --images renders/ --captions captions.json \\
        --out my_shapes/ --device cuda
    python -m tools.clip_features classes --names a,b --out demo.npy --model ViT-B-32 \\
        --pretrained none  # demo
"""
import json
import os
import sys

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image
from tqdm import tqdm

from cli import (
    Parser,
    device,
    existing_dir,
    existing_file,
    output_dir,
    output_file,
    parse_names,
    run_cli,
)
from files import BadInput, check_writable, save_npy
from tools.download import hub_check
from tools.pointclouds import read_point_cloud

# The teacher of OpenShape and TAMM (OpenShape src/configs/train.yaml clip_embed_version): 1280-d
# features.
DEFAULT_MODEL = "ViT-bigG-14"
DEFAULT_PRETRAINED = "laion2b_s39b_b160k"
# Render formats PIL reads; any other file in a shape folder (points.npy, captions.txt) is not a
# view.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Our own wording of the ~60 prompts OpenShape-style ensembling uses (the release averages 64). They
# describe renders and scans of 3D objects, since that is what the point encoder is aligned to.
PROMPT_TEMPLATES = [
    "a 3D model of a {}.", "a 3D rendering of a {}.", "a render of a {} on a plain background.",
    "a point cloud of a {}.", "a 3D scan of a {}.", "a CAD model of a {}.", "a mesh of a {}.",
    "a low-poly model of a {}.", "a high-poly model of a {}.", "a detailed 3D model of a {}.",
    "a simple 3D model of a {}.", "a textured 3D model of a {}.", "an untextured 3D model of a {}.",
    "a grey 3D model of a {}.", "a colourful 3D model of a {}.", "a digital model of a {}.",
    "a computer graphics image of a {}.", "a video game asset of a {}.", "a 3D print of a {}.",
    "a sculpture of a {}.", "a toy {}.", "a miniature {}.", "a small {}.", "a large {}.",
    "a big 3D model of a {}.", "a tiny 3D model of a {}.", "a {} seen from the front.",
    "a {} seen from the side.", "a {} seen from above.", "a {} seen from behind.",
    "a {} seen from below.", "a {} viewed at an angle.", "a close-up render of a {}.",
    "a render of a {} from far away.", "a turntable render of a {}.", "a shaded render of a {}.",
    "a wireframe of a {}.", "a voxel model of a {}.", "a reconstruction of a {}.",
    "a LiDAR scan of a {}.", "a depth scan of a {}.", "a sparse point cloud of a {}.",
    "a dense point cloud of a {}.", "a noisy scan of a {}.", "a partial scan of a {}.",
    "a clean 3D model of a {}.", "a rough 3D model of a {}.", "a stylised 3D model of a {}.",
    "a realistic 3D model of a {}.", "a cartoon 3D model of a {}.", "an old {} in 3D.",
    "a modern {} in 3D.", "a broken {} in 3D.", "a photo of a {}.", "a picture of a {}.",
    "an image of a {}.", "a 3D object that is a {}.", "a 3D shape of a {}.",
    "the 3D geometry of a {}.", "there is a {} in the scene.", "a {}.", "{}",
]


def _tag_weights(model_name, tag, cfg, flag="--pretrained"):
    """Local weights file for an open_clip pretrained tag: the Hugging Face cache, else a
    download."""
    repo, filename = os.path.split(cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    # open_clip looks for a safetensors twin first, then the pickle
    # (open_clip.pretrained.download_pretrained_from_hf).
    safe = (HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME
            else os.path.splitext(filename)[0] + ".safetensors")
    for name in (safe, filename):
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return cached
    hub_check(f"{flag} {tag}",
              f"{model_name} weights are not in the Hugging Face cache: download "
              f"{hf_constants.ENDPOINT}/{repo} on a machine with network and pass the weights "
              f"file with {flag} PATH, or set HF_HOME to a Hugging Face cache that holds it")
    return open_clip.download_pretrained(cfg)


def check_clip(model_name, pretrained, flags=("--model", "--pretrained")):
    """BadInput naming the flag unless `model_name` is an open_clip model and `pretrained`
    None/"none", one of its tags or a weights file -> the tag's config ({} otherwise). Loads and
    downloads nothing: the command lines call it before any work."""
    if model_name not in open_clip.list_models():
        raise BadInput(f"{flags[0]} {model_name}: not an open_clip model name "
                       f"(e.g. {DEFAULT_MODEL}; see open_clip.list_models())")
    if pretrained is None or os.fspath(pretrained).lower() == "none":
        return {}
    cfg = open_clip.get_pretrained_cfg(model_name, os.fspath(pretrained))
    if not cfg and not os.path.isfile(pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise BadInput(f"{flags[1]} {pretrained}: no such weights file, and not a pretrained tag "
                       f"of {model_name} (its tags: {tags})")
    return cfg


def load_clip(model_name=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED, device="cpu",
              flags=("--model", "--pretrained")):
    """(model, tokenizer, preprocess) of a frozen open_clip model in eval mode on `device`.

    `pretrained`: an open_clip tag of `model_name`, a path to a weights file, or None/"none" for
    random weights. Fails fast with BadInput when the weights cannot be had (no network, missing
    file); `flags` are the names of the two flags in the messages."""
    cfg = check_clip(model_name, pretrained, flags)
    weights = (None if pretrained is None or os.fspath(pretrained).lower() == "none"
               else os.fspath(pretrained))
    if cfg:  # a tag: its file in the Hugging Face cache, downloaded if need be
        weights = _tag_weights(model_name, pretrained, cfg, flags[1])
    # Build with random weights and load the file ourselves, so only loading errors become BadInput.
    # The tag's preprocessing is applied as open_clip does; its QuickGELU flag is forced, where
    # open_clip only warns on a mismatch that silently gives wrong features.
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=None, pretrained_text=False,
        force_quick_gelu=cfg.get("quick_gelu", False),
        image_mean=cfg.get("mean"), image_std=cfg.get("std"),
        image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"))
    if weights is not None:
        try:
            open_clip.load_checkpoint(model, weights)
        except Exception as e:  # torch, safetensors and open_clip each raise their own kinds here
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            raise BadInput(f"{weights}: cannot load {model_name} weights from this file "
                           f"({type(e).__name__}: {first_line})") from None
    return model.to(device).eval(), open_clip.get_tokenizer(model_name), preprocess


@torch.no_grad()
def encode_texts(texts, model, tokenizer, device="cpu", batch_size=256):
    """(N, D) float32 L2-normalised CLIP text features of `texts` (the release's `original`
    features)."""
    if len(texts) == 0:
        raise BadInput("no texts to encode")
    feats = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(feats).numpy()


def _prompt_average(texts, model, tokenizer, templates, device):
    """(N, D): per text, the re-normalised mean of its normalised features in every template.

    Normalising before the mean gives every template the same weight; normalising after puts the
    result back on the unit sphere where cosine scores are compared (open_clip's zero-shot
    classifier does both)."""
    if len(templates) == 0 or any(t.count("{}") != 1 for t in templates):
        raise BadInput("prompt templates must be a non-empty list of strings with exactly one "
                       "'{}' each")
    prompts = [t.format(text) for text in texts for t in templates]
    feats = encode_texts(prompts, model, tokenizer, device).reshape(len(texts), len(templates), -1)
    mean = feats.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


def _check_names(names):
    """Class names must be non-empty, distinct strings (the modelnet layout is a dict keyed by
    name)."""
    if len(names) == 0:
        raise BadInput("no class names given")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise BadInput(f"class name {i + 1} of {len(names)} is empty")
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise BadInput(f"class names appear more than once: {', '.join(duplicates)}")


@torch.no_grad()
def encode_class_names(names, model, tokenizer, templates=PROMPT_TEMPLATES, device="cpu"):
    """(C, D) float32 prompt-ensembled, L2-normalised features of the class names (zero-shot
    classifier)."""
    _check_names(names)
    return _prompt_average(list(names), model, tokenizer, templates, device)


def write_class_features(names, feats, path, layout="modelnet"):
    """Write class features in the release layout: "modelnet" (dict by name, in order) or "lvis"
    (C x D)."""
    _check_names(names)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] != len(names):
        raise BadInput(f"{path}: need one feature row per class name ({len(names)}), "
                       f"got shape {feats.shape}")
    if layout == "modelnet":
        save_npy(path, {name: {"open_clip_text_feat": feats[i:i + 1]}
                        for i, name in enumerate(names)})
    elif layout == "lvis":
        save_npy(path, feats)
    else:
        raise BadInput(f"--layout {layout}: expected 'modelnet' or 'lvis'")


def read_class_features(path):
    """(names, (C, D) float32) from either layout; names is None for "lvis" (the file holds no
    names)."""
    if not os.path.isfile(path):
        raise BadInput(f"{path}: class feature file not found")
    try:
        data = np.load(path, allow_pickle=True)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError or an unpickling error
        raise BadInput(f"{path}: not a readable .npy file ({type(e).__name__})") from None
    if data.dtype != object and data.ndim == 2:
        return None, data.astype(np.float32)
    entries = data.item() if data.dtype == object and data.ndim == 0 else None
    if not isinstance(entries, dict) or not entries:
        raise BadInput(f"{path}: expected a (C, D) array or a "
                       f"{{name: {{'open_clip_text_feat': (1, D)}}}} dict")
    try:
        rows = [np.asarray(v["open_clip_text_feat"], dtype=np.float32).reshape(-1)
                for v in entries.values()]
        return list(entries), np.stack(rows)
    except (KeyError, TypeError, ValueError, IndexError):
        raise BadInput(f"{path}: every class needs an 'open_clip_text_feat' of the same "
                       f"width") from None


def _read_captions(path):
    """{shape id: [text, ...]} from a captions JSON ({id: [texts] or "text"})."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise BadInput(f"{path}: cannot read captions file ({e.strerror})") from None
    except ValueError:
        raise BadInput(f"{path}: captions file is not valid JSON") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: captions JSON must map shape id -> list of texts")
    captions = {}
    for sid, texts in raw.items():
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadInput(f"{path}: captions of {sid!r} must be a string or a list of strings")
        captions[sid] = [t for t in texts if t.strip()]
    return captions


def scan_shape_folder(images_dir):
    """[(shape id, view paths, thumbnail path or None, points path)], checked before any
    encoding."""
    if not os.path.isdir(images_dir):
        raise BadInput(f"{images_dir}: images folder not found")
    shapes = []
    for sid in sorted(os.listdir(images_dir)):
        folder = os.path.join(images_dir, sid)
        if not os.path.isdir(folder):
            continue
        images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        thumbnail = next((os.path.join(folder, f) for f in images
                          if os.path.splitext(f)[0] == "thumbnail"), None)
        views = [os.path.join(folder, f) for f in images if os.path.splitext(f)[0] != "thumbnail"]
        if not views:
            raise BadInput(f"{folder}: no rendered views ({', '.join(IMAGE_EXTENSIONS)} files)")
        points = os.path.join(folder, "points.npy")
        if not os.path.isfile(points):
            raise BadInput(f"{folder}: no points.npy (N x 6 xyz+rgb or N x 3 xyz); "
                           f"the trainer needs points")
        shapes.append((sid, views, thumbnail, points))
    if not shapes:
        raise BadInput(f"{images_dir}: no shape sub-folders")
    return shapes


@torch.no_grad()
def _encode_images(paths, model, preprocess, device):
    """(V, D) float32 L2-normalised CLIP image features; transparent pixels are put on white."""
    batch = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
                batch.append(preprocess(Image.alpha_composite(canvas, im).convert("RGB")))
        except OSError as e:
            raise BadInput(f"{p}: cannot read image ({e})") from None
    feats = model.encode_image(torch.stack(batch).to(device)).float()
    return F.normalize(feats, dim=-1).cpu().numpy()


def encode_shape_folder(images_dir, out_dir, model, tokenizer, preprocess, captions=None,
                        device="cpu", dataset="custom"):
    """Write out_dir/<id>.npy (release format) for each shape sub-folder and out_dir/split.json;
    returns paths.

    `captions`: optional path of a JSON {shape id: [texts]}; see the module docstring for the
    folder layout.
    `group` (a sub-division in the release, e.g. an Objaverse shard) is the name of `images_dir`."""
    shapes = scan_shape_folder(images_dir)
    texts_by_id = _read_captions(captions) if captions else {}
    if unknown := set(texts_by_id) - {s[0] for s in shapes}:
        print(f"warning: {captions}: {len(unknown)} captioned ids have no folder in {images_dir}",
              file=sys.stderr)
    check_writable(out_dir)
    group = os.path.basename(os.path.normpath(images_dir))
    written, split = [], []
    for sid, views, thumbnail, points in tqdm(shapes, desc="shapes"):
        xyz, rgb = read_point_cloud(points)
        texts = list(texts_by_id.get(sid, []))
        txt = os.path.join(images_dir, sid, "captions.txt")
        if os.path.isfile(txt):
            with open(txt) as f:
                texts += [line.strip() for line in f if line.strip()]
        image_feat = _encode_images(views, model, preprocess, device)
        no_caption = {k: np.zeros((1, image_feat.shape[1]), np.float32)
                      for k in ("original", "prompt_avg")}
        text_feat = []
        if texts:
            original = encode_texts(texts, model, tokenizer, device)
            prompt_avg = _prompt_average(texts, model, tokenizer, PROMPT_TEMPLATES, device)
            text_feat = [{"original": original[i:i + 1], "prompt_avg": prompt_avg[i:i + 1]}
                         for i in range(len(texts))]
        shape = {"dataset": dataset, "group": group, "id": sid, "xyz": xyz, "rgb": rgb,
                 "image_feat": image_feat, "text": texts, "text_feat": text_feat,
                 "blip_caption": "", "blip_caption_feat": dict(no_caption),
                 "msft_caption": "", "msft_caption_feat": dict(no_caption),
                 "retrieval_text": [], "retrieval_text_feat": []}
        if thumbnail is not None:
            shape["thumbnail_feat"] = _encode_images([thumbnail], model, preprocess, device)[0]
        path = os.path.abspath(os.path.join(out_dir, f"{sid}.npy"))
        save_npy(path, shape)
        written.append(path)
        split.append({"id": sid, "data_path": path, "dataset": dataset, "group": group})
    with open(os.path.join(out_dir, "split.json"), "w") as f:
        json.dump(split, f, indent=1)
    return written


def main(argv=None):
    parser = Parser("CLIP features of class names or rendered shapes (open_clip).")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name")
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                        help="open_clip tag, weights file, or 'none'")
    parser.add_argument("--device", type=device,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    sub = parser.add_subparsers(dest="command", required=True)
    classes = sub.add_parser("classes", help="class names -> prompt-ensembled text features")
    names = classes.add_mutually_exclusive_group(required=True)
    names.add_argument("--names", help="comma-separated class names")
    names.add_argument("--names-file", type=existing_file,
                       help="text file, one class name per line")
    classes.add_argument("--out", type=output_file, required=True, help="output .npy")
    classes.add_argument("--layout", choices=["modelnet", "lvis"], default="modelnet")
    shapes = sub.add_parser("shapes",
                            help="folder of rendered shapes -> per-shape release-format .npy")
    shapes.add_argument("--images", type=existing_dir, required=True,
                        help="folder with one sub-folder of views per shape")
    shapes.add_argument("--captions", type=existing_file, help="JSON {shape id: [texts]}")
    shapes.add_argument("--out", type=output_dir, required=True, help="output folder")
    shapes.add_argument("--dataset", default="custom", help="value of the 'dataset' field")
    args = parser.parse_args(argv)

    # Check everything cheap before loading CLIP, which takes minutes for ViT-bigG-14.
    check_clip(args.model, args.pretrained)
    if args.command == "classes":
        flag = "--names" if args.names is not None else "--names-file"
        class_names = parse_names(args.names if args.names is not None else args.names_file, flag)
        try:
            _check_names(class_names)
        except BadInput as e:  # say which flag gave the names
            raise BadInput(f"{flag}: {e}") from None
    else:
        scan_shape_folder(args.images)
        if args.captions:
            _read_captions(args.captions)
        check_writable(args.out, "--out")
    model, tokenizer, preprocess = load_clip(args.model, args.pretrained, args.device)
    if args.command == "classes":
        feats = encode_class_names(class_names, model, tokenizer, device=args.device)
        write_class_features(class_names, feats, args.out, args.layout)
        print(f"wrote {len(class_names)} x {feats.shape[1]} class features ({args.layout} layout) "
              f"to {args.out}")
    else:
        written = encode_shape_folder(args.images, args.out, model, tokenizer, preprocess,
                                      args.captions, args.device, args.dataset)
        print(f"wrote {len(written)} shapes and split.json to {args.out}")


if __name__ == "__main__":
    run_cli(main)
