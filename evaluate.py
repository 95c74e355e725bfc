"""Evaluate a TAMM (or OpenShape) point encoder: zero-shot benchmarks, few-shot linear probes, your own clouds.

Paper: TAMM (CVPR 2024), section 4. A checkpoint is judged three ways:
  - Zero-shot classification: class names -> prompt-ensembled CLIP text features T_c; a shape scores
    cos(TAA(f), T_c) + alpha * cos(IAA(f), T_c) (alpha = 0.5). Top-1/3/5 and mean per-class accuracy of the text
    branch, the image branch and the fusion; OpenShape's single head is one branch. Points as TAMM's evaluation
    takes them: the first N, y/z swapped, centred, unit sphere (`--point-order permuted`: OpenShape's loaders).
  - Few-shot linear probing on frozen features (the 512-d encoder output by default, as the release), three
    named protocols: `folds`, Point-BERT's released ModelNet40 folds (--fewshot-folds DIR; the paper's 96.1 -> 99.0,
    10 folds, mean +- std); `episodes`, the same N-way K-shot episodes drawn on the fly from a benchmark's shapes;
    `openshape`, OpenShape's K shapes per class for training and the rest for testing. The classifier is a
    converged logistic regression (LBFGS) that never looks at the test shapes; the release reports the best test
    epoch of its linear layer instead.
  - Your own point clouds (.npy/.npz/.ply/.xyz/.txt): zero-shot against your labels through open_clip, and/or
    the encoder and adapter features written to an .npz.
`--compare A.pt B.pt ...` evaluates several checkpoints with the same settings and prints one table.

Checkpoints: ours, the released TAMM files (no config inside: --scaling, default 4), OpenShape's PointBERT, or a
released name (tools/download.py, fetched once). Under torchrun each rank encodes every world_size-th shape and
the features are gathered in memory, so every shape counts once. Results: eval_<checkpoint>.json/.md.

    python evaluate.py --ckpt runs/demo/stage2/latest.pt                     # synthetic world, CPU is fine
    python evaluate.py --ckpt tamm-ensemble --data /data/openshape --fewshot-folds /data/ModelNetFewshot
    torchrun --nproc_per_node=4 evaluate.py --ckpt tamm-ensemble --data /data/openshape
    python evaluate.py --ckpt ckpt.pt --pc chair.ply mug.npy --up y --labels "chair,mug,lamp"
"""
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import training as T
from adapters import zero_shot_scores
from checkpoint import load_checkpoint_file, load_pretrained, make_eval_loader, variant
from tools import pointclouds
from tools.download import NAMED_CHECKPOINTS, resolve_checkpoint

# ---- defaults ----------------------------------------------------------------------------------------------
NUM_POINTS = 10000                 # TAMM evaluates the first 10,000 points (configs/Pre-Training/pointbert.yaml)
ALPHA = 0.5                        # weight of the image branch in the fused zero-shot score (paper, release)
BATCH_SIZE = 8                     # evaluation batch per rank (on CPU 32 is 12% slower: activations leave the cache)
BENCHMARKS = ("modelnet40", "lvis", "scanobjectnn")  # the paper's zero-shot tables (add "val" for ours)
EPISODES = ("5x10", "10x20")       # N-way x K-shot on-the-fly episodes (Point-BERT's settings)
N_QUERY, TRIALS = 20, 10           # query shapes per class and episode; episodes / repeats per setting (Point-BERT)
OPENSHAPE_SHOTS = (1, 2, 4, 8, 16)  # shapes per class in OpenShape's few-shot figure
PROBE_STEPS, PROBE_L2 = 100, 1e-3  # LBFGS iterations of the probe; L2 that keeps separable problems well posed


# ---- features, gathered across ranks -----------------------------------------------------------------------

@torch.no_grad()
def encode_shard(model, loader, device="cpu", precision="fp32", progress=False):
    """This rank's share of an eval loader -> {"backbone", "text", "image", "label", "index"} CPU tensors."""
    cast, _ = T.precision_context(torch.device(device), precision)
    parts = {k: [] for k in ("backbone", "text", "image", "label", "index")}
    for points, labels, index in tqdm(loader, desc="encode", disable=None if progress else True, leave=False):
        with cast:
            out = model(points.to(device, non_blocking=True))                          # 3 x (B, dim or 1280)
        for k in ("backbone", "text", "image"):
            parts[k].append(out[k].float().cpu())
        parts["label"].append(torch.as_tensor(labels).long())
        parts["index"].append(torch.as_tensor(index).long())
    # a rank can get no sample at all (fewer shapes than ranks): keep the widths
    empty = {"backbone": (0, model.cfg.dim), "text": (0, model.clip_dim), "image": (0, model.clip_dim)}
    return {k: torch.cat(v) if v else torch.zeros(empty.get(k, (0,)), dtype=torch.float if k in empty else torch.long)
            for k, v in parts.items()}


def merge_shards(shards, total=None):
    """Per-rank feature dicts -> one dict in dataset order. Fails loudly if a sample is missing or counted twice,
    which is the whole point of gathering the indices along with the features."""
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = torch.argsort(merged["index"])
    merged = {k: v[order] for k, v in merged.items()}
    if len(order) and (merged["index"][1:] == merged["index"][:-1]).any():
        raise RuntimeError("a sample was gathered from more than one rank")
    if total is not None and not torch.equal(merged["index"], torch.arange(total)):
        raise RuntimeError(f"gathered {len(order)} samples, the dataset has {total}")
    return merged


def extract_features(model, loader, device="cpu", precision="fp32", progress=False):
    """Encode this rank's share of an eval loader (make_eval_loader) and gather: every rank returns the
    features of the whole dataset, each sample once, in dataset order."""
    shards = [encode_shard(model, loader, device, precision, progress)]
    if dist.is_available() and dist.is_initialized():  # a few MB of features per rank, pickled through the group
        local, shards = shards[0], [None] * dist.get_world_size()
        dist.all_gather_object(shards, local)
    return merge_shards(shards, total=len(loader.dataset))


# ---- zero-shot ---------------------------------------------------------------------------------------------

def topk_metrics(scores, labels, ks=(1, 3, 5)):
    """(M, C) scores, (M,) labels -> {"top1", "top3", "top5", "mean_class_acc"} as fractions. Top-k: the label is
    among the k highest scores (k capped at C); mean class accuracy: top-1 averaged over the classes present."""
    scores, labels = torch.as_tensor(scores).float(), torch.as_tensor(labels).long()
    hit = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices == labels[:, None]   # (M, k)
    out = {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}
    out["mean_class_acc"] = torch.stack([hit[labels == c, 0].float().mean() for c in labels.unique()]).mean().item()
    return out


def zero_shot(feats, class_feat, alpha=ALPHA, single_branch=False):
    """{branch: topk_metrics} for text, image and fused (text + alpha * image); one "single" branch for OpenShape."""
    text, image, fused = zero_shot_scores(feats["text"], feats["image"], class_feat, alpha)
    if single_branch:
        return {"single": topk_metrics(text, feats["label"])}
    return {name: topk_metrics(s, feats["label"]) for name, s in (("text", text), ("image", image), ("fused", fused))}


# ---- few-shot linear probing -------------------------------------------------------------------------------

def probe_features(feats, choice, single_branch=False):
    """(M, F) L2-normalised features to probe (one L2 strength suits all); "both" = text and image concatenated
    (one copy for a single-branch model, whose two outputs are equal)."""
    if choice == "backbone":
        return F.normalize(feats["backbone"].double(), dim=1)
    if choice in ("text", "image") or single_branch:
        return F.normalize(feats["text" if single_branch else choice].double(), dim=1)
    return torch.cat([F.normalize(feats[k].double(), dim=1) for k in ("text", "image")], 1)


def class_pool(labels, need):
    """Classes with at least `need` shapes (the others are left out of the protocol)."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return classes[counts >= need]


def sample_episode(labels, n_way, k_shot, n_query, seed):
    """One N-way K-shot episode: (support, query) index arrays, n_way * k_shot and n_way * n_query long, grouped
    by class, disjoint, among the classes with >= k_shot + n_query shapes."""
    labels, rng = np.asarray(labels), np.random.default_rng(seed)
    pool = class_pool(labels, k_shot + n_query)
    if len(pool) < n_way:
        raise ValueError(f"{n_way}-way {k_shot}-shot needs {n_way} classes with >= {k_shot + n_query} shapes, found {len(pool)}")
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k_shot + n_query] for c in rng.choice(pool, n_way, replace=False)]
    return np.concatenate([p[:k_shot] for p in picked]), np.concatenate([p[k_shot:] for p in picked])


def openshape_split(labels, k_shot, seed):
    """OpenShape's split: k_shot random shapes of every class with more than k_shot for training, the rest testing."""
    labels, rng = np.asarray(labels), np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c)) for c in class_pool(labels, k_shot + 1)]
    if not picked:
        raise ValueError(f"{k_shot}-shot: no class has more than {k_shot} shapes")
    return np.concatenate([p[:k_shot] for p in picked]), np.concatenate([p[k_shot:] for p in picked])


def linear_probe(train_x, train_y, test_x, test_y, steps=PROBE_STEPS, l2=PROBE_L2):
    """Multinomial logistic regression on frozen features (LBFGS, L2 on the weights) fitted on the training shapes
    only -> test accuracy. Labels may be any class ids (remapped to 0..C-1)."""
    train_x, test_x = torch.as_tensor(train_x).double(), torch.as_tensor(test_x).double()
    classes, y = torch.unique(torch.as_tensor(train_y), return_inverse=True)
    weight = torch.zeros(train_x.shape[1], len(classes), dtype=torch.double, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (classes[(test_x @ weight + bias).argmax(1)] == torch.as_tensor(test_y)).double().mean().item()


def summary(accs, **extra):
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "trials": len(accs), **extra}  # std: ddof 0


def few_shot(x, labels, episodes=EPISODES, n_query=N_QUERY, trials=TRIALS, shots=OPENSHAPE_SHOTS, seed=0,
             steps=PROBE_STEPS, l2=PROBE_L2):
    """The `episodes` and `openshape` protocols on features x (M, F) of one benchmark -> {setting: summary or
    {"skipped": why}}. Trial t uses seed + t."""
    labels, results = np.asarray(labels), {}
    for setting in episodes:
        n_way, k_shot = (int(v) for v in setting.split("x"))
        key, pool = f"episodes {n_way}-way {k_shot}-shot", class_pool(labels, k_shot + n_query)
        if len(pool) < n_way:
            results[key] = {"skipped": f"needs {n_way} classes with >= {k_shot} + {n_query} shapes, {len(pool)} have that many"}
            continue
        splits = [sample_episode(labels, n_way, k_shot, n_query, seed + t) for t in range(trials)]
        results[key] = summary([linear_probe(x[s], labels[s], x[q], labels[q], steps, l2) for s, q in splits],
                               classes_in_pool=len(pool))
    for k_shot in shots:
        key, pool = f"openshape {k_shot}-shot", class_pool(labels, k_shot + 1)
        if len(pool) < 2:
            results[key] = {"skipped": f"fewer than 2 classes have more than {k_shot} shapes"}
            continue
        splits = [openshape_split(labels, k_shot, seed + t) for t in range(trials)]
        results[key] = summary([linear_probe(x[a], labels[a], x[b], labels[b], steps, l2) for a, b in splits],
                               classes_in_pool=len(pool))
    return results


def few_shot_folds(model, settings, args, env):
    """The `folds` protocol: every fold of every (way, shot) -> encoder features -> probe -> mean +- std over folds."""
    results = {}
    for (way, shot), paths in settings.items():
        accs = []
        for k, path in enumerate(paths):
            train, train_y, test, test_y = pointclouds.read_fewshot_fold(path, way, shot, seed=args.seed + k)
            fold = list(zip(torch.cat([train, test]), torch.cat([train_y, test_y]).tolist()))
            f = extract_features(model, make_eval_loader(fold, args.batch_size, env.rank, env.world_size),
                                 env.device, args.precision)
            x, y = probe_features(f, args.probe_feature, model.heads != "dual"), f["label"].numpy()
            accs.append(linear_probe(x[:len(train)], y[:len(train)], x[len(train):], y[len(train):],
                                     args.probe_steps, args.probe_l2))
        results[f"folds {way}-way {shot}-shot"] = summary(accs)
    return results


# ---- report ------------------------------------------------------------------------------------------------

def format_markdown(r):
    """One checkpoint's results -> Markdown tables (also what the terminal shows)."""
    pct = lambda v: f"{100 * v:.2f}"
    lines = [f"# Evaluation of {r['checkpoint']}", "", f"variant: {r['variant']}, heads: {r['heads']}, alpha: "
             f"{r['alpha']}, points: {r['num_points']} ({r['point_order']}), precision: {r['precision']}, data: {r['data']}", ""]
    if r.get("zero_shot"):
        lines += ["## Zero-shot classification (%)", "", "| benchmark | shapes | classes | chance top-1 | branch | top-1 | "
                  "top-3 | top-5 | mean class acc |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {z['num_samples']} | {z['num_classes']} | {pct(1 / z['num_classes'])} | {branch} | "
                  f"{pct(m['top1'])} | {pct(m['top3'])} | {pct(m['top5'])} | {pct(m['mean_class_acc'])} |"
                  for name, z in r["zero_shot"].items() for branch, m in z["branches"].items()] + [""]
    if fs := r.get("few_shot"):
        lines += [f"## Few-shot linear probing (%), feature: {fs['feature']}; episodes and openshape on the "
                  f"{fs['benchmark']} shapes", "", "| protocol and setting | accuracy (mean +- std) | trials |", "|---|---|---|"]
        lines += [f"| {key} | " + (f"skipped: {s['skipped']} | 0 |" if "skipped" in s else
                                   f"{pct(s['mean'])} +- {pct(s['std'])} | {s['trials']} |") for key, s in fs["settings"].items()]
    return "\n".join(lines) + "\n"


def format_comparison(runs):
    """Several checkpoints' results -> one table, a row per checkpoint: zero-shot top-1 (fused or single
    branch) per benchmark, then each few-shot setting."""
    zs = list(dict.fromkeys(name for r in runs for name in r.get("zero_shot", {})))
    fs = list(dict.fromkeys(k for r in runs for k in (r.get("few_shot") or {}).get("settings", {})))
    lines = ["| checkpoint | variant | " + " | ".join([f"{z} top-1" for z in zs] + fs) + " |", "|---" * (2 + len(zs) + len(fs)) + "|"]
    for r in runs:
        branches = [r.get("zero_shot", {}).get(z, {}).get("branches", {}) for z in zs]  # fused, or OpenShape's single
        cells = [f"{100 * (b.get('fused') or b['single'])['top1']:.2f}" if b else "" for b in branches]
        for k in fs:
            s = (r.get("few_shot") or {}).get("settings", {}).get(k, {})
            cells.append(f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f}" if "mean" in s else "")
        lines.append(f"| {r['checkpoint']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results, out_dir, stem, markdown):
    """eval_<stem>.json and eval_<stem>.md in out_dir -> their paths."""
    paths = [os.path.join(out_dir, f"eval_{stem}.{ext}") for ext in ("json", "md")]
    for path, text in zip(paths, (json.dumps(results, indent=1), markdown)):
        with open(path, "w") as f:
            f.write(text)
    return paths


# ---- the modes ---------------------------------------------------------------------------------------------

def run_benchmarks(args, ckpt_name, model, ckpt, env, num_points):
    """Zero-shot on every benchmark found, then the few-shot protocols."""
    root = T.data_root(args.data, env)
    sets = data.load_benchmarks(root, num_points, args.benchmarks, clip_dim=model.clip_dim, order=args.point_order)
    if not sets:
        raise T.BadInput(f"{root}: none of the benchmarks {', '.join(args.benchmarks)} found (see docs/data-format.md)")
    single, probe_on = model.heads == "openshape", args.probe_on if args.probe_on in sets else next(iter(sets))
    results = {"checkpoint": ckpt_name, "variant": variant(ckpt), "heads": model.heads, "alpha": args.alpha,
               "num_points": num_points, "point_order": args.point_order, "data": root, "world_size": env.world_size,
               "precision": T.precision_context(env.device, args.precision)[1], "zero_shot": {}}
    for name, ds in sets.items():
        if "zero-shot" in args.tasks or name == probe_on:
            feats = extract_features(model, make_eval_loader(ds, args.batch_size, env.rank, env.world_size, args.workers),
                                     env.device, args.precision, progress=env.is_main)
        if "zero-shot" in args.tasks:
            results["zero_shot"][name] = {"num_samples": len(feats["label"]), "num_classes": len(ds.class_names),
                                          "branches": zero_shot(feats, ds.class_feat, args.alpha, single)}
        if name == probe_on:
            probe = feats
    if "few-shot" in args.tasks:
        settings = few_shot_folds(model, args.folds, args, env) if args.folds else {}
        if env.is_main:  # the gathered features are the same on every rank: probe once
            settings |= few_shot(probe_features(probe, args.probe_feature, single), probe["label"].numpy(), args.episodes,
                                 args.n_query, args.trials, args.openshape_shots, args.seed, args.probe_steps, args.probe_l2)
        results["few_shot"] = {"benchmark": probe_on, "feature": args.probe_feature, "settings": settings}
    return results


def parse_args(argv):
    p = T.Parser(__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help=f"checkpoint file or released name ({', '.join(NAMED_CHECKPOINTS)})")
    which.add_argument("--compare", nargs="+", help="several checkpoints, evaluated alike, in one table")
    p.add_argument("--scaling", type=T.scaling, default=4, help="encoder size of released checkpoints: 1-6 or tiny")
    p.add_argument("--data", type=T.existing_dir, help="data root with the benchmarks (default: the synthetic world)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=[*BENCHMARKS, "val"])
    p.add_argument("--tasks", nargs="+", choices=["zero-shot", "few-shot"], default=["zero-shot", "few-shot"])
    p.add_argument("--alpha", type=T.NONNEGATIVE, default=ALPHA, help="image-branch weight in the fused score")
    p.add_argument("--num-points", type=T.POSITIVE_INT, help="first N points per shape (fewer: resampled); default: "
                   f"the checkpoint's training value, {NUM_POINTS} for released ones; ScanObjectNN: all 2,048")
    p.add_argument("--point-order", choices=["first", "permuted"], default="first",
                   help="first N points (TAMM, default) or a seeded permutation first (OpenShape's own evaluation)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="CPU inference: bf16 autocast (auto: where the CPU has native bf16), or fp32; CUDA: fp32")
    p.add_argument("--batch-size", type=T.POSITIVE_INT, default=BATCH_SIZE, help="per rank")
    p.add_argument("--workers", type=T.COUNT, default=min(4, os.cpu_count() or 1), help="data-loader processes per rank")
    p.add_argument("--device", type=T.device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", type=T.output_dir, help="folder for eval_*.json/.md (default: next to the checkpoint; runs/eval)")
    g = p.add_argument_group("few-shot linear probing")
    g.add_argument("--fewshot-folds", type=T.existing_dir, help="Point-BERT's ModelNetFewshot folder (the `folds` protocol)")
    g.add_argument("--probe-on", default="modelnet40", choices=[*BENCHMARKS, "val"],
                   help="benchmark whose shapes the episodes and openshape protocols use")
    g.add_argument("--probe-feature", choices=["backbone", "text", "image", "both"], default="backbone")
    g.add_argument("--episodes", nargs="*", default=list(EPISODES), help="N-way x K-shot on-the-fly episodes, e.g. 5x10")
    g.add_argument("--n-query", type=T.POSITIVE_INT, default=N_QUERY, help="query shapes per class per episode")
    g.add_argument("--trials", type=T.POSITIVE_INT, default=TRIALS, help="episodes / OpenShape repeats per setting")
    g.add_argument("--openshape-shots", type=T.POSITIVE_INT, nargs="*", default=list(OPENSHAPE_SHOTS))
    g.add_argument("--probe-steps", type=T.POSITIVE_INT, default=PROBE_STEPS, help="LBFGS iterations")
    g.add_argument("--probe-l2", type=T.NONNEGATIVE, default=PROBE_L2, help="L2 weight of the probe")
    g.add_argument("--seed", type=T.COUNT, default=0, help="trial t uses seed + t")
    g = p.add_argument_group("your own point clouds")
    g.add_argument("--pc", nargs="+", help=".npy/.npz/.ply/.xyz/.txt files (replaces the benchmarks)")
    g.add_argument("--up", choices=["y", "z"], default="y", help="up axis of the files (the release is y-up)")
    g.add_argument("--labels", help="comma-separated labels, or a file with one label per line")
    g.add_argument("--clip-model", default="ViT-bigG-14", help="open_clip model for --labels (the teacher)")
    g.add_argument("--clip-pretrained", default="laion2b_s39b_b160k", help="open_clip tag, weights file, or 'none'")
    g.add_argument("--dump-features", type=T.output_file, help="OUT.npz with backbone, text, image and files")
    args = p.parse_args(argv)
    # Everything cheap and user-made is checked here, before a model loads or a shape is encoded.
    for setting in args.episodes:  # N >= 2: a 1-way episode has nothing to tell apart
        if not (len(parts := setting.split("x")) == 2 and all(v.isdigit() for v in parts) and int(parts[0]) > 1
                and int(parts[1]) > 0):
            raise T.BadInput(f"--episodes {setting}: expected N-way x K-shot such as 5x10 (N >= 2, K >= 1)")
    args.ckpts, flag = (args.compare, "--compare") if args.compare else ([args.ckpt], "--ckpt")
    for c in args.ckpts:
        if not (os.path.isfile(c) or (c in NAMED_CHECKPOINTS and not os.path.exists(c))):
            raise T.BadInput(f"{flag} {c}: {'a folder' if os.path.isdir(c) else 'no such file'}, and not one of the "
                             f"released names ({', '.join(NAMED_CHECKPOINTS)})")
    named = all(c in NAMED_CHECKPOINTS and not os.path.exists(c) for c in args.ckpts)
    # a released checkpoint's size is --scaling (checked before its download); our own checkpoint knows its
    # size, checked once it is loaded: here only against the smallest size
    T.check_points(args.num_points, args.scaling if named else None)
    pointclouds.check_flags(args)  # --pc, --labels, --dump-features
    if args.data and not args.pc and not any(data.has_benchmark(args.data, b) for b in args.benchmarks):
        raise T.BadInput(f"--data {args.data}: none of the benchmarks {', '.join(args.benchmarks)} found "
                         f"(see docs/data-format.md)")
    args.folds = pointclouds.fewshot_settings(args.fewshot_folds) if args.fewshot_folds and "few-shot" in args.tasks else None
    # every fold is read once here too (seconds, one at a time): a damaged one met after the zero-shot run wastes it
    for (way, shot), paths in (args.folds or {}).items():
        for path in paths:
            pointclouds.read_fewshot_fold(path, way, shot)
    if not args.pc:
        args.out = args.out or (os.path.join("runs", "eval") if named or args.compare else os.path.dirname(os.path.abspath(args.ckpts[0])))
        T.check_writable(args.out, "--out")
    return args


def main(argv=None):
    args = parse_args(argv)
    env, t0, runs = T.setup_distributed(args.device), time.time(), []
    try:
        for name in args.ckpts:
            path = resolve_checkpoint(name)
            ckpt = load_checkpoint_file(path)
            model = load_pretrained(ckpt, scaling=args.scaling, where=path).to(env.device)
            # our checkpoints know their training point count; the release used 10,000
            num_points = args.num_points or (ckpt.get("args") or {}).get("num_points") or NUM_POINTS
            if num_points < model.cfg.num_patches:
                raise T.BadInput(f"--num-points {num_points}: fewer than the {model.cfg.num_patches} patches of {name}")
            if args.pc:
                return pointclouds.run_point_clouds(args, model, env, num_points)
            results = run_benchmarks(args, name, model, ckpt, env, num_points)
            results["wall_s"] = round(time.time() - t0, 1)
            runs.append(results)
            if env.is_main:
                markdown = format_markdown(results)
                print(markdown)
                paths = write_results(results, args.out, os.path.splitext(os.path.basename(name))[0], markdown)
                print(f"wrote {paths[0]} and {paths[1]} ({results['wall_s']} s)")
        if args.compare and env.is_main:
            table = format_comparison(runs)
            print(table)
            write_results(runs, args.out, "compare", table)
        return runs if args.compare else runs[0]
    finally:
        T.cleanup_distributed()


if __name__ == "__main__":
    T.run_cli(main)
