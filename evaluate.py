"""Evaluate a TAMM (or OpenShape) point encoder: zero-shot, few-shot probes, your own clouds.

Paper: TAMM (CVPR 2024), section 4. A checkpoint is judged three ways:
  - Zero-shot classification: class names -> prompt-ensembled CLIP text features T_c; a shape scores
    cos(TAA(f), T_c) + alpha * cos(IAA(f), T_c) (alpha = 0.5). Reported per branch (text, image and
    fused; OpenShape's single head is one branch): top-1/3/5, per-class and mean per-class accuracy
    and the confusion matrix. Points as TAMM's evaluation takes them: the first N, y/z swapped,
    centred, unit sphere (`--point-order permuted`: OpenShape's loaders).
  - Few-shot linear probing on frozen features (fewshot.py), three protocols: `folds`, Point-BERT's
    released ModelNet40 folds (--fewshot-folds DIR; the paper's 96.1 -> 99.0); `episodes`, N-way
    K-shot episodes drawn from a benchmark's shapes; `openshape`, K shapes per class for training
    and the rest for testing.
  - Your own point clouds (--pc FILE_OR_FOLDER ...): zero-shot against your labels, encoded by the
    teacher the checkpoint was trained against (CLIP, or the synthetic world's simulated teacher),
    and/or the features written to an .npz.
`--compare A.pt B.pt ...` evaluates several checkpoints with the same settings into one table.

Checkpoints: ours, the released TAMM files (no config inside: --scaling, default 4, the size of
every released file), OpenShape's PointBERT, or a released name (tools/download.py, fetched once).
Every checkpoint is read and checked before any evaluation starts. Under torchrun each rank encodes
every world_size-th shape and the features are gathered, so every shape counts once. Results:
eval_<name>.json and .md, with the checkpoint's step and hash, the code version and the time.

    python evaluate.py --ckpt runs/demo/stage2/latest.pt               # synthetic world, on a CPU
    python evaluate.py --ckpt tamm-ensemble --data /data/openshape --fewshot-folds /data/fewshot
    torchrun --nproc_per_node=4 evaluate.py --ckpt tamm-ensemble --data /data/openshape
    python evaluate.py --ckpt runs/demo/stage2/latest.pt --pc chair.ply mug.npy --labels chair,mug
"""
import hashlib
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import data
import fewshot
from adapters import FUSION_ALPHA, zero_shot_scores
from checkpoint import load_checkpoint, load_pretrained, variant
from files import BadInput, atomic_save, save_json
from model import CONFIGS
from runtime import (
    AUTOCAST_DTYPES,
    cleanup_distributed,
    device_type,
    launch_env,
    provenance,
    resolve_precision,
    setup_distributed,
)
from tools import pointclouds, synthetic
from tools.download import NAMED_CHECKPOINTS, resolve_checkpoint

NUM_POINTS = 10000     # TAMM evaluates the first 10,000 points (its pointbert.yaml)
BATCH_SIZE = 8         # per rank; on a CPU 32 is 12% slower (the activations leave the cache)
BENCHMARKS = ("modelnet40", "lvis", "scanobjectnn")  # the paper's zero-shot tables
TOP_LABELS = 5         # labels printed per point-cloud file
CLIP_MODEL = "ViT-bigG-14"              # the teacher of OpenShape and TAMM
CLIP_PRETRAINED = "laion2b_s39b_b160k"  # its weights (OpenShape src/configs/train.yaml)


# ---- features, gathered across ranks -------------------------------------------------------------


@torch.no_grad()
def encode_shard(model, loader, device="cpu", precision="fp32", progress=False):
    """This rank's share of an eval loader -> {"backbone", "text", "image", "label", "index"}."""
    cast = torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision],
                          enabled=precision != "fp32")
    parts = {k: [] for k in ("backbone", "text", "image", "label", "index")}
    bar = tqdm(loader, desc="encode", disable=None if progress else True, leave=False)
    for points, labels, index in bar:
        with cast:
            out = model(points.to(device, non_blocking=True))          # 3 x (B, dim or 1280)
        for k in ("backbone", "text", "image"):
            parts[k].append(out[k].float().cpu())
        parts["label"].append(torch.as_tensor(labels).long())
        parts["index"].append(torch.as_tensor(index).long())
    # a rank can get no shape at all (fewer shapes than ranks): keep the widths
    widths = {"backbone": model.cfg.dim, "text": model.clip_dim, "image": model.clip_dim}
    out = {}
    for k, v in parts.items():
        if v:
            out[k] = torch.cat(v)
        elif k in widths:
            out[k] = torch.zeros(0, widths[k])
        else:
            out[k] = torch.zeros(0, dtype=torch.long)
    return out


def merge_shards(shards, total=None):
    """Per-rank feature dicts -> one dict in dataset order. Fails loudly if a shape is missing or
    counted twice, which is the point of gathering the indices along with the features."""
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = torch.argsort(merged["index"])
    merged = {k: v[order] for k, v in merged.items()}
    if len(order) and (merged["index"][1:] == merged["index"][:-1]).any():
        raise RuntimeError("a shape was gathered from more than one rank")
    if total is not None and not torch.equal(merged["index"], torch.arange(total)):
        raise RuntimeError(f"gathered {len(order)} shapes, the dataset has {total}")
    return merged


def extract_features(model, loader, device="cpu", precision="fp32", progress=False):
    """Encode this rank's share of an eval loader (data.make_eval_loader) and gather: every rank
    returns the features of the whole dataset, each shape once, in dataset order."""
    shards = [encode_shard(model, loader, device, precision, progress)]
    if dist.is_available() and dist.is_initialized():  # a few MB per rank, pickled
        local = shards[0]
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, local)
    return merge_shards(shards, total=len(loader.dataset))


# ---- zero-shot -----------------------------------------------------------------------------------


def topk_metrics(scores, labels, num_classes=None, ks=(1, 3, 5)):
    """(M, C) scores, (M,) labels -> top-1/3/5 (the label among the k highest scores, k capped at
    C), the mean class accuracy (top-1 averaged over the classes present), per-class top-1 (None for
    absent classes) and the confusion matrix as [true, predicted, count] of every nonzero cell."""
    scores = torch.as_tensor(scores).float()
    labels = torch.as_tensor(labels).long()
    num_classes = num_classes or scores.shape[1]
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices          # (M, k)
    hit = top == labels[:, None]                                                # (M, k)
    out = {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}
    per_class = []
    for c in range(num_classes):
        present = labels == c
        per_class.append(hit[present, 0].float().mean().item() if present.any() else None)
    out["mean_class_acc"] = float(np.mean([a for a in per_class if a is not None]))
    out["per_class_top1"] = per_class
    pairs, counts = torch.stack([labels, top[:, 0]], 1).unique(dim=0, return_counts=True)
    out["confusion"] = [[t, p, n] for (t, p), n in zip(pairs.tolist(), counts.tolist())]
    return out


def zero_shot(feats, class_feat, alpha=FUSION_ALPHA, single_branch=False):
    """{branch: topk_metrics} of text, image and fused (text + alpha * image); one "single" branch
    for OpenShape's head."""
    text, image, fused = zero_shot_scores(feats["text"], feats["image"], class_feat, alpha)
    if single_branch:
        return {"single": topk_metrics(text, feats["label"])}
    branches = {"text": text, "image": image, "fused": fused}
    return {name: topk_metrics(scores, feats["label"]) for name, scores in branches.items()}


# ---- few-shot on Point-BERT's folds --------------------------------------------------------------


def few_shot_folds(model, settings, args, env):
    """The `folds` protocol: every fold of every (way, shot) -> encoder features -> probe, then the
    mean +- std over the folds of each setting."""
    results = {}
    for (way, shot), paths in settings.items():
        accuracies = []
        for k, path in enumerate(paths):
            fold = pointclouds.read_fewshot_fold(path, way, shot, seed=args.seed + k)
            train, train_y, test, test_y = fold
            shapes = list(zip(torch.cat([train, test]), torch.cat([train_y, test_y]).tolist()))
            loader = data.make_eval_loader(shapes, args.batch_size, env.rank, env.world_size)
            f = extract_features(model, loader, env.device, args.precision)
            x = fewshot.probe_features(f, args.probe_feature, model.head_type != "dual")
            y = f["label"].numpy()
            n = len(train)
            accuracy = fewshot.linear_probe(x[:n], y[:n], x[n:], y[n:], args.probe_steps,
                                            args.probe_l2)
            accuracies.append(accuracy)
        results[f"folds {way}-way {shot}-shot"] = fewshot.summary(accuracies)
    return results


# ---- reports -------------------------------------------------------------------------------------


def pct(v):
    return f"{100 * v:.2f}"


def format_markdown(r):
    """One checkpoint's results -> Markdown tables (also what the terminal shows)."""
    lines = [f"# Evaluation of {r['checkpoint']}", "",
             f"variant: {r['variant']}, heads: {r['head_type']}, alpha: {r['alpha']}, points: "
             f"{r['num_points']} ({r['point_order']}), precision: {r['precision']}, "
             f"data: {r['data']}", ""]
    if r.get("zero_shot"):
        lines += ["## Zero-shot classification (%)", "",
                  "| benchmark | shapes | classes | chance top-1 | branch | top-1 | top-3 | top-5 "
                  "| mean class acc |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, z in r["zero_shot"].items():
            for branch, m in z["branches"].items():
                cells = [name, z["num_samples"], z["num_classes"], pct(1 / z["num_classes"]),
                         branch, pct(m["top1"]), pct(m["top3"]), pct(m["top5"]),
                         pct(m["mean_class_acc"])]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    fs = r.get("few_shot")
    if fs:
        lines += [f"## Few-shot linear probing (%), feature: {fs['feature']}; episodes and "
                  f"openshape on the {fs['benchmark']} shapes", "",
                  "| protocol and setting | accuracy (mean +- std) | trials |", "|---|---|---|"]
        for key, s in fs["settings"].items():
            if "skipped" in s:
                lines.append(f"| {key} | skipped: {s['skipped']} | 0 |")
            else:
                lines.append(f"| {key} | {pct(s['mean'])} +- {pct(s['std'])} | {s['trials']} |")
    return "\n".join(lines) + "\n"


def format_comparison(runs):
    """Several checkpoints' results -> one table, a row per checkpoint: the zero-shot top-1 (fused,
    or the single branch) of each benchmark, then each few-shot setting."""
    benchmarks = list(dict.fromkeys(name for r in runs for name in r.get("zero_shot", {})))
    settings = []
    for r in runs:
        settings += [k for k in (r.get("few_shot") or {}).get("settings", {}) if k not in settings]
    header = [f"{b} top-1" for b in benchmarks] + settings
    lines = ["| checkpoint | variant | " + " | ".join(header) + " |",
             "|---" * (2 + len(header)) + "|"]
    for r in runs:
        cells = []
        for b in benchmarks:
            branches = r.get("zero_shot", {}).get(b, {}).get("branches", {})
            main = branches.get("fused") or branches.get("single")
            cells.append(pct(main["top1"]) if main else "")
        for k in settings:
            s = (r.get("few_shot") or {}).get("settings", {}).get(k, {})
            cells.append(f"{pct(s['mean'])} +- {pct(s['std'])}" if "mean" in s else "")
        lines.append(f"| {r['checkpoint']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_stems(names):
    """One report name per checkpoint that no other shares: the file name for one checkpoint; for
    several, the parts of their paths that tell them apart (runs/ablation/tamm/stage2/latest.pt ->
    tamm-stage2-latest)."""
    if len(names) == 1:
        return [os.path.splitext(os.path.basename(names[0]))[0]]
    parts = [os.path.splitext(os.path.abspath(n))[0].split(os.sep) for n in names]
    common = len(os.path.commonprefix(parts))
    return ["-".join(p[common:]) or p[-1] for p in parts]


def write_results(results, out_dir, stem, markdown):
    """eval_<stem>.json and eval_<stem>.md in out_dir, written atomically -> their paths."""
    json_path = os.path.join(out_dir, f"eval_{stem}.json")
    md_path = os.path.join(out_dir, f"eval_{stem}.md")
    save_json(json_path, results)
    atomic_save(markdown, md_path, save=lambda text, f: f.write(text.encode()))
    return json_path, md_path


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the modes -----------------------------------------------------------------------------------


def run_benchmarks(args, model, ckpt, env, num_points):
    """Zero-shot on every benchmark found, then the few-shot protocols."""
    root = args.data or str(synthetic.shared_world(env.local_rank, env.distributed))
    sets = data.load_benchmarks(root, num_points, args.benchmarks, clip_dim=model.clip_dim,
                                order=args.point_order)
    if not sets:
        raise BadInput(f"{root}: none of the benchmarks {', '.join(args.benchmarks)} found "
                       f"(see docs/data-format.md)")
    single = model.head_type == "openshape"
    probe_on = args.probe_on if args.probe_on in sets else next(iter(sets))
    results = {"variant": variant(ckpt), "head_type": model.head_type, "alpha": args.alpha,
               "num_points": num_points, "point_order": args.point_order, "data": root,
               "world_size": env.world_size, "precision": args.precision, "zero_shot": {}}
    for name, benchmark in sets.items():
        if "zero-shot" in args.tasks or name == probe_on:
            loader = data.make_eval_loader(benchmark, args.batch_size, env.rank, env.world_size,
                                           args.workers)
            feats = extract_features(model, loader, env.device, args.precision,
                                     progress=env.is_main)
        if "zero-shot" in args.tasks:
            branches = zero_shot(feats, benchmark.class_feat, args.alpha, single)
            results["zero_shot"][name] = {"num_samples": len(feats["label"]),
                                          "num_classes": len(benchmark.class_names),
                                          "classes": benchmark.class_names, "branches": branches}
        if name == probe_on:
            probe = feats
    if "few-shot" in args.tasks:
        settings = few_shot_folds(model, args.folds, args, env) if args.folds else {}
        if env.is_main:  # the gathered features are the same on every rank: probe once
            x = fewshot.probe_features(probe, args.probe_feature, single)
            settings |= fewshot.few_shot(x, probe["label"].numpy(), args.episodes, args.n_query,
                                         args.trials, args.openshape_shots, args.seed,
                                         args.probe_steps, args.probe_l2)
        results["few_shot"] = {"benchmark": probe_on, "feature": args.probe_feature,
                               "settings": settings}
    return results


def teacher_of(ckpt):
    """The teacher a checkpoint was trained against: {"name": "clip"} or {"name": "synthetic",
    "seed": s}. Our checkpoints that predate the field and trained on the default world (no --data)
    were synthetic."""
    if ckpt.get("teacher"):
        return ckpt["teacher"]
    if "config" in ckpt and (ckpt.get("args") or {}).get("data") is None:
        return {"name": "synthetic", "seed": 0}
    return {"name": "clip"}


def check_labels(args, ckpt):
    """--labels are encoded by the teacher the checkpoint was trained against, or refused where the
    scores could never mean anything. Decided here, at parse time; label_features encodes."""
    args.teacher = teacher_of(ckpt)
    if args.teacher["name"] == "synthetic":
        if args.clip_model or args.clip_pretrained:
            raise BadInput(f"{args.ckpt} was trained against the synthetic world's simulated "
                           f"teacher: real CLIP features of your labels mean nothing to it; leave "
                           f"out --clip-model and --clip-pretrained (the labels are then encoded "
                           f"by that simulated teacher)")
        known = synthetic.category_words()
        unknown = [name for name in args.labels if not set(name.lower().split()) & known]
        if unknown:
            print(f"note: {', '.join(unknown)}: no word that the synthetic world's teacher ties to "
                  f"a category ({', '.join(synthetic.CATEGORIES)} and their synonyms); their "
                  f"scores mean nothing", file=sys.stderr)
        return
    args.clip_model = args.clip_model or CLIP_MODEL
    args.clip_pretrained = args.clip_pretrained or CLIP_PRETRAINED
    if args.clip_pretrained.lower() == "none":
        raise BadInput("--clip-pretrained none: random CLIP weights give random class features, so "
                       "the scores would mean nothing; give an open_clip tag or a weights file")
    from tools import clip_features  # open_clip is needed here only

    flags = ("--clip-model", "--clip-pretrained")
    clip_features.check_clip(args.clip_model, args.clip_pretrained, flags)


def label_features(args, clip_dim, device):
    """(C, clip_dim) features of --labels by the teacher that check_labels chose."""
    if args.teacher["name"] == "synthetic":
        teacher = synthetic.Teacher(args.teacher["seed"])
        print(f"labels encoded by the synthetic world's simulated CLIP teacher (seed "
              f"{teacher.seed}), the teacher this checkpoint was trained against")
        return torch.as_tensor(np.concatenate([teacher.class_feat(name) for name in args.labels]))
    from tools import clip_features

    flags = ("--clip-model", "--clip-pretrained")
    clip, tokenizer, _ = clip_features.load_clip(args.clip_model, args.clip_pretrained,
                                                 str(device), flags)
    feats = clip_features.encode_class_names(args.labels, clip, tokenizer, device=str(device))
    feats = torch.as_tensor(feats)
    if feats.shape[1] != clip_dim:
        raise BadInput(f"--clip-model {args.clip_model}: gives {feats.shape[1]}-d text features, "
                       f"the checkpoint's heads output {clip_dim}-d (the teacher is {CLIP_MODEL})")
    return feats


@torch.no_grad()
def run_point_clouds(args, model, env, num_points):
    """--pc: encode the files in order; classify against --labels and/or write --dump-features."""
    clouds = [pointclouds.prepare_points(xyz, rgb, num_points, args.up) for xyz, rgb in args.clouds]
    points = torch.stack(clouds)
    cast = torch.autocast(env.device.type, dtype=AUTOCAST_DTYPES[args.precision],
                          enabled=args.precision != "fp32")
    outs = []
    for i in range(0, len(points), args.batch_size):
        with cast:
            outs.append(model(points[i : i + args.batch_size].to(env.device)))
    feats = {k: torch.cat([o[k] for o in outs]).float().cpu()
             for k in ("backbone", "text", "image")}
    predictions = {}
    if args.labels:
        class_feat = label_features(args, model.clip_dim, env.device)
        text, _, fused = zero_shot_scores(feats["text"], feats["image"], class_feat, args.alpha)
        scores = text if model.head_type == "openshape" else fused
        top = scores.topk(min(TOP_LABELS, len(args.labels)), dim=1)
        for path, values, indices in zip(args.pc_files, top.values, top.indices):
            predictions[path] = [(args.labels[int(i)], float(v)) for v, i in zip(values, indices)]
            if env.is_main:
                ranked = " | ".join(f"{name} {v:.3f}" for name, v in predictions[path])
                print(f"{path}: {ranked}")
    if args.dump_features and env.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(args.dump_features)), exist_ok=True)
        with open(args.dump_features, "wb") as f:  # a handle keeps the name (np.savez adds .npz)
            arrays = {k: v.numpy() for k, v in feats.items()}
            np.savez(f, **arrays, files=np.array(args.pc_files))
        print(f"wrote features of {len(args.pc_files)} clouds to {args.dump_features}")
    return {"predictions": predictions, "features": feats}


# ---- the command line ----------------------------------------------------------------------------


def build_parser():
    """The command line, every flag with its type, default and help."""
    p = cli.Parser(__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="checkpoint file or released name "
                       f"({', '.join(NAMED_CHECKPOINTS)})")
    which.add_argument("--compare", nargs="+",
                       help="several checkpoints, evaluated alike, in one table")
    p.add_argument("--scaling", type=cli.scaling, default=4,
                   help="encoder size of released checkpoints (every one released is 4): 1-6, tiny")
    p.add_argument("--data", type=cli.existing_dir,
                   help="data root with the benchmarks (default: the synthetic world)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS),
                   choices=[*BENCHMARKS, "val"],
                   help="zero-shot benchmarks, run where their files are found")
    p.add_argument("--tasks", nargs="+", choices=["zero-shot", "few-shot"],
                   default=["zero-shot", "few-shot"], help="what to evaluate")
    p.add_argument("--alpha", type=cli.NONNEGATIVE, default=FUSION_ALPHA,
                   help="image-branch weight in the fused score (the paper's 0.5)")
    p.add_argument("--num-points", type=cli.POSITIVE_INT,
                   help="first N points per shape (fewer: resampled); default: the checkpoint's "
                   f"training value, {NUM_POINTS} for released ones; ScanObjectNN: all 2,048")
    p.add_argument("--point-order", choices=["first", "permuted"], default="first",
                   help="the first N points (TAMM) or a seeded permutation first (OpenShape)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CPUs with native bf16 (AVX-512 BF16 or AMX), fp32 "
                   "elsewhere and on CUDA")
    p.add_argument("--batch-size", type=cli.POSITIVE_INT, default=BATCH_SIZE,
                   help="shapes per batch and rank")
    p.add_argument("--workers", type=cli.COUNT, default=min(4, os.cpu_count() or 1),
                   help="data-loader processes per rank")
    p.add_argument("--device", type=cli.device,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", type=cli.output_dir,
                   help="folder for eval_*.json/.md (default: beside the checkpoint; runs/eval for "
                   "released names and --compare)")
    g = p.add_argument_group("few-shot linear probing")
    g.add_argument("--fewshot-folds", type=cli.existing_dir,
                   help="Point-BERT's ModelNetFewshot folder (the `folds` protocol)")
    g.add_argument("--probe-on", default="modelnet40", choices=[*BENCHMARKS, "val"],
                   help="benchmark whose shapes the episodes and openshape protocols use")
    g.add_argument("--probe-feature", choices=["backbone", "text", "image", "both"],
                   default="backbone", help="the frozen feature the probe sees (backbone: the "
                   "encoder output, as the release)")
    g.add_argument("--episodes", nargs="*", default=list(fewshot.EPISODES),
                   help="N-way x K-shot on-the-fly episodes, e.g. 5x10")
    g.add_argument("--n-query", type=cli.POSITIVE_INT, default=fewshot.N_QUERY,
                   help="query shapes per class per episode")
    g.add_argument("--trials", type=cli.POSITIVE_INT, default=fewshot.TRIALS,
                   help="episodes / OpenShape repeats per setting")
    g.add_argument("--openshape-shots", type=cli.POSITIVE_INT, nargs="*",
                   default=list(fewshot.OPENSHAPE_SHOTS),
                   help="shapes per class, OpenShape's protocol")
    g.add_argument("--probe-steps", type=cli.POSITIVE_INT, default=fewshot.PROBE_STEPS,
                   help="LBFGS iterations")
    g.add_argument("--probe-l2", type=cli.NONNEGATIVE, default=fewshot.PROBE_L2,
                   help="L2 weight of the probe")
    g.add_argument("--seed", type=cli.COUNT, default=0, help="trial t uses seed + t")
    g = p.add_argument_group("your own point clouds")
    g.add_argument("--pc", nargs="+", help="point-cloud files or folders of them "
                   f"({', '.join(pointclouds.EXTENSIONS)}); replaces the benchmarks")
    g.add_argument("--up", choices=["y", "z"], default="y",
                   help="up axis of the files (the release is y-up)")
    g.add_argument("--labels", help="comma-separated labels, or a file with one label per line")
    g.add_argument("--clip-model", help=f"open_clip model for --labels (default: {CLIP_MODEL}, the "
                   "teacher; checkpoints of the synthetic world use its simulated teacher instead)")
    g.add_argument("--clip-pretrained",
                   help=f"open_clip tag or weights file (default: {CLIP_PRETRAINED})")
    g.add_argument("--dump-features", type=cli.output_file,
                   help="OUT.npz with the backbone, text and image features and the file names")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    # Everything a user gives is checked here, before a shape is encoded: flags, files, checkpoints.
    for setting in args.episodes:  # N >= 2: a 1-way episode has nothing to tell apart
        parts = setting.split("x")
        if not (len(parts) == 2 and all(v.isdigit() for v in parts) and int(parts[0]) > 1
                and int(parts[1]) > 0):
            raise BadInput(f"--episodes {setting}: expected N-way x K-shot such as 5x10 "
                           f"(N >= 2, K >= 1)")
    launch_env()  # torchrun's variables, if any, make sense
    check_point_cloud_flags(args)
    names, flag = (args.compare, "--compare") if args.compare else ([args.ckpt], "--ckpt")
    for name in names:
        if not (os.path.isfile(name) or (name in NAMED_CHECKPOINTS and not os.path.exists(name))):
            what = "a folder" if os.path.isdir(name) else "no such file"
            raise BadInput(f"{flag} {name}: {what}, and not one of the released names "
                           f"({', '.join(NAMED_CHECKPOINTS)})")
    if len({os.path.realpath(n) for n in names}) < len(names):
        raise BadInput(f"{flag}: a checkpoint is given twice")
    named = all(n in NAMED_CHECKPOINTS and not os.path.exists(n) for n in names)
    cli.check_points(args.num_points, args.scaling if named else None)
    if args.data and not args.pc:
        if not any(data.has_benchmark(args.data, b) for b in args.benchmarks):
            raise BadInput(f"--data {args.data}: none of the benchmarks "
                           f"{', '.join(args.benchmarks)} found (see docs/data-format.md)")
    args.folds = None
    if args.fewshot_folds and "few-shot" in args.tasks:
        args.folds = pointclouds.fewshot_settings(args.fewshot_folds)
    # each fold is read once here too (seconds): a damaged one met after the zero-shot run wastes it
    for (way, shot), paths in (args.folds or {}).items():
        for path in paths:
            pointclouds.read_fewshot_fold(path, way, shot)
    if not args.pc:
        beside = os.path.dirname(os.path.abspath(names[0]))
        args.out = args.out or (os.path.join("runs", "eval") if named or args.compare else beside)
        cli.check_output(args.out)
    args.precision = resolve_precision(args.precision, device_type(args.device),
                                       auto_on_cuda="fp32")
    # the checkpoints last (a released name is downloaded): each read, checked and kept for main
    args.checkpoints = []
    for name, stem in zip(names, report_stems(names)):
        path = resolve_checkpoint(name)
        ckpt = load_checkpoint(path)
        num_points = args.num_points or (ckpt.get("args") or {}).get("num_points") or NUM_POINTS
        patches = encoder_config(ckpt, args.scaling)["num_patches"]
        if num_points < patches:
            raise BadInput(f"--num-points {num_points}: fewer than the {patches} patches of {name}")
        args.checkpoints.append((name, path, stem, ckpt, num_points))
    if args.pc:
        name, _, _, ckpt, _ = args.checkpoints[0]
        patches = encoder_config(ckpt, args.scaling)["num_patches"]
        for path, (xyz, _) in zip(args.pc_files, args.clouds):
            if len(xyz) < patches:
                raise BadInput(f"{path}: {len(xyz)} points, fewer than the {patches} patch centres "
                               f"that the encoder of {name} picks; give at least {patches} points")
        if args.labels:
            check_labels(args, ckpt)
    return args


def encoder_config(ckpt, scaling):
    """The encoder size of a checkpoint: in its config (ours), else --scaling (released files)."""
    if "config" in ckpt:
        return ckpt["config"]["encoder"]
    return vars(CONFIGS[scaling])


def check_point_cloud_flags(args):
    """--pc, --labels and --dump-features: the combinations, every file read, the labels."""
    if args.pc and args.compare:
        raise BadInput("--pc takes one --ckpt, not --compare")
    if args.pc and not (args.labels is not None or args.dump_features):
        raise BadInput("--pc needs --labels (zero-shot) and/or --dump-features OUT.npz")
    if not args.pc and (args.labels is not None or args.dump_features):
        flag = "--labels" if args.labels is not None else "--dump-features"
        raise BadInput(f"{flag} needs --pc FILE ... (the point clouds to classify or encode)")
    if not args.pc and (args.clip_model or args.clip_pretrained):
        raise BadInput("--clip-model and --clip-pretrained encode the --labels of --pc clouds")
    args.pc_files = pointclouds.expand_paths(args.pc or [])
    args.clouds = [pointclouds.read_point_cloud(path) for path in args.pc_files]
    args.labels = cli.parse_names(args.labels, "--labels") if args.labels is not None else None


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    t0 = time.time()
    runs = []
    try:
        for name, path, stem, ckpt, num_points in args.checkpoints:
            model = load_pretrained(ckpt, scaling=args.scaling, where=path).to(env.device)
            if args.pc:
                return run_point_clouds(args, model, env, num_points)
            results = {"checkpoint": name, "checkpoint_file": os.path.abspath(path),
                       "checkpoint_sha256": sha256(path), "checkpoint_step": ckpt.get("step"),
                       **run_benchmarks(args, model, ckpt, env, num_points),
                       "wall_s": round(time.time() - t0, 1), "provenance": provenance()}
            runs.append(results)
            if env.is_main:
                markdown = format_markdown(results)
                print(markdown)
                json_path, md_path = write_results(results, args.out, stem, markdown)
                print(f"wrote {json_path} and {md_path} ({results['wall_s']} s)")
        if args.compare and env.is_main:
            table = format_comparison(runs)
            print(table)
            json_path, _ = write_results(runs, args.out, "compare", table)
            print(f"wrote {json_path}")
        return runs if args.compare else runs[0]
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    cli.run_cli(main)
