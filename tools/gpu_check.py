"""One command for the first GPU: does every path that only CUDA takes work on this machine?

Nothing in this project had run on a GPU when this was written; the CPU tests cover everything else.
This runs each CUDA-only path once, checks it against what the CPU-tested path computes, and writes
what it expected and what it got:

  1. environment: torch, CUDA, the GPU, Triton, open_clip (its parts are skipped when it is absent);
  2. kernels: the Triton grouping (kernels.py) against the PyTorch path on the GPU, at the paper's
     size: the share of identical FPS centres and ball-query neighbours (>= 99.9%), and the encoder
     output with either grouping;
  3. speed: tools/bench.py's CUDA rows, our bf16 step against the release-style fp32 step (>= 3x),
     the grouping's share of our step (<= 10%), peak memory;
  4. precision: a bf16 step's loss and gradients against an fp32 step's;
  5. collectives: a one-process NCCL group, the loss's all_gather with its gradient, a DDP step;
  6. compile: `--compile`'s torch.compile of the stage-2 model against eager, and its speed;
  7. a paper-size stage-2 run on the synthetic world (scaling 4, 10,000 points, batch 50, a few
     hundred steps) through train_stage2.main: samples/s, peak memory, the loss going down.

    python -m tools.gpu_check                   # sized for 8 minutes on one H100 (not yet timed)
    python -m tools.gpu_check --out gpu_check   # the folder of gpu_check.json and gpu_check.md

Exit code 0 when every check passed, 1 when one failed or there is no GPU. `--cpu-rehearsal` runs
the same code at toy sizes on the CPU (NCCL becomes gloo; the Triton kernels run only under
TRITON_INTERPRET=1), to test this script itself: its numbers mean nothing.
"""
import copy
import importlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

import grouping
import model
from cli import Parser, output_dir, run_cli
from loss import GatherWithGrad, contrastive_loss
from tools import bench, synthetic

# the paper's size on a GPU (the run: its per-GPU batch, its warm-up of 10 epochs of 6 steps)
GPU = dict(kernels=dict(scaling=4, B=8, N=10_000),
           speed=dict(scaling=4, B=50, N=10_000),
           precision=dict(scaling=4, B=16, N=10_000),
           compile=dict(scaling=4, B=16, N=10_000),
           run=dict(scaling=4, num_points=10_000, batch_size=50, steps=300, world_shapes=300,
                    lr=6e-4, warmup_epochs=10, log_every=10))
REHEARSAL = dict(kernels=dict(scaling="tiny", B=2, N=512),
                 speed=dict(scaling="tiny", B=4, N=512),
                 precision=dict(scaling="tiny", B=8, N=256),
                 compile=dict(scaling="tiny", B=4, N=256),
                 run=dict(scaling="tiny", num_points=256, batch_size=16, steps=12, world_shapes=96,
                          lr=3e-3, warmup_epochs=0, log_every=1))
MIN_SAME = 0.999     # share of identical indices, Triton against PyTorch (FMA order may flip ties)
MAX_OUT_DIFF = 1e-3  # encoder output, Triton against PyTorch grouping, relative to its maximum


def result(name, expected, got, ok, **extra):
    """One line of the report: ok True (pass), False (fail) or None (information, or skipped)."""
    return {"check": name, "expected": expected, "got": got,
            "status": {True: "PASS", False: "FAIL", None: "INFO"}[ok], **extra}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the checks ----------------------------------------------------------------------------------


def check_environment(device, sizes):
    rows = [result("torch", "a CUDA build", f"{torch.__version__}, CUDA {torch.version.cuda}",
                   device.type != "cuda" or torch.version.cuda is not None)]
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        rows.append(result("GPU", "one CUDA device", f"{name}, capability {capability}, "
                           f"{memory:.0f} GiB", True))
    for package in ("triton", "open_clip", "tqdm"):
        try:
            version = getattr(importlib.import_module(package), "__version__", "importable")
            rows.append(result(package, "importable", version, None))
        except ImportError:
            what = {"open_clip": "evaluate.py --labels with CLIP and tools/clip_features.py are "
                                 "skipped here", "triton": "the Triton checks fail",
                    "tqdm": "the training run is skipped"}[package]
            rows.append(result(package, "importable", f"not importable: {what}",
                               False if package == "triton" else None))
    return rows


def check_kernels(device, sizes):
    """Triton grouping against PyTorch's on the same clouds: identical indices, encoder output."""
    c = sizes["kernels"]
    import kernels

    if not kernels.AVAILABLE or (device.type == "cpu" and not kernels._INTERPRET):
        why = "skipped: Triton is not importable or, on the CPU, TRITON_INTERPRET is not set"
        return [result("Triton grouping", "Triton on CUDA (or its interpreter)", why,
                       None if device.type == "cpu" else False)]
    cfg = model.CONFIGS[c["scaling"]]
    points = bench.cloud(c["B"], c["N"], device)
    xyz = points[..., :3].contiguous()
    fps = {b: (kernels if b == "triton" else grouping).farthest_point_sample(xyz, cfg.num_patches)
           for b in ("torch", "triton")}
    centres = grouping.index_points(xyz, fps["torch"])
    neighbours = {"torch": grouping.ball_query(xyz, centres, cfg.radius, cfg.k),
                  "triton": kernels.ball_query(xyz, centres, cfg.radius, cfg.k)}
    same_fps = (fps["torch"] == fps["triton"]).float().mean().item()
    same_rows = (neighbours["torch"] == neighbours["triton"]).all(-1).float().mean().item()
    torch.manual_seed(0)
    encoder = model.PointBert(cfg).to(device).eval()
    outputs = {}
    for backend in ("torch", "triton"):
        encoder.patch_embed.backend = backend
        with torch.no_grad():
            outputs[backend] = encoder(points)
    diff = ((outputs["triton"] - outputs["torch"]).abs().max()
            / outputs["torch"].abs().max()).item()
    size = f"scaling {c['scaling']}, B={c['B']}, N={c['N']}"
    return [result("FPS centres, Triton = PyTorch", f">= {100 * MIN_SAME:.1f}% identical",
                   f"{100 * same_fps:.3f}%", same_fps >= MIN_SAME, size=size),
            result("ball-query rows, Triton = PyTorch", f">= {100 * MIN_SAME:.1f}% identical",
                   f"{100 * same_rows:.3f}%", same_rows >= MIN_SAME, size=size),
            result("encoder output, Triton vs PyTorch grouping", f"<= {MAX_OUT_DIFF} relative",
                   f"{diff:.2e}", diff <= MAX_OUT_DIFF, size=size)]


def check_speed(device, sizes):
    """tools/bench.py's CUDA rows: step speed against the release-style step, grouping share."""
    repeats = 5 if device.type == "cuda" else 1  # the rehearsal's timings mean nothing
    rows = bench.cuda_rows(sizes["speed"], device, repeats=repeats)
    out = []
    for r in rows:
        got = f"{r['ours']} (baseline {r['baseline']})" if r["baseline"] else r["ours"]
        speed = r["name"] != "cuda_grouping_time"  # that row also judges the neighbours' agreement
        out.append(result(r["what"], r["target"], got, r["status"] == "PASS",
                          note=r.get("note", ""), speed=speed))
    return out


def check_precision(device, sizes):
    """bf16 autocast against fp32 on one step (TF32 off): loss and gradients."""
    c = sizes["precision"]
    agree = bench.precision_agreement(*bench.tamm_batch(c, device))
    size = f"scaling {c['scaling']}, B={c['B']}, N={c['N']}, at initialisation"
    return [result("bf16 loss vs fp32", "<= 1e-2 relative", f"{agree['loss_rel']:.2e}",
                   agree["loss_rel"] <= 1e-2, size=size),
            result("bf16 gradients vs fp32", "cosine >= 0.9",
                   f"cosine {agree['grad_cos']:.5f}, {agree['grad_rel']:.2e} relative",
                   agree["grad_cos"] >= 0.9, size=size)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_collectives(device, sizes):
    """A one-process group (NCCL on CUDA): the loss's all_gather with gradient, and a DDP step."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        x = torch.randn(3, 4, 8, device=device, requires_grad=True)
        gathered = GatherWithGrad.apply(x)
        (gathered * 2).sum().backward()
        gather_ok = torch.equal(gathered.detach(), x.detach()) and torch.equal(x.grad,
                                                                              torch.full_like(x, 2))
        c = sizes["speed"]
        tamm, points, targets = bench.tamm_batch(dict(c, B=4), device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            tamm, device_ids=[device.index] if device.type == "cuda" else None)
        out = ddp(points)
        anchors = torch.stack([out["image"]] * 4 + [out["text"]])
        loss = contrastive_loss(anchors, targets[:, :4], tamm.scale()).loss
        loss.backward()
        ddp_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in tamm.parameters())
    finally:
        dist.destroy_process_group()
    return [result(f"{backend} all_gather with gradient (one process)", "identity forward, "
                   "gradient passed back", "as expected" if gather_ok else "different", gather_ok),
            result(f"DDP step over {backend}", "finite gradients for every parameter",
                   "finite" if ddp_ok else "missing or non-finite", ddp_ok)]


def check_compile(device, sizes):
    """torch.compile of the stage-2 model (train_stage2.py --compile) against eager, dropout off
    (compiled dropout draws other random numbers), the step time of both, and a few compiled AdamW
    steps that lower the loss."""
    c = sizes["compile"]
    tamm, points, targets = bench.tamm_batch(c, device)
    for m in tamm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    eager = copy.deepcopy(tamm)
    grouping.run_eagerly_under_compile()
    compiled = torch.compile(tamm)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step(m):
        sync(device)
        t0 = time.perf_counter()
        loss = bench.tamm_loss(m, points, targets, dtype)
        loss.backward()
        sync(device)
        return loss.item(), time.perf_counter() - t0

    t0 = time.perf_counter()
    loss_compiled, _ = step(compiled)  # the first call compiles
    compile_s = time.perf_counter() - t0
    loss_eager, _ = step(eager)
    eager_s = min(step(eager)[1] for _ in range(3))
    compiled_s = min(step(compiled)[1] for _ in range(3))
    rel = abs(loss_compiled - loss_eager) / abs(loss_eager)
    optimizer = torch.optim.AdamW(tamm.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        loss = bench.tamm_loss(compiled, points, targets, dtype)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    size = f"scaling {c['scaling']}, B={c['B']}, N={c['N']}"
    return [result("compiled loss vs eager", "<= 1e-3 relative", f"{rel:.2e}", rel <= 1e-3,
                   size=size, value=rel),
            result("compiled model trains", "loss lower after 5 AdamW steps",
                   f"{losses[0]:.4f} -> {losses[-1]:.4f}", losses[-1] < losses[0], size=size,
                   value=losses),
            result("compiled step time", "report", f"{compiled_s * 1e3:.1f} ms vs eager "
                   f"{eager_s * 1e3:.1f} ms ({eager_s / compiled_s:.2f}x); compiling took "
                   f"{compile_s:.0f} s", None, size=size, speed=True)]


def check_run(device, sizes, out_dir):
    """A stage-2 run through train_stage2.main on a synthetic world stored at the run's size."""
    c = sizes["run"]
    try:
        import train_stage2
    except ImportError as e:
        return [result("paper-size stage-2 run", "runs", f"skipped: {e}", None)]
    world = synthetic.ensure_world(num_shapes=c["world_shapes"], num_points=c["num_points"],
                                   progress=False)
    run_out = os.path.join(out_dir, "run")
    steps_per_epoch = c["world_shapes"] // c["batch_size"]
    argv = ["--data", str(world), "--out", run_out, "--no-cia", "--scaling", str(c["scaling"]),
            "--num-points", str(c["num_points"]), "--batch-size", str(c["batch_size"]),
            "--epochs", str(-(-c["steps"] // steps_per_epoch)), "--max-steps", str(c["steps"]),
            "--lr", str(c["lr"]), "--warmup-epochs", str(c["warmup_epochs"]), "--val", "none",
            "--log-every", str(c["log_every"]), "--workers", str(min(8, os.cpu_count() or 1)),
            "--precision", "bf16" if device.type == "cuda" else "fp32", "--device", str(device)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    train_stage2.main(argv)
    wall = time.time() - t0
    with open(os.path.join(run_out, "stage2", "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    losses = [r["loss"] for r in log if "loss" in r]
    rates = [r["interval_samples_s"] for r in log if "interval_samples_s" in r][1:]  # warm-up out
    first = sum(losses[:3]) / len(losses[:3])
    last = sum(losses[-3:]) / len(losses[-3:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    size = (f"scaling {c['scaling']}, {c['num_points']} points, batch {c['batch_size']}, "
            f"{c['steps']} steps")
    return [result("loss goes down", "mean of the last 3 logged < the first 3",
                   f"{first:.3f} -> {last:.3f}", last < first, size=size),
            result("training samples/s", "report",
                   f"{sum(rates) / max(1, len(rates)):.1f} (whole run {wall:.0f} s)", None,
                   size=size, speed=True),
            result("peak GPU memory", "report",
                   "n/a on the CPU" if peak is None else f"{peak:.1f} GiB", None, size=size)]


CHECKS = {"environment": check_environment, "kernels": check_kernels, "speed": check_speed,
          "precision": check_precision, "collectives": check_collectives,
          "compile": check_compile, "run": check_run}


# ---- the report ----------------------------------------------------------------------------------


def markdown(report):
    lines = ["# tools.gpu_check", "", f"{report['machine']}", "",
             "| check | expected | got | status | size |", "|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['check']} | {r['expected']} | {r['got']} | {r['status']} | "
                     f"{r.get('size', '')} |")
    lines += ["", f"{report['summary']}", ""]
    return "\n".join(lines)


def main(argv=None):
    p = Parser(__doc__.split("\n")[0])
    p.add_argument("--out", type=output_dir, default="gpu_check",
                   help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS),
                   help="checks to run")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="run every check at toy sizes on the CPU, to test this script (the numbers "
                   "mean nothing)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_rehearsal:
        print("tools.gpu_check: no GPU here (torch.cuda.is_available() is False): it checks the "
              "CUDA paths and needs one; --cpu-rehearsal tests the script itself on the CPU",
              file=sys.stderr)
        return 1
    device = torch.device("cpu" if args.cpu_rehearsal else "cuda")
    sizes = REHEARSAL if args.cpu_rehearsal else GPU
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every comparison
    torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    machine = (f"{platform.node()} | torch {torch.__version__} | "
               + (torch.cuda.get_device_name() if device.type == "cuda" else "CPU rehearsal"))
    print(machine, flush=True)
    results = []
    for name in args.only:
        t0 = time.time()
        try:
            if name == "run":
                rows = check_run(device, sizes, tempfile.mkdtemp(dir=args.out))
            else:
                rows = CHECKS[name](device, sizes)
        except Exception as e:  # one broken check must not hide the others
            detail = traceback.format_exc().strip().splitlines()[-1]
            rows = [result(name, "runs", f"raised {type(e).__name__}: {detail}", False)]
        for r in rows:
            r["seconds"] = round(time.time() - t0, 1)
            if args.cpu_rehearsal and r.pop("speed", False) and r["status"] == "FAIL":
                r["status"] = "INFO"  # a CPU rehearsal judges correctness, not speed
                r["got"] += " (speed is not judged in a CPU rehearsal)"
            r.pop("speed", None)
            print(f"{r['status']:4s} | {r['check']} | expected {r['expected']} | got {r['got']}",
                  flush=True)
        results += rows
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    summary = f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}" if failed \
        else f"all {len(results)} checks passed or reported"
    report = {"machine": machine, "rehearsal": args.cpu_rehearsal, "results": results,
              "summary": summary}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(f"{summary}\nwrote {args.out}/gpu_check.json and {args.out}/gpu_check.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
