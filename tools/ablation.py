"""The paper's ablation on the synthetic world, over several seeds, with its noise.

TAMM's claims are comparisons: OpenShape's single head against it with the CIA added, with the Dual
Adapters (and no CIA), and with both (TAMM). For each seed this runs exactly the README's ablation
commands with --seed: stage 1, the four stage-2 variants from that stage 1, and evaluate.py
--compare; then it gives each number as mean +- std over the seeds, and for each variant its paired
difference from the OpenShape baseline (the same seed, the same test shapes), with whether it
exceeds the seed-to-seed noise (|mean| > t * std / sqrt(seeds), Student's t at 95%).

    python -m tools.ablation --seeds 0 1 2 --out runs/ablation    # about 20 minutes on 2 CPU cores

Outputs: OUT/seed{s}/ (each seed's runs and eval_compare.json) and OUT/ablation.json and .md.
"""
import os
import platform
import shlex
import statistics
import time

import cli
import evaluate
import train_stage1
import train_stage2
from files import BadInput, atomic_save, load_json, save_json

VARIANTS = {  # name: (stage-2 flags, its label; {cia} is the seed's stage-1 adapter)
    "openshape": (["--head-type", "openshape"], "OpenShape (one head, no CIA)"),
    "cia-one-head": (["--head-type", "openshape", "--cia", "{cia}"], "+ CIA, one head"),
    "dual-no-cia": (["--no-cia"], "Dual Adapters, no CIA"),
    "tamm": (["--cia", "{cia}"], "TAMM (CIA + Dual Adapters)"),
}
METRICS = {"modelnet40": "ModelNet40 zero-shot top-1", "lvis": "LVIS zero-shot top-1",
           "episodes 5-way 10-shot": "5-way 10-shot", "episodes 10-way 20-shot": "10-way 20-shot"}
T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def seed_numbers(report):
    """{metric: value in %} of one checkpoint's evaluation (the fused or the single branch)."""
    out = {}
    for name in ("modelnet40", "lvis"):
        branches = report["zero_shot"][name]["branches"]
        out[name] = 100 * (branches.get("fused") or branches["single"])["top1"]
    for key in ("episodes 5-way 10-shot", "episodes 10-way 20-shot"):
        setting = report["few_shot"]["settings"][key]
        if "mean" in setting:  # else {"skipped": why}: too few shapes for that many ways or shots
            out[key] = 100 * setting["mean"]
    return out


def summarise(per_seed, seeds):
    """per_seed[seed][variant][metric] -> the summary of ablation.json."""
    measured = [m for m in METRICS if all(m in numbers for run in per_seed.values()
                                          for numbers in run.values())]
    summary = {"seeds": seeds, "metrics": measured, "metric_names": METRICS,
               "labels": {v: label for v, (_, label) in VARIANTS.items()}, "variants": {},
               "versus_openshape": {}}
    for v in VARIANTS:
        summary["variants"][v] = {}
        for m in measured:
            values = [per_seed[s][v][m] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary["variants"][v][m] = {"values": values, "mean": statistics.fmean(values),
                                         "std": std}
        if v == "openshape":
            continue
        summary["versus_openshape"][v] = {}
        for m in measured:
            diffs = [per_seed[s][v][m] - per_seed[s]["openshape"][m] for s in seeds]
            mean = statistics.fmean(diffs)
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            beyond = len(diffs) > 1 and abs(mean) > T95[len(diffs)] * std / len(diffs) ** 0.5
            summary["versus_openshape"][v][m] = {"mean": mean, "std": std, "beyond_noise": beyond}
    return summary


def markdown(summary):
    header = "| variant | " + " | ".join(summary["metric_names"][m] for m in summary["metrics"])
    lines = [f"Seeds {summary['seeds']}, {summary['machine']}; mean +- std (%) over the seeds.", "",
             header + " |", "|---" * (1 + len(summary["metrics"])) + "|"]
    for v, numbers in summary["variants"].items():
        cells = [f"{numbers[m]['mean']:.2f} +- {numbers[m]['std']:.2f}" for m in summary["metrics"]]
        lines.append(f"| {summary['labels'][v]} | " + " | ".join(cells) + " |")
    lines += ["", "Paired difference from the OpenShape baseline (same seed, same test shapes), "
              "mean +- std; * where it exceeds the seed-to-seed noise (Student's t, 95%):", "",
              header + " |", "|---" * (1 + len(summary["metrics"])) + "|"]
    for v, numbers in summary["versus_openshape"].items():
        cells = [f"{numbers[m]['mean']:+.2f} +- {numbers[m]['std']:.2f}"
                 + (" *" if numbers[m]["beyond_noise"] else "") for m in summary["metrics"]]
        lines.append(f"| {summary['labels'][v]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_seed(out, seed, args):
    """The README's ablation commands for one seed -> {variant: {metric: value}}."""
    seed_dir = os.path.join(out, f"seed{seed}")
    common = ["--seed", str(seed)] + (["--data", args.data] if args.data else [])
    train_stage1.main(["--out", seed_dir, *common, *shlex.split(args.stage1_flags)])
    cia = os.path.join(seed_dir, "stage1", "cia.pt")
    checkpoints = []
    for name, (flags, _) in VARIANTS.items():
        flags = [f.format(cia=cia) for f in flags]
        run_dir = train_stage2.main(["--out", os.path.join(seed_dir, name), *flags, *common,
                                     *shlex.split(args.stage2_flags)])
        checkpoints.append(os.path.join(run_dir, "latest.pt"))
    evaluate.main(["--compare", *checkpoints, "--out", seed_dir, "--openshape-shots", *common,
                   *shlex.split(args.eval_flags)])
    reports = load_json(os.path.join(seed_dir, "eval_compare.json"))
    return {name: seed_numbers(r) for name, r in zip(VARIANTS, reports)}


def main(argv=None):
    p = cli.Parser(__doc__.split("\n")[0])
    p.add_argument("--seeds", type=cli.COUNT, nargs="+", default=[0, 1, 2],
                   help="seeds of stage 1, stage 2 and the few-shot trials")
    p.add_argument("--out", type=cli.output_dir, default=os.path.join("runs", "ablation"),
                   help="folder of every run and of ablation.json/.md")
    p.add_argument("--data", type=cli.existing_dir,
                   help="data root (default: the embedded synthetic world)")
    p.add_argument("--stage1-flags", default="", help="more flags for train_stage1.py, in quotes")
    p.add_argument("--stage2-flags", default="",
                   help="more flags for every train_stage2.py run, in quotes: \"--epochs 20\"")
    p.add_argument("--eval-flags", default="", help="more flags for evaluate.py, in quotes")
    args = p.parse_args(argv)
    if len(set(args.seeds)) < len(args.seeds):
        raise BadInput("--seeds: a seed is given twice")
    t0 = time.time()
    per_seed = {seed: run_seed(args.out, seed, args) for seed in args.seeds}
    summary = summarise(per_seed, args.seeds)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.machine())
    summary["machine"] = f"{cpu}, {os.cpu_count()} cores"
    summary["minutes"] = round((time.time() - t0) / 60, 1)
    save_json(os.path.join(args.out, "ablation.json"), summary)
    text = markdown(summary)
    atomic_save(text, os.path.join(args.out, "ablation.md"), save=lambda t, f: f.write(t.encode()))
    print(text)
    print(f"wrote {args.out}/ablation.json and ablation.md ({summary['minutes']} min)")
    return summary


if __name__ == "__main__":
    cli.run_cli(main)
