"""Evaluate a TAMM (or OpenShape) point encoder: zero-shot benchmarks, few-shot linear probes, your own clouds.

Paper: TAMM (CVPR 2024), the experiments. A checkpoint is judged three ways (tamm-facts.md sections 1-3, 5):
  - Zero-shot classification: class names -> prompt-ensembled CLIP text features T_c; the score of
    a shape f is cos(TAA(f), T_c) + alpha * cos(IAA(f), T_c) (alpha = 0.5). We report top-1/3/5 instance
    accuracy and mean per-class accuracy for the text branch, the image branch and the fusion. OpenShape's
    PointBERT has one projection head, so it is one branch. Preprocessing as TAMM's evaluation: the first N
    points, swap y/z, centre, unit sphere, no augmentation (data.ZeroShotSet).
  - Few-shot linear probing on frozen features: Point-BERT's N-way K-shot episodes (20 query shapes
    per class, 10 seeded trials, mean +- std) and OpenShape's protocol (K random shapes per class for training,
    the rest for testing, averaged over seeds). The classifier is multinomial logistic regression (LBFGS).
    As in the literature the probe uses the benchmark's own shapes (the ModelNet40 test set).
  - Your own point clouds (.npy/.npz/.ply/.xyz/.txt): zero-shot against your labels through open_clip, and/or
    the encoder and adapter features written to an .npz for retrieval or other downstream work.

Checkpoints: our stage-2 checkpoints, the released TAMM files (no config inside: --scaling, default 4), OpenShape's
PointBERT, or one of the names in NAMED_CHECKPOINTS (fetched from the Hugging Face Hub once, then cached).
Under torchrun each rank encodes every world_size-th shape and the features are all-gathered in memory, so
every shape is counted exactly once. Results: a table on the terminal, plus eval_<checkpoint>.json/.md next to
the checkpoint (or in --out).

    python evaluate.py --ckpt runs/stage2/latest.pt                            # synthetic world, CPU is fine
    python evaluate.py --ckpt tamm-ensemble --data /data/openshape --device cuda
    torchrun --nproc_per_node=4 evaluate.py --ckpt tamm-ensemble --data /data/openshape
    python evaluate.py --ckpt openshape-pointbert --data /data/openshape --tasks zero-shot
    python evaluate.py --ckpt ckpt.pt --pc chair.ply mug.npy --up y --labels "chair,mug,lamp"
    python evaluate.py --ckpt ckpt.pt --pc scans/*.ply --up z --dump-features feats.npz
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
from adapters import zero_shot_scores
from model import load_checkpoint_file, load_pretrained
from pointclouds import prepare_points, read_point_cloud
from utils import (BadInput, check_writable, cleanup_distributed, hub_offline, hub_reachable, run_cli,
                   setup_distributed, world_info)

# ---- defaults ----------------------------------------------------------------------------------------------
NUM_POINTS = 10000                 # TAMM evaluates on the first 10,000 points (tamm-facts.md 5)
ALPHA = 0.5                        # weight of the image branch in the fused zero-shot score (paper, release)
BATCH_SIZE = 32                    # evaluation batch per rank; any value gives the same numbers
BENCHMARKS = ("modelnet40", "lvis", "scanobjectnn")  # the paper's zero-shot tables (add "val" for ours)
EPISODES = ("5x10", "10x20")       # N-way x K-shot, Point-BERT's few-shot settings (TAMM: ModelNet40 5-way 10-shot)
N_QUERY = 20                       # query shapes per class and episode (Point-BERT)
TRIALS = 10                        # episodes (Point-BERT: 10 folds) and OpenShape repeats; mean +- std
OPENSHAPE_SHOTS = (1, 2, 4, 8, 16)  # shapes per class in OpenShape's few-shot figure
PROBE_ON = "modelnet40"            # the benchmark whose shapes are probed, as in the literature
PROBE_STEPS = 100                  # LBFGS iterations of the linear probe (fixed, so runs are comparable)
PROBE_L2 = 1e-3                    # L2 on the probe weights: keeps separable few-shot problems well posed
TOP_LABELS = 5                     # labels printed per point-cloud file
HUB_TIMEOUT = 5.0                  # seconds to wait for the Hub before saying there is no network

# Released weights by name -> (Hugging Face repo, file); tamm-facts.md sections 2-3.
NAMED_CHECKPOINTS = {
    "tamm-ensemble": ("zhihao406/tamm-models", "tamm_pointbert_ensemble.pt"),
    "tamm-no-lvis": ("zhihao406/tamm-models", "tamm_pointbert_no_lvis.pt"),
    "tamm-shapenet": ("zhihao406/tamm-models", "tamm_pointbert_shapenet.pt"),
    "openshape-pointbert": ("OpenShape/openshape-pointbert-vitg14-rgb", "model.pt"),
}


# ---- checkpoints by name -----------------------------------------------------------------------------------

def resolve_checkpoint(ckpt):
    """A local path, or one of NAMED_CHECKPOINTS -> the path of the file in the Hugging Face cache."""
    if os.path.exists(ckpt):  # a local file wins over a name
        return ckpt
    if ckpt not in NAMED_CHECKPOINTS:
        raise BadInput(f"--ckpt {ckpt}: no such file, and not one of the released names ({', '.join(NAMED_CHECKPOINTS)})")
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError
    repo, filename = NAMED_CHECKPOINTS[ckpt]
    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    if hub_offline() or constants.HF_HUB_OFFLINE:
        raise BadInput(f"--ckpt {ckpt}: {repo}/{filename} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                       f"set; download it where there is network and pass the file path")
    if not hub_reachable(constants.ENDPOINT, HUB_TIMEOUT):
        raise BadInput(f"--ckpt {ckpt}: cannot reach {constants.ENDPOINT} to download {repo}/{filename} (no "
                       f"network?); download it where there is network and pass the file path")
    try:
        return hf_hub_download(repo, filename)
    except (HfHubHTTPError, OSError) as e:  # OSError covers the hub's not-found and offline errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"--ckpt {ckpt}: downloading {repo}/{filename} failed ({reason})") from None


def parse_labels(value):
    """--labels: a file with one label per line, or a comma-separated list."""
    if os.path.isfile(value):
        with open(value) as f:
            labels = [line.strip() for line in f]
    else:
        labels = [s.strip() for s in value.split(",")]
    labels = [s for s in labels if s]
    if not labels:
        raise BadInput(f"--labels {value!r}: no labels given (a comma-separated list or a file, one per line)")
    return labels


# ---- features, gathered across ranks -----------------------------------------------------------------------

@torch.no_grad()
def encode_shard(model, loader, device="cpu", progress=False):
    """This rank's part of an eval loader -> {"backbone", "text", "image", "label", "index"} CPU tensors."""
    parts = {k: [] for k in ("backbone", "text", "image", "label", "index")}
    for points, labels, index in tqdm(loader, desc="encode", disable=None if progress else True, leave=False):
        out = model(points.to(device, non_blocking=True))                # 3 x (B, dim or D)
        for k in ("backbone", "text", "image"):
            parts[k].append(out[k].float().cpu())
        parts["label"].append(torch.as_tensor(labels).long())
        parts["index"].append(torch.as_tensor(index).long())
    # a rank can get no sample at all (fewer shapes than ranks): keep the widths for the gather
    widths = {"backbone": (model.cfg.dim,), "text": (model.clip_dim,), "image": (model.clip_dim,), "label": (), "index": ()}
    return {k: torch.cat(v) if v else torch.empty(0, *widths[k], dtype=torch.long if not widths[k] else torch.float)
            for k, v in parts.items()}


def all_gather_rows(tensor, device):
    """Every rank's (n_r, ...) tensor -> the list over ranks. Row counts differ between ranks, so each is padded
    to the largest before dist.all_gather (which needs equal shapes) and cut back afterwards."""
    world = dist.get_world_size()
    tensor = tensor.to(device)
    count = torch.tensor([tensor.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded)
    return [b[:int(c.item())].cpu() for b, c in zip(buffers, counts)]


def merge_shards(shards, total=None):
    """Per-rank feature dicts -> one dict in global-index order. Fails loudly if a sample is missing or counted
    twice, which is the whole point of gathering indices along with the features."""
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = torch.argsort(merged["index"])
    merged = {k: v[order] for k, v in merged.items()}
    index = merged["index"]
    if len(index) and (index[1:] == index[:-1]).any():
        raise RuntimeError("a sample was gathered from more than one rank")
    if total is not None and not torch.equal(index, torch.arange(total)):
        raise RuntimeError(f"gathered {len(index)} samples, the dataset has {total}")
    return merged


def extract_features(model, loader, device="cpu", progress=False):
    """Run `model` over this rank's part of an eval loader (data.make_eval_loader) and all-gather: every rank
    returns the features of the whole dataset, each sample once, in dataset order."""
    local = encode_shard(model, loader, device, progress)
    _, world = world_info()
    if world == 1:
        shards = [local]
    else:
        # NCCL moves CUDA tensors only; gloo works on CPU tensors
        comm = device if dist.get_backend() == "nccl" else "cpu"
        columns = {k: all_gather_rows(v, comm) for k, v in local.items()}
        shards = [{k: columns[k][r] for k in local} for r in range(world)]
    return merge_shards(shards, total=len(loader.dataset))


# ---- zero-shot ---------------------------------------------------------------------------------------------

def topk_metrics(scores, labels, ks=(1, 3, 5)):
    """(M, C) scores, (M,) labels -> {"top1", "top3", "top5", "mean_class_acc"} as fractions.

    Top-k: the label is among the k highest scores (k is capped at C). Mean per-class accuracy: top-1
    accuracy within each class that has samples, averaged over those classes (ModelNet40 is unbalanced)."""
    scores, labels = torch.as_tensor(scores).float(), torch.as_tensor(labels).long()
    hit = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices == labels[:, None]   # (M, k)
    out = {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}
    top1 = hit[:, 0].float()
    out["mean_class_acc"] = torch.stack([top1[labels == c].mean() for c in labels.unique()]).mean().item()
    return out


def zero_shot(feats, class_feat, alpha=ALPHA, single_branch=False):
    """{branch: topk_metrics} for text, image and fused (text + alpha * image); one "single" branch for OpenShape."""
    text, image, fused = zero_shot_scores(feats["text"], feats["image"], class_feat, alpha)
    if single_branch:
        return {"single": topk_metrics(text, feats["label"])}
    return {name: topk_metrics(s, feats["label"]) for name, s in (("text", text), ("image", image), ("fused", fused))}


# ---- few-shot linear probing -------------------------------------------------------------------------------

def probe_features(feats, choice, single_branch=False):
    """(M, F) features to probe; every choice is L2-normalised so one L2 strength suits all of them.
    "both" concatenates the normalised text and image branch outputs (one copy for a single-branch model)."""
    if choice == "backbone":
        return F.normalize(feats["backbone"].double(), dim=1)
    if choice in ("text", "image") or single_branch:
        return F.normalize(feats["text" if single_branch else choice].double(), dim=1)
    return torch.cat([F.normalize(feats[k].double(), dim=1) for k in ("text", "image")], 1)


def class_pool(labels, need):
    """Classes with at least `need` shapes, and the others (which the protocol skips)."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return classes[counts >= need], classes[counts < need]


def sample_episode(labels, n_way, k_shot, n_query, seed):
    """One Point-BERT episode: (support, query) index arrays into `labels`, n_way * k_shot and n_way * n_query
    long, grouped by class, disjoint. The classes are drawn among those with >= k_shot + n_query shapes."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pool, _ = class_pool(labels, k_shot + n_query)
    if len(pool) < n_way:
        raise ValueError(f"{n_way}-way {k_shot}-shot needs {n_way} classes with >= {k_shot + n_query} shapes, "
                         f"found {len(pool)}")
    support, query = [], []
    for c in rng.choice(pool, n_way, replace=False):
        idx = rng.permutation(np.flatnonzero(labels == c))[:k_shot + n_query]
        support.append(idx[:k_shot])
        query.append(idx[k_shot:])
    return np.concatenate(support), np.concatenate(query)


def openshape_split(labels, k_shot, seed):
    """OpenShape's few-shot split: k_shot random shapes of every class with more than k_shot shapes for training,
    all the others of those classes for testing -> (train, test) index arrays."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pool, _ = class_pool(labels, k_shot + 1)
    if len(pool) == 0:
        raise ValueError(f"{k_shot}-shot: no class has more than {k_shot} shapes")
    train, test = [], []
    for c in pool:
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:k_shot])
        test.append(idx[k_shot:])
    return np.concatenate(train), np.concatenate(test)


def linear_probe(train_x, train_y, test_x, test_y, steps=PROBE_STEPS, l2=PROBE_L2):
    """Multinomial logistic regression on frozen features (LBFGS, `steps` iterations, L2 on the weights) ->
    test accuracy. Labels may be any class ids; they are remapped to 0..C-1 internally."""
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
        pred = classes[(test_x @ weight + bias).argmax(1)]
    return (pred == torch.as_tensor(test_y)).double().mean().item()


def few_shot(x, labels, episodes=EPISODES, n_query=N_QUERY, trials=TRIALS, shots=OPENSHAPE_SHOTS, seed=0,
             steps=PROBE_STEPS, l2=PROBE_L2):
    """Both few-shot protocols on features x (M, F) -> {setting: {"mean", "std", "trials", ...} or {"skipped"}}.
    Trial t uses seed + t; std is over trials (ddof 0, as Point-BERT's folds)."""
    labels = np.asarray(labels)
    results = {}

    def summary(accs, pool, skipped, need):
        note = f"{len(skipped)} classes with < {need} shapes left out of the pool" if len(skipped) else ""
        return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "trials": len(accs),
                "classes_in_pool": len(pool), "note": note}

    for setting in episodes:
        n_way, k_shot = (int(v) for v in setting.split("x"))
        pool, skipped = class_pool(labels, k_shot + n_query)
        key = f"{n_way}-way {k_shot}-shot"
        if len(pool) < n_way:
            results[key] = {"skipped": f"needs {n_way} classes with >= {k_shot} + {n_query} shapes, "
                                       f"{len(pool)} have that many (fewer queries: --n-query)"}
            continue
        accs = []
        for t in range(trials):
            s, q = sample_episode(labels, n_way, k_shot, n_query, seed + t)
            accs.append(linear_probe(x[s], labels[s], x[q], labels[q], steps, l2))
        results[key] = summary(accs, pool, skipped, k_shot + n_query)
    for k_shot in shots:
        pool, skipped = class_pool(labels, k_shot + 1)
        key = f"openshape {k_shot}-shot"
        if len(pool) < 2:
            results[key] = {"skipped": f"fewer than 2 classes have more than {k_shot} shapes"}
            continue
        accs = []
        for t in range(trials):
            tr, te = openshape_split(labels, k_shot, seed + t)
            accs.append(linear_probe(x[tr], labels[tr], x[te], labels[te], steps, l2))
        results[key] = summary(accs, pool, skipped, k_shot + 1)
    return results


# ---- report ------------------------------------------------------------------------------------------------

def format_markdown(results):
    """The results dict -> Markdown tables (also what the terminal shows)."""
    pct = lambda v: f"{100 * v:.2f}"
    lines = [f"# Evaluation of {results['checkpoint']}", "",
             f"heads: {results['heads']}, alpha: {results['alpha']}, points: {results['num_points']}, "
             f"data: {results['data']}", ""]
    if results.get("zero_shot"):
        lines += ["## Zero-shot classification (%)", "",
                  "| benchmark | shapes | classes | chance top-1 | branch | top-1 | top-3 | top-5 | mean class acc |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["zero_shot"].items():
            for branch, m in r["branches"].items():
                lines.append(f"| {name} | {r['num_samples']} | {r['num_classes']} | {pct(1 / r['num_classes'])} | "
                             f"{branch} | {pct(m['top1'])} | {pct(m['top3'])} | {pct(m['top5'])} | "
                             f"{pct(m['mean_class_acc'])} |")
        lines.append("")
    fs = results.get("few_shot")
    if fs:
        lines += [f"## Few-shot linear probing (%) on the {fs['benchmark']} shapes ({fs['split']}), "
                  f"feature: {fs['feature']}", "", "| setting | accuracy (mean +- std) | trials | note |",
                  "|---|---|---|---|"]
        for key, r in fs["settings"].items():
            if "skipped" in r:
                lines.append(f"| {key} | skipped | 0 | {r['skipped']} |")
            else:
                lines.append(f"| {key} | {pct(r['mean'])} +- {pct(r['std'])} | {r['trials']} | {r['note']} |")
        lines.append("")
    return "\n".join(lines)


def write_results(results, out_dir, stem):
    """eval_<stem>.json and eval_<stem>.md in out_dir -> their paths."""
    base = os.path.join(out_dir, f"eval_{stem}")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(format_markdown(results))
    return base + ".json", base + ".md"


# ---- the two modes -----------------------------------------------------------------------------------------

@torch.no_grad()
def run_point_clouds(args, model, clouds, labels, device, is_main):
    """--pc: encode the files in order; classify against --labels and/or write --dump-features."""
    points = torch.stack([prepare_points(xyz, rgb, args.num_points, args.up) for xyz, rgb in clouds])
    outs = [model(points[i:i + args.batch_size].to(device)) for i in range(0, len(points), args.batch_size)]
    feats = {k: torch.cat([o[k] for o in outs]).float().cpu() for k in ("backbone", "text", "image")}
    predictions = {}
    if labels:
        import clip_features
        clip_model, tokenizer, _ = clip_features.load_clip(args.clip_model or clip_features.DEFAULT_MODEL,
                                                           args.clip_pretrained or clip_features.DEFAULT_PRETRAINED,
                                                           str(device))
        class_feat = torch.as_tensor(clip_features.encode_class_names(labels, clip_model, tokenizer, device=str(device)))
        if class_feat.shape[1] != model.clip_dim:
            raise BadInput(f"--clip-model {args.clip_model}: gives {class_feat.shape[1]}-d text features, the "
                           f"checkpoint's heads output {model.clip_dim}-d (the teacher is ViT-bigG-14)")
        text, _, fused = zero_shot_scores(feats["text"], feats["image"], class_feat, args.alpha)
        scores = text if model.heads == "openshape" else fused
        top = scores.topk(min(TOP_LABELS, len(labels)), dim=1)
        for path, vals, idx in zip(args.pc, top.values, top.indices):
            predictions[path] = [(labels[int(i)], float(v)) for v, i in zip(vals, idx)]
            if is_main:
                print(f"{path}: " + " | ".join(f"{name} {v:.3f}" for name, v in predictions[path]))
    if args.dump_features and is_main:
        with open(args.dump_features, "wb") as f:  # a file handle keeps the exact name (np.savez adds .npz)
            np.savez(f, backbone=feats["backbone"].numpy(), text=feats["text"].numpy(),
                     image=feats["image"].numpy(), files=np.array(args.pc))
        print(f"wrote features of {len(args.pc)} clouds to {args.dump_features}")
    return {"predictions": predictions, "features": feats}


def run_benchmarks(args, model, device, info):
    """Zero-shot on every benchmark found, then few-shot probes on one of them."""
    root = args.data
    if root is None:  # the synthetic world: rank 0 builds it (once, cached), the other ranks then find it
        import synthetic
        if info.distributed and not info.is_main:
            dist.barrier()
        root = synthetic.ensure_world()
        if info.distributed and info.is_main:
            dist.barrier()
    sets = data.load_benchmarks(str(root), args.num_points, args.benchmarks, clip_dim=model.clip_dim)
    if not sets:
        raise BadInput(f"{root}: none of the benchmarks {', '.join(args.benchmarks)} found (see data.py for the layout)")
    single = model.heads == "openshape"
    probe_on = args.probe_on if args.probe_on in sets else next(iter(sets))
    if "zero-shot" not in args.tasks:  # few-shot alone needs the features of one benchmark only
        sets = {probe_on: sets[probe_on]}
    results = {"checkpoint": args.ckpt, "heads": model.heads, "alpha": args.alpha, "num_points": args.num_points,
               "data": str(root), "world_size": info.world_size, "zero_shot": {}}
    features = {}
    for name, ds in sets.items():
        loader = data.make_eval_loader(ds, args.batch_size, info.rank, info.world_size, args.workers)
        feats = extract_features(model, loader, device, progress=info.is_main)
        features[name] = feats
        if "zero-shot" in args.tasks:
            results["zero_shot"][name] = {"num_samples": len(feats["label"]), "num_classes": len(ds.class_names),
                                          "branches": zero_shot(feats, ds.class_feat, args.alpha, single)}
    if "few-shot" in args.tasks and info.is_main:  # features are the same on every rank: probe once
        name, feats = probe_on, features[probe_on]
        split = "the benchmark's test shapes, as in the literature" if name != "val" else "the validation shapes"
        if name != args.probe_on:
            split += f"; --probe-on {args.probe_on} was not found"
        results["few_shot"] = {
            "benchmark": name, "split": split, "feature": args.probe_feature, "n_query": args.n_query,
            "settings": few_shot(probe_features(feats, args.probe_feature, single), feats["label"].numpy(),
                                 args.episodes, args.n_query, args.trials, args.openshape_shots, args.seed,
                                 args.probe_steps, args.probe_l2)}
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help=f"checkpoint file or released name ({', '.join(NAMED_CHECKPOINTS)})")
    p.add_argument("--scaling", default="4", help="encoder size of released checkpoints (no config inside): 1-6 or tiny")
    p.add_argument("--data", help="data root with the benchmarks (default: the synthetic world's test sets)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), help="benchmarks to look for under --data")
    p.add_argument("--tasks", nargs="+", choices=["zero-shot", "few-shot"], default=["zero-shot", "few-shot"])
    p.add_argument("--alpha", type=float, default=ALPHA, help="image-branch weight in the fused score")
    p.add_argument("--num-points", type=int, help="first N points per shape (fewer: resampled); default: the "
                   f"checkpoint's training value, {NUM_POINTS} for released checkpoints")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="per rank")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loader processes per rank")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", help="folder for eval_<ckpt>.json/.md (default: next to the checkpoint; runs/eval for names)")
    g = p.add_argument_group("few-shot linear probing")
    g.add_argument("--probe-on", default=PROBE_ON, help="benchmark whose shapes are probed")
    g.add_argument("--probe-feature", choices=["backbone", "text", "image", "both"], default="both")
    g.add_argument("--episodes", nargs="*", default=list(EPISODES),
                   help="Point-BERT N-way x K-shot settings, e.g. 5x10 (none: skip this protocol)")
    g.add_argument("--n-query", type=int, default=N_QUERY, help="query shapes per class per episode")
    g.add_argument("--trials", type=int, default=TRIALS, help="episodes / OpenShape repeats per setting")
    g.add_argument("--openshape-shots", type=int, nargs="*", default=list(OPENSHAPE_SHOTS),
                   help="shapes per class of OpenShape's protocol (none: skip it)")
    g.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="LBFGS iterations")
    g.add_argument("--probe-l2", type=float, default=PROBE_L2, help="L2 weight of the probe")
    g.add_argument("--seed", type=int, default=0, help="trial t uses seed + t")
    g = p.add_argument_group("your own point clouds")
    g.add_argument("--pc", nargs="+", help=".npy/.npz/.ply/.xyz/.txt files (replaces the benchmarks)")
    g.add_argument("--up", choices=["y", "z"], default="y", help="up axis of the files (the release is y-up)")
    g.add_argument("--labels", help="comma-separated labels, or a file with one label per line")
    g.add_argument("--clip-model", help="open_clip model for --labels (default ViT-bigG-14, the teacher)")
    g.add_argument("--clip-pretrained", help="open_clip tag, weights file, or 'none' for random weights "
                                             "(default laion2b_s39b_b160k)")
    g.add_argument("--dump-features", help="OUT.npz with backbone, text, image (before normalisation) and files")
    args = p.parse_args(argv)
    for setting in args.episodes:
        parts = setting.split("x")
        if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 for v in parts):
            raise BadInput(f"--episodes {setting}: expected N-way x K-shot such as 5x10")
    if (args.num_points is not None and args.num_points < 1) or args.batch_size < 1 or args.n_query < 1 or args.trials < 1:
        raise BadInput("--num-points, --batch-size, --n-query and --trials must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    # Everything cheap and user-made is checked before the model loads and any shape is encoded.
    clouds, labels = None, None
    if args.pc:
        if not (args.labels is not None or args.dump_features):
            raise BadInput("--pc needs --labels (zero-shot) and/or --dump-features OUT.npz")
        clouds = [read_point_cloud(path) for path in args.pc]
        labels = parse_labels(args.labels) if args.labels is not None else None
        if args.dump_features:
            check_writable(os.path.dirname(os.path.abspath(args.dump_features)))
    else:
        if args.out:
            out_dir = args.out
        elif args.ckpt in NAMED_CHECKPOINTS and not os.path.exists(args.ckpt):
            out_dir = os.path.join("runs", "eval")
        else:
            out_dir = os.path.dirname(os.path.abspath(args.ckpt))
        check_writable(out_dir)
    info = setup_distributed(args.device)
    try:
        path = resolve_checkpoint(args.ckpt)
        ckpt = load_checkpoint_file(path)
        model = load_pretrained(ckpt, scaling=args.scaling, where=path).to(info.device)
        if args.num_points is None:  # our checkpoints know the training point count; the release used 10,000
            args.num_points = (ckpt.get("args") or {}).get("num_points") or NUM_POINTS
        if args.pc:
            return run_point_clouds(args, model, clouds, labels, info.device, info.is_main)
        results = run_benchmarks(args, model, info.device, info)
        results["wall_s"] = round(time.time() - t0, 1)
        if info.is_main:
            print(format_markdown(results))
            stem = os.path.splitext(os.path.basename(args.ckpt))[0]
            paths = write_results(results, out_dir, stem)
            print(f"wrote {paths[0]} and {paths[1]} ({results['wall_s']} s)")
        return results
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
