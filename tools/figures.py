"""The pictures of docs/walkthrough.md, drawn from a run's own outputs (nothing is drawn by hand).

    python -m tools.figures runs/demo --ablation runs/ablation --out docs/figures

The method as a diagram (method.png, drawn from code, the README's first picture); then from the
demo run (RUN/stage1, RUN/stage2 and evaluate.py's RUN/stage2/eval_latest.json) and the world it
trained on:
  data.png           one shape of each category, its points coloured by their rgb
  grouping.png       one shape's FPS centres and three of its ball-query patches, at the run's size
  stage1_gap.png     per rendered view of the held-out (LVIS) shapes: cosine to its own class's text
                     minus cosine to the best other class, before and after the run's CIA
  stage2_curves.png  stage 2's log: the loss of each target, the training accuracies, validation
  confusion.png      the fused zero-shot confusion matrix on the synthetic ModelNet40
and from `python -m tools.ablation` (--ablation): ablation.png, the four variants with error bars.

Needs matplotlib (pip install matplotlib), which nothing else in the project imports.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import data
import grouping
from checkpoint import load_checkpoint, load_cia
from cli import Parser, existing_dir, output_dir, run_cli
from files import BadInput, load_json, load_npy
from tools import synthetic

DPI = 100
COLOURS = {"text": "#1f77b4", "image": "#d62728", "fused": "#2ca02c", "single": "#9467bd"}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or one line saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise BadInput("tools/figures.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.facecolor": "white", "axes.facecolor": "white",
                         "savefig.facecolor": "white", "font.size": 9})
    return plt


def save(fig, out_dir, name):
    """An opaque white PNG (readable in light and dark viewers) -> its path."""
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def lvis_shapes(root):
    """(entries, shape paths, sorted categories, (C, D) class features) of the world's LVIS set:
    shapes no stage saw in training, each with a category and rendered-view features."""
    split_path = data.find_file(root, data.LVIS_SPLIT)
    feat_path = data.find_file(root, data.LVIS_FEAT)
    if not split_path or not feat_path:
        raise BadInput(f"{root}: no LVIS split and class features (meta_data/split/lvis.json)")
    entries = data.load_entries(split_path, ["data_path", "category"])
    categories = sorted({e["category"] for e in entries})
    class_feat = torch.as_tensor(np.asarray(load_npy(feat_path), np.float32))
    return entries, data.shape_paths(entries, root), categories, class_feat


def first_of_each_category(entries, paths, categories):
    firsts = {}
    for entry, path in zip(entries, paths):
        firsts.setdefault(entry["category"], path)
    return [(c, firsts[c]) for c in categories]


def scatter(ax, xyz, colours, size=2):
    ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=colours, s=size, linewidths=0, depthshade=False)
    ax.set_box_aspect((1, 1, 1))
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.set_zlim(-1, 1)
    ax.view_init(elev=20, azim=-60)
    ax.set_axis_off()


# ---- the figures -------------------------------------------------------------------------------


def box(ax, x, y, text, colour="#f2f2f2", edge="#555555", size=9):
    return ax.text(x, y, text, ha="center", va="center", fontsize=size, zorder=3,
                   bbox=dict(boxstyle="round,pad=0.45", facecolor=colour, edgecolor=edge))


def box_edge(ax, label, towards):
    """Where the line from the centre of box `label` towards the point `towards` leaves the box
    (data coordinates; the figure must have been drawn once)."""
    extent = label.get_bbox_patch().get_window_extent().transformed(ax.transData.inverted())
    centre = np.array([(extent.x0 + extent.x1) / 2, (extent.y0 + extent.y1) / 2])
    direction = np.asarray(towards) - centre
    half = np.array([extent.width / 2, extent.height / 2])
    t = min(half[i] / abs(direction[i]) for i in range(2) if direction[i] != 0)
    return centre + t * direction


def arrow(ax, start, end, text="", colour="#333333", style="-|>", offset=(0, 0.025)):
    """An arrow from box `start` to box `end` (box's return values), from edge to edge."""
    a = box_edge(ax, start, end.get_position())
    b = box_edge(ax, end, start.get_position())
    ax.annotate("", xy=b, xytext=a, zorder=4,
                arrowprops=dict(arrowstyle=style, color=colour, lw=1.3, shrinkA=1, shrinkB=1))
    if text:
        middle = ((a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1])
        ax.text(*middle, text, ha="center", va="bottom", fontsize=7.5, color=colour)


def figure_method(plt, out_dir):
    """Stage 1, stage 2 and the zero-shot score as boxes and arrows (the paper's figure 2)."""
    fig, ax = plt.subplots(figsize=(12.5, 5.2))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    frozen, trained, loss = "#dbe9f6", "#fde0c5", "#e6f2e1"
    ax.text(0.01, 0.97, "Stage 1 (train_stage1.py): the CLIP Image Adapter", fontsize=11,
            weight="bold", va="top")
    view = box(ax, 0.05, 0.78, "rendered\nview")
    text = box(ax, 0.05, 0.52, "shape\ntext")
    image_encoder = box(ax, 0.17, 0.78, "CLIP image\nencoder (frozen)", frozen)
    text_encoder = box(ax, 0.17, 0.52, "CLIP text\nencoder (frozen)", frozen)
    cia = box(ax, 0.36, 0.78, "CIA(v) = 0.2 A(v) + 0.8 v\nA: 1280 -> 320 -> 1280", trained)
    stage1_loss = box(ax, 0.36, 0.52, "contrastive loss\n(A and the temperature learn)", loss)
    ax.plot([0.505, 0.505], [0.3, 0.97], color="#bbbbbb", lw=1)
    ax.text(0.52, 0.97, "Stage 2 (train_stage2.py): the point encoder and the Dual Adapters",
            fontsize=11, weight="bold", va="top")
    points = box(ax, 0.58, 0.84, "points (B, N, 6)\nxyz + rgb")
    encoder = box(ax, 0.58, 0.60, "PointBERT\nencoder f\n(model.py, 512-d)", trained)
    iaa = box(ax, 0.73, 0.78, "IAA head\n512 -> 1280", trained)
    taa = box(ax, 0.73, 0.46, "TAA head\n512 -> 1280", trained)
    views = box(ax, 0.93, 0.78, "CIA(v_1 .. v_4)\n(frozen)", frozen)
    texts = box(ax, 0.93, 0.46, "text t\n(frozen)", frozen)
    fig.canvas.draw()  # places the boxes, so that the arrows below end at their edges
    arrow(ax, view, image_encoder)
    arrow(ax, text, text_encoder)
    arrow(ax, image_encoder, cia, "v")
    arrow(ax, cia, stage1_loss, "CIA(v)", offset=(0.035, -0.02))
    arrow(ax, text_encoder, stage1_loss, "t")
    arrow(ax, points, encoder)
    arrow(ax, encoder, iaa)
    arrow(ax, encoder, taa)
    arrow(ax, iaa, views, "contrastive\nx 4 views", "#2c7a2c", "<|-|>", offset=(0, 0.01))
    arrow(ax, taa, texts, "contrastive", "#2c7a2c", "<|-|>", offset=(0, 0.01))
    ax.text(0.52, 0.31, "one temperature, one sum of 5 contrastive terms (loss.py)",
            fontsize=8.5, color="#2c7a2c")
    ax.text(0.01, 0.17, "Zero-shot (evaluate.py): class names -> CLIP text features T_c (prompt "
            "ensembles);  score_c = cos(TAA(f), T_c) + 0.5 cos(IAA(f), T_c)", fontsize=10)
    ax.text(0.01, 0.07, "blue: frozen CLIP features     orange: what learns     green: the "
            "contrastive losses", fontsize=8.5, color="#555555")
    return save(fig, out_dir, "method.png")


def figure_data(plt, root, out_dir, points=1024):
    entries, paths, categories, _ = lvis_shapes(root)
    shapes = first_of_each_category(entries, paths, categories)
    cols = 4
    rows = -(-len(shapes) // cols)
    fig = plt.figure(figsize=(2.4 * cols, 2.4 * rows))
    for n, (category, path) in enumerate(shapes):
        shape = load_npy(path, item=True)
        xyz = data.normalize(np.asarray(shape["xyz"], np.float32))[:points]  # z-up, unit sphere
        rgb = np.clip(np.asarray(shape["rgb"], np.float32)[:points], 0, 1)
        ax = fig.add_subplot(rows, cols, n + 1, projection="3d")
        scatter(ax, xyz, rgb)
        ax.set_title(category, fontsize=10)
    fig.suptitle(f"One shape of each of the {len(shapes)} categories ({points} of its points, "
                 f"coloured by their rgb; z up)")
    return save(fig, out_dir, "data.png")


def figure_grouping(plt, root, run_dir, out_dir):
    ckpt = load_checkpoint(os.path.join(run_dir, "stage2", "latest.pt"), wanted=("stage2",))
    cfg = ckpt["config"]["encoder"]
    num_points = (ckpt.get("args") or {}).get("num_points") or 1024
    entries, paths, categories, _ = lvis_shapes(root)
    category, path = first_of_each_category(entries, paths, categories)[0]
    shape = load_npy(path, item=True)
    idx = data.choose_points(len(shape["xyz"]), num_points, np.random.default_rng(0), first=True)
    xyz = torch.as_tensor(data.normalize(np.asarray(shape["xyz"], np.float32)[idx]))[None]
    centre_idx = grouping.farthest_point_sample(xyz, cfg["num_patches"])      # (1, S)
    centres = grouping.index_points(xyz, centre_idx)                              # (1, S, 3)
    neighbours = grouping.ball_query(xyz, centres, cfg["radius"], cfg["k"])       # (1, S, k)
    fig = plt.figure(figsize=(7, 6))
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    scatter(ax, xyz[0].numpy(), "#bbbbbb", size=2)
    ax.scatter(*centres[0].T.numpy(), c="black", s=10, depthshade=False, label="FPS centres")
    picks = [0, cfg["num_patches"] // 3, 2 * cfg["num_patches"] // 3]
    for colour, s in zip(("#d62728", "#1f77b4", "#2ca02c"), picks):
        patch = xyz[0, neighbours[0, s].unique()].numpy()
        ax.scatter(*patch.T, c=colour, s=9, depthshade=False,
                   label=f"patch {s}: {len(patch)} distinct of its k = {cfg['k']}")
    low, high = xyz[0].amin(0).numpy(), xyz[0].amax(0).numpy()  # zoom to the shape, true aspect
    for set_lim, lo, hi in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), low, high):
        set_lim(lo, hi)
    ax.set_box_aspect(high - low)
    ax.legend(loc="upper left", fontsize=8)
    B, S, k = neighbours.shape
    ax.set_title(f"{category}: {num_points} points, S = {S} centres (FPS), k = {k} neighbours "
                 f"within r = {cfg['radius']}\nPointNet input ({B}, {S}, {k}, 9): per neighbour "
                 f"xyz - centre, xyz, rgb")
    return save(fig, out_dir, "grouping.png")


def view_margins(views, labels, class_feat):
    """Per view: cosine to its own class's text minus cosine to the best other class."""
    sims = F.normalize(views, dim=-1) @ F.normalize(class_feat, dim=-1).T      # (M, C)
    own = sims.gather(1, labels[:, None])[:, 0]
    others = sims.scatter(1, labels[:, None], -2.0).amax(1)
    return (own - others).numpy()


def figure_stage1_gap(plt, root, run_dir, out_dir):
    entries, paths, categories, class_feat = lvis_shapes(root)
    views, labels = [], []
    for entry, path in zip(entries, paths):
        shape = load_npy(path, item=True)
        views.append(torch.as_tensor(np.asarray(shape["image_feat"], np.float32)))
        labels += [categories.index(entry["category"])] * len(shape["image_feat"])
    views = torch.cat(views)
    labels = torch.tensor(labels)
    cia = load_cia(os.path.join(run_dir, "stage1", "cia.pt"))
    with torch.no_grad():
        margins = {"raw CLIP view features": view_margins(views, labels, class_feat),
                   "after the CIA": view_margins(cia(views), labels, class_feat)}
    report = [r for r in read_log(os.path.join(run_dir, "stage1", "log.jsonl"))
              if "heldout_top1_after" in r][-1]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    every = np.concatenate(list(margins.values()))
    bins = np.linspace(every.min(), every.max(), 60)
    for (name, m), colour in zip(margins.items(), ("#7f7f7f", "#d62728")):
        ax.hist(m, bins=bins, alpha=0.6, color=colour,
                label=f"{name}: {100 * (m > 0).mean():.1f}% of the views nearer their own class")
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("cosine to its own class's text - cosine to the best other class (per view)")
    ax.set_ylabel("rendered views")
    ax.legend(fontsize=8)
    ax.set_title(f"Stage 1 on {len(entries)} held-out shapes x {len(views) // len(entries)} views. "
                 f"Stage 1's own report, held-out image->text top-1: "
                 f"{report['heldout_top1_before']:.3f} -> {report['heldout_top1_after']:.3f}",
                 fontsize=9)
    return save(fig, out_dir, "stage1_gap.png")


def figure_stage2_curves(plt, run_dir, out_dir):
    log = read_log(os.path.join(run_dir, "stage2", "log.jsonl"))
    train = [r for r in log if "loss" in r]
    val = [r for r in log if any(k.startswith("val_") for k in r)]
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    if "loss_text" in train[0]:
        axes[0].plot(steps, [r["loss_image"] for r in train], color=COLOURS["image"],
                     label="image: IAA(f) vs one CIA view (each of 4)")
        axes[0].plot(steps, [r["loss_text"] for r in train], color=COLOURS["text"],
                     label="text: TAA(f) vs the text")
    else:
        axes[0].plot(steps, [r["loss"] for r in train], label="sum of the 5 targets")
    axes[0].set_ylabel("contrastive loss (nats)")
    axes[1].plot(steps, [r["acc_image"] for r in train], color=COLOURS["image"], label="image")
    axes[1].plot(steps, [r["acc_text"] for r in train], color=COLOURS["text"], label="text")
    axes[1].set_ylabel("in-batch top-1, shape -> its own target")
    for branch in ("text", "image", "fused", "single"):
        key = f"val_{branch}_top1"
        points = [(r["step"], r[key]) for r in val if key in r]
        if points:
            axes[2].plot(*zip(*points), marker="o", color=COLOURS[branch], label=branch)
    axes[2].set_ylabel("validation zero-shot top-1")
    for ax, title in zip(axes, ("loss of each target", "training accuracy", "validation")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, out_dir, "stage2_curves.png")


def figure_confusion(plt, run_dir, out_dir, benchmark="modelnet40"):
    report = load_json(os.path.join(run_dir, "stage2", "eval_latest.json"))
    z = report["zero_shot"][benchmark]
    main = "fused" if "fused" in z["branches"] else "single"
    classes = z["classes"]
    counts = np.zeros((len(classes), len(classes)))
    for true, predicted, n in z["branches"][main]["confusion"]:
        counts[true, predicted] = n
    share = counts / counts.sum(1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(6.5, 5.8))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, label="share of the true class's shapes")
    tops = ", ".join(f"{b} {100 * m['top1']:.1f}%" for b, m in z["branches"].items())
    ax.set_title(f"{main} zero-shot, synthetic {benchmark} ({z['num_samples']} shapes)\n"
                 f"top-1: {tops}")
    return save(fig, out_dir, "confusion.png")


def figure_ablation(plt, ablation_dir, out_dir):
    summary = load_json(os.path.join(ablation_dir, "ablation.json"))
    variants = list(summary["variants"])
    metrics = summary["metrics"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(variants)
    for v, name in enumerate(variants):
        means = [summary["variants"][name][m]["mean"] for m in metrics]
        stds = [summary["variants"][name][m]["std"] for m in metrics]
        xs = np.arange(len(metrics)) + (v - (len(variants) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=summary["labels"][name])
    ax.set_xticks(range(len(metrics)), [summary["metric_names"][m] for m in metrics])
    ax.set_ylabel("accuracy (%), mean +- std over seeds")
    low = min(summary["variants"][n][m]["mean"] for n in variants for m in metrics)
    ax.set_ylim(max(0, low - 15), 100)
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"The ablation on the synthetic world: seeds {summary['seeds']} "
                 f"({summary['machine']})", fontsize=9)
    return save(fig, out_dir, "ablation.png")


def main(argv=None):
    p = Parser(__doc__.split("\n")[0])
    p.add_argument("run", type=existing_dir,
                   help="a run folder of the demo (stage1/, stage2/ and stage2/eval_latest.json)")
    p.add_argument("--ablation", type=existing_dir,
                   help="the folder of python -m tools.ablation (its ablation.json)")
    p.add_argument("--data", type=existing_dir,
                   help="the run's data root (default: the one its stage 2 trained on)")
    p.add_argument("--out", type=output_dir, default=os.path.join("docs", "figures"),
                   help="folder for the PNGs")
    args = p.parse_args(argv)
    needed = ["stage1/cia.pt", "stage1/log.jsonl", "stage2/latest.pt", "stage2/log.jsonl",
              "stage2/eval_latest.json"]
    missing = [f for f in needed if not os.path.isfile(os.path.join(args.run, f))]
    if missing:
        raise BadInput(f"{args.run}: no {missing[0]} (run the demo's three commands with "
                       f"--out {args.run}, the evaluation last)")
    if args.ablation and not os.path.isfile(os.path.join(args.ablation, "ablation.json")):
        raise BadInput(f"--ablation {args.ablation}: no ablation.json (python -m tools.ablation)")
    plt = pyplot()
    config = load_json(os.path.join(args.run, "stage2", "config.json"))
    root = args.data or config["args"].get("data") or str(synthetic.ensure_world(progress=False))
    os.makedirs(args.out, exist_ok=True)
    written = [figure_method(plt, args.out),
               figure_data(plt, root, args.out),
               figure_grouping(plt, root, args.run, args.out),
               figure_stage1_gap(plt, root, args.run, args.out),
               figure_stage2_curves(plt, args.run, args.out),
               figure_confusion(plt, args.run, args.out)]
    if args.ablation:
        written.append(figure_ablation(plt, args.ablation, args.out))
    for path in written:
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")
    return written


if __name__ == "__main__":
    run_cli(main)
