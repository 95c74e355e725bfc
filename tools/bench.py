"""Measured speed and memory of our encoder, grouping and loss, side by side with release-style baselines (issue 7).

Every timing runs both sides in this process on the same inputs: one warm-up call each (whose outputs are
compared: identical FPS / ball-query indices, loss value and gradients within 1e-5, encoder output within 1e-4
and gradients within 1e-3 relative: see `same_step`), then `--repeats` interleaved rounds A, B, A, B, ...; the
table shows medians and the ratio baseline / ours (of time or peak memory; for samples/s that is ours / baseline).

The baselines are written here, in the style of the release (OpenShape's PointNet++ utilities, ppat.py, train.py):
  - `release_fps`: the per-step Python loop with a boolean-mask update (started at point 0, not a random point,
    so the indices can be compared);
  - `release_ball_query`: the (B, S, N) int64 index tensor, masked with N and sorted;
  - `per_target_loss`: per target, normalise, logits, two F.cross_entropy calls, summed;
  - `baseline_encoder(enc)`: a copy of our PointBert with the SAME weights whose Attention modules compute
    softmax(QK^T)V written out in fp32 and whose PatchEmbed runs the release grouping (the functions above,
    advanced-indexing gather) with a non-inplace ReLU.

Peak extra memory: on CUDA, `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the memory
allocated before the call. On CPU PyTorch keeps no allocator statistics, so every measurement runs in a fresh
child process and reads /proc/self/status there. The child is forked from multiprocessing's forkserver, a clean
process started for the purpose: a child forked from this process would inherit its heap, whose freed but still
resident blocks glibc hands out again, so the reading would depend on what ran before (+130 MB on the ball query
after the loss rows). The child builds the inputs, fixes glibc's mmap threshold at 64 KiB (every tensor gets its
own mapping and leaves the resident set when freed), runs the operation once as a warm-up (library code pages and
one-off caches are not the operation's memory), returns free heap pages (malloc_trim), restarts the high-water
mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0), reads VmRSS, runs the operation again and reports
VmHWM - VmRSS in MB (2**20 bytes).

Targets (issue 7): ball query >= 5x less memory and >= 3x faster; FPS >= 2x faster; fused loss >= 2x faster
(P=5, B=1024) and >= 2x less memory (B=4096); encoder step (scaling 4, B=8, N=10k) >= 1.15x samples/s and
>= 1.3x less memory; on CUDA, bf16 + SDPA (+ --compile) >= 3x the fp32 (no TF32) eager step and FPS + ball
query <= 20% of it. The data reader (synthetic world, 4 workers) is compared with the encoder step rate: it keeps
up if its samples/s is at least the step's. A growth table repeats grouping (N = 2k..20k) and loss (B = 256..4096);
bench-growth.png is drawn only when matplotlib happens to be installed. On CUDA the grouping share is the median
of FPS + ball query alone (CUDA events, same batch) over the median bf16 step.

Timing noise: on a busy machine with few cores, OpenMP's worker thread waits for a CPU at every parallel region,
so loops of small ops (the release FPS above all) slow down 10-50x at random. The machine line records the load
average; `--threads 1` (or OMP_WAIT_POLICY=PASSIVE) gives steadier numbers there.

    python bench.py                                  # CPU, 10-25 minutes on 2 shared cores; writes bench.json
    python bench.py --threads 1 --only fps loss      # steadier on a loaded machine
    python bench.py --device cuda --compile          # GPU rows as well
    python bench.py --quick --only fps ball_query    # tiny sizes, a few rows
"""
import argparse
import copy
import ctypes
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
import types
import warnings

import torch
import torch.nn.functional as F

import data
import model
from loss import contrastive_loss, per_target_loss
from tools import synthetic
from tools.reference import baseline_encoder, release_ball_query, release_fps
from training import BadInput, run_cli

# Sizes of the issue 7 table; QUICK is for tests (seconds on CPU).
FULL = dict(ball=dict(B=16, S=384, N=10_000, k=64, radius=0.2), fps=dict(B=16, N=10_000, S=384),
            loss_time=dict(P=5, B=1024, D=1280), loss_mem=dict(P=5, B=4096, D=1280),
            encoder=dict(scaling=4, B=8, N=10_000, repeats=3, mem_repeats=1),  # ~30-50 s a step on 2 cores
            encoder_cuda=dict(scaling=4, B=50, N=10_000),
            growth_N=(2000, 5000, 10_000, 20_000), growth_B=(256, 1024, 4096), reader_batches=10)
QUICK = dict(ball=dict(B=2, S=32, N=1000, k=16, radius=0.2), fps=dict(B=2, N=1000, S=32),
             loss_time=dict(P=2, B=64, D=32), loss_mem=dict(P=2, B=128, D=32),
             encoder=dict(scaling="tiny", B=2, N=1024, repeats=3, mem_repeats=1),
             encoder_cuda=dict(scaling="tiny", B=4, N=1024),
             growth_N=(500, 1000), growth_B=(32, 64), reader_batches=3)
ROWS = ["ball_query", "fps", "loss", "encoder", "encoder_cuda", "data", "growth"]  # encoder_cuda: + grouping share
LOGIT_SCALE = 14.28  # the temperature at initialisation (official config)


# ---- measuring ------------------------------------------------------------------------------------------

def median_ratio(baseline, ours):
    """Medians of two lists of measurements and their ratio baseline / ours."""
    b, o = statistics.median(baseline), statistics.median(ours)
    return b, o, b / o if o > 0 else math.inf


def timed(fn, device):
    """Seconds of one call; on CUDA measured with events around the call (includes launch gaps)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns, repeats, device):
    """One warm-up call of each fn (outputs returned for the equality checks), then `repeats` rounds A, B, ...

    Returns ({name: warm-up output}, {name: [seconds]})."""
    outs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return outs, times


def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child_peak(conn, build, args, side):
    """In a fresh process: build the inputs, warm up, then VmHWM - VmRSS around one call (see the top)."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc: every block >= 64 KiB is its own mapping, returned on free
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    fn = build(*args, torch.device("cpu"))[side]
    fn()  # warm-up: library code pages and one-off caches are not the operation's memory
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart the high-water mark VmHWM at the current VmRSS (Linux >= 4.0)
    before = _vm("VmRSS")
    fn()
    conn.send(_vm("VmHWM") - before)


def peak_extra_mb(build, args, side, device):
    """Peak memory (MB = 2**20 bytes) that one call of build(*args, device)[side] allocates beyond its inputs."""
    if device.type == "cuda":
        fn = build(*args, device)[side]
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # the server imports torch and this file once; children start warm
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_peak, args=(send, build, args, side))
    child.start()
    send.close()
    try:
        peak = receive.recv()
    except EOFError:
        peak = None
    child.join()
    if child.exitcode != 0 or peak is None:
        raise RuntimeError(f"memory measurement of {getattr(build, '__name__', build)} {side} failed (see stderr)")
    return peak


def compare(build, args, device, repeats, mem_repeats):
    """Both sides of build(*args, device): ({side: warm-up output}, {side: [s]}, {side: [peak MB]}), interleaved."""
    fns = build(*args, device)
    mem = {side: [] for side in fns}
    for _ in range(mem_repeats):
        for side in fns:
            mem[side].append(peak_extra_mb(build, args, side, device))
    outs, times = interleaved(fns, repeats, device) if repeats else ({}, {})
    return outs, times, mem


def close(a, b, rel):
    """max |a - b| <= rel * max |b| (relative to the tensor's scale, for long fp32 chains)."""
    return bool((a.float() - b.float()).abs().max() <= rel * b.float().abs().max().clamp(min=1e-12))


def row(name, what, size, target, baseline, ours, ratio, passed, equal=True, **extra):
    status = "PASS" if passed and equal else "MISS" if equal else "MISS (outputs differ)"
    return dict(name=name, what=what, size=size, target=target, baseline=baseline, ours=ours,
                ratio=ratio, status=status, equal=equal, **extra)


def skipped(name, what, size, target, note):
    return dict(name=name, what=what, size=size, target=target, baseline="", ours="", ratio=None,
                status="skipped", equal=None, note=note)


def cloud(B, N, device, seed=0):
    """(B, N, 6) xyz + rgb, xyz inside the unit sphere (as the reader normalises shapes)."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(B, N, 3, generator=g)
    xyz = xyz / xyz.norm(dim=-1).amax(dim=1)[:, None, None]
    return torch.cat([xyz, torch.rand(B, N, 3, generator=g)], -1).to(device)


def fmt_s(t):
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


# ---- the rows -------------------------------------------------------------------------------------------

def ball_query_ops(c, device):
    xyz = cloud(c["B"], c["N"], device)[..., :3]
    centres = model.index_points(xyz, model.farthest_point_sample(xyz, c["S"]))
    return {"baseline": lambda: release_ball_query(c["radius"], c["k"], xyz, centres),
            "ours": lambda: model.ball_query(xyz, centres, c["radius"], c["k"])}


def fps_ops(c, device):
    xyz = cloud(c["B"], c["N"], device)[..., :3]
    return {"baseline": lambda: release_fps(xyz, c["S"]), "ours": lambda: model.farthest_point_sample(xyz, c["S"])}


def loss_ops(c, device):
    """fwd+bwd of both losses. Targets are frozen CLIP features (no grad); anchors and the temperature train.
    With c["chunk"], also ours with that chunk_size (train_stage2.py --loss-chunk), as "chunked"."""
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(c["P"], c["B"], c["D"], generator=g)
    targets = (anchors + 2 * torch.randn(anchors.shape, generator=g)).to(device)
    anchors = anchors.to(device).requires_grad_()
    log_scale = torch.tensor(math.log(LOGIT_SCALE), device=device, requires_grad=True)

    def run(loss_fn):
        loss = loss_fn(anchors, targets, log_scale.exp())
        return (loss.detach(), *torch.autograd.grad(loss, [anchors, log_scale]))
    fns = {"baseline": lambda: run(lambda a, t, s: per_target_loss(a, t, s)[0]), "ours": lambda: run(lambda a, t, s: contrastive_loss(a, t, s).loss)}
    if c.get("chunk"):
        fns["chunked"] = lambda: run(lambda a, t, s: contrastive_loss(a, t, s, chunk_size=c["chunk"]).loss)
    return fns


def train_step(enc, points):
    """One encoder forward + backward (a squared-norm stand-in for the loss); returns output and gradients.

    autograd.grad instead of backward(): the gradients live only as long as the result, so no call starts with
    the previous call's gradients allocated (a training loop's zero_grad(set_to_none=True) does the same)."""
    out = enc(points)
    grads = torch.autograd.grad(out.float().square().mean(), list(enc.parameters()))
    return [out.detach().float(), *(g.float() for g in grads)]


def encoder_ops(c, device):
    torch.manual_seed(0)
    ours = model.PointBert(model.CONFIGS[c["scaling"]]).to(device).train()
    base = baseline_encoder(ours)
    pts = cloud(c["B"], c["N"], device)
    return {"baseline": lambda: train_step(base, pts), "ours": lambda: train_step(ours, pts)}


def same_indices(outs):
    return torch.equal(outs["baseline"], outs["ours"])


def same_loss(outs):
    """Loss and gradients within 1e-5, absolute and relative to each tensor's scale (the anchor gradients are
    ~1e-5 themselves)."""
    return all(torch.allclose(b, o, rtol=0, atol=1e-5) and close(o, b, 1e-5)
               for b, o in zip(outs["baseline"], outs["ours"]))


def same_step(a, b, rel=1e-4, grad_rel=1e-3):
    """Encoder parity in fp32: outputs within `rel` of their scale, all gradients together within `grad_rel`
    (relative L2). BatchNorm sums ~10^6 rows in another order, so single gradients differ by rounding; in float64
    the two encoders agree to 1e-15 (tests/test_bench.py)."""
    ga, gb = torch.cat([g.flatten() for g in a[1:]]), torch.cat([g.flatten() for g in b[1:]])
    return close(a[0], b[0], rel) and bool((ga - gb).norm() <= grad_rel * gb.norm())


def bench_ball_query(S, device, args):
    c = S["ball"]
    outs, times, mem = compare(ball_query_ops, (c,), device, args.repeats, args.mem_repeats)
    bm, om, mr = median_ratio(mem["baseline"], mem["ours"])
    bt, ot, tr = median_ratio(times["baseline"], times["ours"])
    size, equal = f"B={c['B']} S={c['S']} N={c['N']} k={c['k']}", same_indices(outs)
    return [row("ball_query_memory", "ball query peak memory", size, ">= 5x lower", f"{bm:.0f} MB", f"{om:.0f} MB",
                mr, mr >= 5, equal),
            row("ball_query_time", "ball query time", size, ">= 3x faster", fmt_s(bt), fmt_s(ot), tr, tr >= 3, equal)]


def bench_fps(S, device, args):
    c = S["fps"]
    outs, times, _ = compare(fps_ops, (c,), device, args.repeats, 0)
    b, o, ratio = median_ratio(times["baseline"], times["ours"])
    return [row("fps_time", "FPS time", f"B={c['B']} N={c['N']} S={c['S']}", ">= 2x faster", fmt_s(b), fmt_s(o),
                ratio, ratio >= 2, same_indices(outs))]


def bench_loss(S, device, args):
    ct, cm = S["loss_time"], S["loss_mem"]
    outs, times, _ = compare(loss_ops, (ct,), device, args.repeats, 0)
    cm = dict(cm, chunk=cm["B"] // 4)
    _, _, mem = compare(loss_ops, (cm,), device, 0, args.mem_repeats)
    bt, ot, tr = median_ratio(times["baseline"], times["ours"])
    bm, om, mr = median_ratio(mem["baseline"], mem["ours"])
    cmb = statistics.median(mem["chunked"])
    return [row("loss_time", "fused loss fwd+bwd time", "P={P} B={B} D={D}".format(**ct), ">= 2x faster",
                fmt_s(bt), fmt_s(ot), tr, tr >= 2, same_loss(outs)),
            row("loss_memory", "fused loss peak memory", "P={P} B={B} D={D}".format(**cm), ">= 2x lower",
                f"{bm:.0f} MB", f"{om:.0f} MB", mr, mr >= 2, chunked_mb=cmb,
                note=f"default chunk_size=None; with chunk_size={cm['chunk']}: {cmb:.0f} MB, {bm / cmb:.2f}x")]


def bench_encoder(S, device, args):
    c = S["encoder"]
    outs, times, mem = compare(encoder_ops, (c,), device, min(args.repeats, c["repeats"]),
                               min(args.mem_repeats, c["mem_repeats"]))
    equal = same_step(outs["ours"], outs["baseline"])
    bt, ot, tr = median_ratio(times["baseline"], times["ours"])
    bm, om, mr = median_ratio(mem["baseline"], mem["ours"])
    size = f"scaling {c['scaling']} B={c['B']} N={c['N']}"
    return [row("encoder_step_time", "encoder train step", size, ">= 1.15x samples/s", f"{c['B'] / bt:.2f} /s",
                f"{c['B'] / ot:.2f} /s", tr, tr >= 1.15, equal, samples_per_s=c["B"] / ot),
            row("encoder_step_memory", "encoder train step peak memory", size, ">= 1.3x lower", f"{bm:.0f} MB",
                f"{om:.0f} MB", mr, mr >= 1.3, equal)]


def bench_encoder_cuda(S, device, args):
    """bf16 autocast + SDPA (+ compiled blocks) vs the fp32 eager baseline, and the grouping share of the step."""
    c = S["encoder_cuda"]
    size = f"scaling {c['scaling']} B={c['B']} N={c['N']} bf16"
    if not torch.cuda.is_available():
        note = "no CUDA device"
        return [skipped("encoder_cuda", "encoder train step, CUDA", size, ">= 3x samples/s", note),
                skipped("grouping_share", "FPS + ball query share of the step", size, "<= 20%", note)]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ours = model.PointBert(model.CONFIGS[c["scaling"]]).to(dev).train()
    base = baseline_encoder(ours)
    pts = cloud(c["B"], c["N"], dev)
    equal = same_step(train_step(ours, pts[:2]), train_step(base, pts[:2]))  # fp32 parity before the bf16 timing
    if args.compile:  # the transformer blocks only: the grouping's Python loop would be unrolled 384 times
        for blk in ours.blocks:
            blk.compile()

    def ours_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return train_step(ours, pts)

    def grouping():
        xyz = pts[..., :3]
        centres = model.index_points(xyz, model.farthest_point_sample(xyz, ours.cfg.num_patches))
        return model.ball_query(xyz, centres, ours.cfg.radius, ours.cfg.k)

    _, times = interleaved({"baseline": lambda: train_step(base, pts), "ours": ours_step, "grouping": grouping},
                           args.repeats, dev)
    bt, ot, tr = median_ratio(times["baseline"], times["ours"])
    share = statistics.median(times["grouping"]) / ot
    name = "bf16 + SDPA" + (" + compile" if args.compile else "")
    return [row("encoder_cuda", f"encoder train step, CUDA ({name})", size, ">= 3x samples/s",
                f"{c['B'] / bt:.1f} /s", f"{c['B'] / ot:.1f} /s", tr, tr >= 3, equal, samples_per_s=c["B"] / ot),
            row("grouping_share", "FPS + ball query share of the step", size, "<= 20%", "",
                f"{100 * share:.1f}% of {fmt_s(ot)}", share, share <= 0.2)]


def bench_data(S, device, args, rates):
    """Samples/s of the training reader (TrainTriplets + make_train_loader, 4 workers) on the synthetic world,
    next to the encoder step it feeds: the CUDA step when one was measured, else the step on --device."""
    key = "encoder_cuda" if "encoder_cuda" in rates else "encoder"
    c = S[key]
    root = args.world or synthetic.ensure_world(progress=False)
    ds = data.TrainTriplets(root, num_points=c["N"])
    with warnings.catch_warnings():  # DataLoader warns when workers > cores; 4 is the row's setting
        warnings.filterwarnings("ignore", message=".*worker processes in total.*")
        loader, _ = data.make_train_loader(ds, c["B"], workers=args.workers)
        batches = iter(loader)
        next(batches)  # worker start-up is not reading
        t0, n = time.perf_counter(), 0
        for _, batch in zip(range(S["reader_batches"]), batches):
            n += len(batch["points"])
        rate = n / (time.perf_counter() - t0)
        del batches
    size = f"{args.workers} workers, B={c['B']}, N={c['N']}"
    if key not in rates:
        return [dict(row("data_reader", "data reader", size, "report", "", f"{rate:.1f} /s", None, True,
                         samples_per_s=rate), status="info")]
    step = rates[key]
    return [row("data_reader", "data reader vs encoder step", size, ">= 1x the step's samples/s",
                f"{key} {step:.1f} /s", f"{rate:.1f} /s", rate / step, rate >= step, samples_per_s=rate)]


def bench_growth(S, device, args):
    """Both sides and their ratio as N grows (grouping) and as B grows (loss); fewer repeats than the main rows."""
    reps, out = max(1, args.repeats // 2), []

    def add(what, size, unit, samples, equal):
        b, o, r = median_ratio(samples["baseline"], samples["ours"])
        out.append(dict(what=what, size=size, baseline=b, ours=o, ratio=r, unit=unit, equal=equal))
    for N in S["growth_N"]:
        outs, times, _ = compare(fps_ops, (dict(S["fps"], N=N),), device, reps, 0)
        add("FPS time", f"N={N}", "s", times, same_indices(outs))
        outs, times, mem = compare(ball_query_ops, (dict(S["ball"], N=N),), device, reps, 1)
        add("ball query time", f"N={N}", "s", times, same_indices(outs))
        add("ball query memory", f"N={N}", "MB", mem, same_indices(outs))
    for B in S["growth_B"]:
        outs, times, mem = compare(loss_ops, (dict(S["loss_time"], B=B),), device, reps, 1)
        add("loss time", f"B={B}", "s", times, same_loss(outs))
        add("loss memory", f"B={B}", "MB", mem, same_loss(outs))
    return out


# ---- output ---------------------------------------------------------------------------------------------

def machine_info(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), device=str(device), load_avg=[round(x, 2) for x in os.getloadavg()])
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows):
    cols = [("what", 34), ("size", 28), ("target", 26), ("baseline", 22), ("ours", 20), ("ratio", 9), ("status", 6)]
    print("  ".join(name.ljust(w) for name, w in cols))
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}" + ("" if r["name"] == "grouping_share" else "x")
        vals = [r["what"], r["size"], r["target"], r["baseline"], r["ours"], ratio, r["status"]]
        print("  ".join(str(v).ljust(w) for v, (_, w) in zip(vals, cols)).rstrip())
    for r in rows:
        if "note" in r:
            print(f"  note, {r['what']}: {r['note']}")


def print_growth(growth, out_path):
    print("\ngrowth (baseline / ours, median):")
    for g in growth:
        show = fmt_s if g["unit"] == "s" else (lambda v: f"{v:.0f} MB")
        print(f"  {g['what']:<18} {g['size']:<8} {show(g['baseline']):>10} {show(g['ours']):>10} "
              f"{g['ratio']:>7.2f}x" + ("" if g["equal"] else "  outputs differ"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, prefix in zip(axes, ("N=", "B=")):
        for what in dict.fromkeys(g["what"] for g in growth if g["size"].startswith(prefix)):
            pts = [(int(g["size"][2:]), g["ratio"]) for g in growth if g["what"] == what]
            ax.plot(*zip(*pts), marker="o", label=what)
        ax.set(xlabel=prefix[0], ylabel="baseline / ours", xscale="log")
        ax.legend()
    png = os.path.splitext(out_path)[0] + "-growth.png"
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the CUDA rows run whenever a GPU exists)")
    ap.add_argument("--out", default="bench.json", help="JSON results (bench*.json is git-ignored)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    ap.add_argument("--only", nargs="+", choices=ROWS, default=ROWS, help="rows to run")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per side, after one warm-up")
    ap.add_argument("--mem-repeats", type=int, default=2, help="peak-memory measurements per side")
    ap.add_argument("--workers", type=int, default=4, help="data reader workers (issue 7: 4)")
    ap.add_argument("--world", default=None, help="synthetic world for the reader row (default: build/reuse the cache)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks in the CUDA row")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device is available")
    # fp32 means fp32: cuDNN would run the baseline's 1x1 convs in TF32 (matmuls, ours included, are fp32 by
    # default), and the parity checks compare fp32 results
    torch.backends.cudnn.allow_tf32 = False
    S = QUICK if args.quick else FULL
    info = machine_info(device)
    print("machine: " + " | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    benches = {"ball_query": bench_ball_query, "fps": bench_fps, "loss": bench_loss, "encoder": bench_encoder,
               "encoder_cuda": bench_encoder_cuda}
    rows, growth, rates = [], [], {}
    for name in [r for r in ROWS if r in args.only]:
        t0 = time.perf_counter()
        if name == "growth":
            growth = bench_growth(S, device, args)
        else:
            new = bench_data(S, device, args, rates) if name == "data" else benches[name](S, device, args)
            for r in new:
                if r["status"] == "skipped":
                    print(f"note: {r['name']} skipped ({r['note']})", flush=True)
                elif "samples_per_s" in r and name != "data":
                    rates[name] = r["samples_per_s"]
            rows += new
        print(f"done: {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print_table(rows)
    if growth:
        print_growth(growth, args.out)
    with open(args.out, "w") as f:
        json.dump(dict(machine=info, quick=args.quick, repeats=args.repeats, rows=rows, growth=growth), f, indent=1)
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    run_cli(main)
