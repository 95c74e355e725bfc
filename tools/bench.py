"""\
Speed, memory and kernel launches of our encoder, grouping and loss, beside release-style baselines.

Every timing runs both sides in this process on the same inputs: one warm-up call each (whose
outputs are compared: identical FPS / ball-query indices, encoder output within 1e-4 and gradients
within 1e-3 relative), then --repeats interleaved rounds A, B, A, B, ...; a row shows medians and
the ratio baseline / ours (of time, peak memory or launches; for samples/s ours / baseline). The
baselines are tools/reference.py: the release's PointNet++ grouping and attention on our weights,
and the release's loop over the loss targets. The `train` rows time a whole stage-2 step (forward,
the 5-target loss, backward, AdamW) in fp32 against bf16 autocast, and report how far the bf16
loss and gradients are from the fp32 ones (`precision_agreement`, also used by the tests and by
tools/gpu_check.py).

Peak extra memory: on CUDA max_memory_allocated around the call; on CPU a fresh child process from
multiprocessing's forkserver (a child forked from here would inherit this heap) fixes glibc's mmap
threshold at 64 KiB (every tensor is its own mapping, released when freed), warms up, trims the
heap, restarts the high-water mark (/proc/self/clear_refs 5) and reports VmHWM - VmRSS of one call,
in MB (2**20 bytes).

Kernel launches: a TorchDispatchMode counts the aten operations of one training step (forward, loss,
backward, optimizer step) that would each launch a kernel on a GPU (every op but views and
allocations), and the host synchronisations among them. Ours is the CUDA path: the Triton grouping
(kernels.py, one launch per kernel, run by Triton's interpreter on CPU in a subprocess) and fused
AdamW; eager is the PyTorch grouping (what runs on CPU) with foreach AdamW; the release-style step
adds the release's grouping, attention and per-target loss.

Timing noise: on a busy machine with few cores, OpenMP's worker thread waits for a CPU at every
parallel region, so loops of small ops slow down at random; --threads 1 gives steadier numbers
there.

    # CPU rows, 15-30 minutes on 2 cores; writes bench.json
    python -m tools.bench
    # some rows
    python -m tools.bench --only train launches
    # + the GPU rows
    python -m tools.bench --device cuda
    # tiny sizes, for tests
    python -m tools.bench --quick
"""
import collections
import copy
import ctypes
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import grouping
import model
import runtime
from cli import COUNT, POSITIVE_INT, Parser, existing_dir, output_file, run_cli
from cli import device as device_flag
from loss import contrastive_loss
from tools import synthetic
from tools.reference import baseline_encoder, per_target_loss, release_ball_query, release_fps

FULL = dict(ball=dict(B=16, S=384, N=10_000, k=64, radius=0.2), fps=dict(B=16, N=10_000, S=384),
            encoder=dict(scaling=4, B=8, N=10_000, repeats=3), eval=dict(scaling=4, B=8, N=10_000),
            launches=dict(scaling=4, B=2, N=10_000), cuda=dict(scaling=4, B=50, N=10_000),
            train=dict(scaling=4, B=8, N=10_000), reader_batches=10)
QUICK = dict(ball=dict(B=2, S=32, N=1000, k=16, radius=0.2), fps=dict(B=2, N=1000, S=32),
             encoder=dict(scaling="tiny", B=2, N=1024, repeats=3),
             eval=dict(scaling="tiny", B=2, N=1024), launches=dict(scaling="tiny", B=2, N=512),
             cuda=dict(scaling="tiny", B=4, N=1024), train=dict(scaling="tiny", B=4, N=512),
             reader_batches=3)


# ---- measuring -----------------------------------------------------------------------------------

def median_ratio(baseline, ours):
    """Medians of two lists of measurements and their ratio baseline / ours."""
    b, o = statistics.median(baseline), statistics.median(ours)
    return b, o, b / o if o > 0 else math.inf


def timed(fn, device):
    """Seconds of one call; on CUDA between events around the call (launch gaps included)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved(fns, repeats, device):
    """One warm-up call of each fn, then `repeats` rounds A, B, ... -> ({name: warm-up output},
    {name: [seconds]})."""
    outs, times = {name: fn() for name, fn in fns.items()}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return outs, times


def _vm(field):
    with open("/proc/self/status") as f:
        # kB -> MB
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def _child_peak(conn, build, args, side):
    """In a fresh process: build the inputs, warm up, then VmHWM - VmRSS around one call (see the
    top)."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    fn = build(*args, torch.device("cpu"))[side]
    fn()  # warm-up: library code pages and one-off caches are not the operation's memory
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart VmHWM at the current VmRSS (Linux >= 4.0)
    before = _vm("VmRSS")
    fn()
    conn.send(_vm("VmHWM") - before)


def peak_extra_mb(build, args, side, device):
    """Peak memory (MB) that one call of build(*args, device)[side] allocates beyond its inputs."""
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
    # the server imports torch and this file once; children start warm
    ctx.set_forkserver_preload([__name__])
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
        raise RuntimeError(f"memory measurement of {getattr(build, '__name__', build)} {side} "
                           f"failed (see stderr)")
    return peak


def close(a, b, rel):
    """max |a - b| <= rel * max |b| (relative to the tensor's scale, for long fp32 chains)."""
    return bool((a.float() - b.float()).abs().max() <= rel * b.float().abs().max().clamp(min=1e-12))


def row(name, what, size, target, baseline, ours, ratio, passed, equal=True, status=None, **extra):
    status = status or ("PASS" if passed and equal
                        else "MISS" if equal else "MISS (outputs differ)")
    return dict(name=name, what=what, size=size, target=target, baseline=baseline, ours=ours,
                ratio=ratio, status=status, equal=equal, **extra)


def ratio_row(name, what, size, target, measured, fmt, minimum, equal=True, **extra):
    """A row of {"baseline": [...], "ours": [...]}: their medians shown by `fmt`, PASS at
    baseline / ours >= minimum."""
    b, o, ratio = median_ratio(measured["baseline"], measured["ours"])
    return row(name, what, size, target, fmt(b), fmt(o), ratio, ratio >= minimum, equal, **extra)


def cloud(B, N, device, seed=0):
    """(B, N, 6) xyz + rgb, xyz inside the unit sphere (as the reader normalises shapes)."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(B, N, 3, generator=g)
    xyz = xyz / xyz.norm(dim=-1).amax(dim=1)[:, None, None]
    return torch.cat([xyz, torch.rand(B, N, 3, generator=g)], -1).to(device)


def fmt_s(t):
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def fmt_mb(mb):
    return f"{mb:.0f} MB"


# ---- the operations timed (module level: the memory child imports them) --------------------------

def ball_query_ops(c, device):
    xyz = cloud(c["B"], c["N"], device)[..., :3]
    centres = grouping.index_points(xyz, grouping.farthest_point_sample(xyz, c["S"]))
    return {"baseline": lambda: release_ball_query(c["radius"], c["k"], xyz, centres),
            "ours": lambda: grouping.ball_query(xyz, centres, c["radius"], c["k"])}


def fps_ops(c, device):
    xyz = cloud(c["B"], c["N"], device)[..., :3]
    return {"baseline": lambda: release_fps(xyz, c["S"]),
            "ours": lambda: grouping.farthest_point_sample(xyz, c["S"])}


def train_step(enc, points):
    """One encoder forward + backward (a squared-norm stand-in for the loss) -> output and
    gradients. autograd.grad: the gradients live only as long as the result, so no call starts with
    the last one's allocated."""
    out = enc(points)
    grads = torch.autograd.grad(out.float().square().mean(), list(enc.parameters()))
    return [out.detach().float(), *(g.float() for g in grads)]


def encoder_ops(c, device):
    torch.manual_seed(0)
    ours = model.PointBert(model.CONFIGS[c["scaling"]]).to(device).train()
    base, pts = baseline_encoder(ours), cloud(c["B"], c["N"], device)
    return {"baseline": lambda: train_step(base, pts), "ours": lambda: train_step(ours, pts)}


def tamm_batch(c, device, seed=0):
    """A stage-2 model (scaling c) and a batch: points (B, N, 6), 5 target sets (5, B, 1280)."""
    torch.manual_seed(seed)
    tamm = model.TAMM(model.CONFIGS[c["scaling"]]).to(device).train()
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randn(5, c["B"], 1280, generator=g).to(device)
    return tamm, cloud(c["B"], c["N"], device, seed), targets


def tamm_loss(tamm, points, targets, dtype=None):
    """The stage-2 loss of train_stage2.py's step: forward under autocast `dtype` (None: fp32),
    IAA(f) against 4 view targets and TAA(f) against the text target."""
    with torch.autocast(points.device.type, dtype=dtype, enabled=dtype is not None):
        out = tamm(points)
    anchors = torch.stack([out["image"]] * 4 + [out["text"]])
    return contrastive_loss(anchors, targets, tamm.scale()).loss


def tamm_step_ops(c, device):
    """One whole training step (forward, loss, backward, AdamW) in fp32 and under bf16 autocast,
    each on its own copy of the same initial weights."""
    tamm, points, targets = tamm_batch(c, device)

    def make(dtype):
        m = copy.deepcopy(tamm)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            loss = tamm_loss(m, points, targets, dtype)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step
    return {"fp32": make(None), "bf16": make(torch.bfloat16)}


def precision_agreement(tamm, points, targets, dtype=torch.bfloat16, seed=0):
    """One step's loss and gradients under autocast `dtype` against fp32, from the same weights,
    batch and dropout masks -> {"loss_rel": |L - L32| / |L32|, "grad_cos": cosine of the two
    flattened gradients, "grad_rel": |g - g32| / |g32|}, every parameter's gradient in one vector.

    At initialisation the encoder gives nearly the same feature for every shape, and the heads'
    BatchNorm divides by that tiny spread, which magnifies rounding: measure a trained model too."""

    def loss_and_grads(dt):
        tamm.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same dropout masks in both runs
        loss = tamm_loss(tamm, points, targets, dt)
        loss.backward()
        grads = torch.cat([p.grad.flatten().double() for p in tamm.parameters()])
        return loss.item(), grads

    l32, g32 = loss_and_grads(None)
    low, glow = loss_and_grads(dtype)
    tamm.zero_grad(set_to_none=True)
    return {"loss_rel": abs(low - l32) / abs(l32),
            "grad_cos": torch.nn.functional.cosine_similarity(glow, g32, dim=0).item(),
            "grad_rel": ((glow - g32).norm() / g32.norm()).item()}


def same_indices(outs):
    return torch.equal(outs["baseline"], outs["ours"])


def same_step(a, b, rel=1e-4, grad_rel=1e-3):
    """Encoder parity in fp32: outputs within `rel` of their scale, all gradients together within
    `grad_rel` (relative L2): BatchNorm sums ~10^6 rows in another order; in float64 the two agree
    to 1e-15 (tests)."""
    ga, gb = torch.cat([g.flatten() for g in a[1:]]), torch.cat([g.flatten() for g in b[1:]])
    return close(a[0], b[0], rel) and bool((ga - gb).norm() <= grad_rel * gb.norm())


# ---- kernel launches -----------------------------------------------------------------------------

NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
             "detach", "resize_", "set_", "_unsafe_view", "alias", "sym_size", "sym_stride",
             "sym_numel", "is_same_size"}
# .item(), bool(tensor), data-dependent shapes
SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}


class LaunchCounter(TorchDispatchMode):
    """Counts, per phase of a step, the aten operations that launch a kernel on a GPU and the host
    syncs."""

    def __init__(self):
        super().__init__()
        self.counts, self.phase, self.quiet = collections.Counter(), "forward", 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.quiet and not func.is_view and name not in NO_KERNEL:
            self.counts[self.phase] += 1
            self.counts[self.phase + " syncs"] += name in SYNCS
        return out


def count_launches(side, c):
    """Launches of one TAMM training step (scaling c, B, N) by phase, for side
    ours / eager / release."""
    torch.manual_seed(0)
    m = model.TAMM(model.CONFIGS[c["scaling"]]).train()
    if side == "release":
        m.encoder = baseline_encoder(m.encoder)
    m.encoder.patch_embed.backend = "triton" if side == "ours" else "torch"
    counter, phase = LaunchCounter(), lambda name: setattr(counter, "phase", name)
    from tools import reference

    def in_grouping(fn):  # FPS, ball query and the gathers of PatchEmbed, counted apart
        def counted(*a, **kw):
            phase("grouping")
            try:
                return fn(*a, **kw)
            finally:
                phase("forward")
        return counted
    model.group = in_grouping(model.group)
    for name in ("release_fps", "release_ball_query", "release_index_points"):
        setattr(reference, name, in_grouping(getattr(reference, name)))
    if side == "ours":
        import kernels
        for name in ("farthest_point_sample", "ball_query", "group"):
            # one kernel: one launch, whatever the interpreter does
            def launch(*a, _fn=getattr(kernels, name), **kw):
                counter.counts[counter.phase] += 1
                counter.quiet += 1
                try:
                    return _fn(*a, **kw)
                finally:
                    counter.quiet -= 1
            setattr(kernels, name, launch)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-4,
                                  **({"fused": True} if side == "ours" else {"foreach": True}))
    points, targets = cloud(c["B"], c["N"], "cpu"), torch.randn(5, c["B"], 1280)

    def step():
        out = m(points)
        phase("loss")
        anchors = torch.stack([out["image"]] * 4 + [out["text"]])
        loss = per_target_loss(anchors, targets, m.scale())[0] if side == "release" else \
            contrastive_loss(anchors, targets, m.scale()).loss
        phase("backward")
        loss.backward()
        phase("optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phase("forward")
    step()  # the first step also creates the optimizer's state: count a later one
    counter.counts.clear()
    with counter:
        step()
    return dict(counter.counts)  # the patches above die with the subprocess


def bench_launches(S, device, args, rates):
    """Each side in a subprocess: TRITON_INTERPRET=1 has to be set before kernels.py is imported."""
    c, counts = S["launches"], {}
    for side in ("ours", "eager", "release"):
        code = (f"import json; from tools import bench; "
                f"print(json.dumps(bench.count_launches({side!r}, {c!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "TRITON_INTERPRET": "1"},
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode:
            raise RuntimeError(f"launch count of {side} failed: {proc.stderr[-2000:]}")
        counts[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    total = {s: sum(v for k, v in n.items() if "syncs" not in k) for s, n in counts.items()}
    size = f"scaling {c['scaling']} B={c['B']} N={c['N']}"
    o, e, r = counts["ours"], counts["eager"], counts["release"]
    note = "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in sorted(n.items()))
                     for s, n in counts.items())
    return [row("launches_grouping", "grouping launches per forward (FPS + ball query + gather)",
                size, "<= 4", f"eager {e['grouping']}, release {r['grouping']}",
                str(o["grouping"]), e["grouping"] / o["grouping"], o["grouping"] <= 4,
                counts=counts),
            row("launches_loss", "launches of the loss forward (5 targets)", size, "<= 73",
                f"eager {e['loss']}, release {r['loss']}", str(o["loss"]), r["loss"] / o["loss"],
                o["loss"] <= 73),
            row("launches_step", "launches per training step (fwd, loss, bwd, AdamW)", size,
                "<= 1,200", f"eager {total['eager']}, release {total['release']}",
                str(total["ours"]), total["eager"] / total["ours"], total["ours"] <= 1200,
                note=note),
            row("syncs_forward", "host syncs inside the forward", size, "0",
                f"eager {e.get('grouping syncs', 0)}",
                str(o.get("grouping syncs", 0) + o.get("forward syncs", 0)), None,
                o.get("grouping syncs", 0) + o.get("forward syncs", 0) == 0)]


# ---- the rows ------------------------------------------------------------------------------------

def compare(build, c, device, repeats, mem_repeats):
    """Both sides of build(c, device): ({side: warm-up output}, {side: [s]}, {side: [peak MB]})."""
    mem = {side: [peak_extra_mb(build, (c,), side, device) for _ in range(mem_repeats)]
           for side in build(c, device)}
    outs, times = interleaved(build(c, device), repeats, device) if repeats else ({}, {})
    return outs, times, mem


def bench_ball_query(S, device, args, rates):
    c = S["ball"]
    outs, times, mem = compare(ball_query_ops, c, device, args.repeats, args.mem_repeats)
    size, equal = f"B={c['B']} S={c['S']} N={c['N']} k={c['k']}", same_indices(outs)
    return [ratio_row("ball_query_memory", "ball query peak memory", size, ">= 5x lower", mem,
                      fmt_mb, 5, equal),
            ratio_row("ball_query_time", "ball query time", size, ">= 3x faster", times, fmt_s, 3,
                      equal)]


def bench_fps(S, device, args, rates):
    c = S["fps"]
    outs, times, _ = compare(fps_ops, c, device, args.repeats, 0)
    return [ratio_row("fps_time", "FPS time", f"B={c['B']} N={c['N']} S={c['S']}", ">= 2x faster",
                      times, fmt_s, 2, same_indices(outs))]


def bench_encoder(S, device, args, rates):
    c = S["encoder"]
    outs, times, mem = compare(encoder_ops, c, device, min(args.repeats, c["repeats"]),
                               min(args.mem_repeats, 1))
    size = f"scaling {c['scaling']} B={c['B']} N={c['N']}"
    equal = same_step(outs["ours"], outs["baseline"])
    rate = c["B"] / statistics.median(times["ours"])
    return [ratio_row("encoder_step_time", "encoder train step", size, ">= 1.15x samples/s", times,
                      lambda t: f"{c['B'] / t:.2f} /s", 1.15, equal, samples_per_s=rate),
            ratio_row("encoder_step_memory", "encoder train step peak memory", size,
                      ">= 1.3x lower", mem, fmt_mb, 1.3, equal)]


def bench_eval(S, device, args, rates):
    """CPU inference in fp32 and in bf16 autocast (evaluate.py --precision), eval mode, and their
    agreement."""
    c = S["eval"]
    torch.manual_seed(0)
    enc, pts = model.PointBert(model.CONFIGS[c["scaling"]]).eval(), cloud(c["B"], c["N"], "cpu")

    def run(dtype):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return enc(pts).float()
    outs, times = interleaved({"fp32": lambda: run("fp32"), "bf16": lambda: run("bf16")},
                              args.repeats, torch.device("cpu"))
    b, o, ratio = median_ratio(times["fp32"], times["bf16"])
    cos = torch.nn.functional.cosine_similarity(outs["fp32"], outs["bf16"]).min().item()
    return [row("eval_bf16", "CPU eval samples/s, bf16 vs fp32",
                f"scaling {c['scaling']} B={c['B']} N={c['N']}", ">= 1.5x, cosine >= 0.9999",
                f"{c['B'] / b:.2f} /s", f"{c['B'] / o:.2f} /s", ratio,
                ratio >= 1.5 and cos >= 0.9999,
                note=f"min cosine of the backbone features bf16 vs fp32: {cos:.6f}")]


def bench_train(S, device, args, rates):
    """A whole stage-2 training step on the CPU, bf16 autocast against fp32 (train_stage2.py
    --precision): samples/s and how far the bf16 loss and gradients are from fp32's."""
    c = S["train"]
    cpu = torch.device("cpu")
    _, times = interleaved(tamm_step_ops(c, cpu), min(args.repeats, 3), cpu)
    b, o, ratio = median_ratio(times["fp32"], times["bf16"])
    agree = precision_agreement(*tamm_batch(c, cpu))
    amx = runtime.native_bf16(amx_only=True)
    status = None if amx else "info"  # the target is for CPUs with AMX
    return [row("train_bf16", "CPU training step samples/s, bf16 vs fp32",
                f"scaling {c['scaling']} B={c['B']} N={c['N']}", ">= 2x on CPUs with AMX",
                f"{c['B'] / b:.2f} /s", f"{c['B'] / o:.2f} /s", ratio, ratio >= 2, status=status,
                note=f"bf16 vs fp32 on one step at initialisation: loss {agree['loss_rel']:.2e} "
                f"relative, gradient cosine {agree['grad_cos']:.5f}, gradient "
                f"{agree['grad_rel']:.2e} relative; AMX: {amx}", **agree)]


def bench_cuda(S, device, args, rates):
    """On a GPU: our step (bf16 autocast, SDPA, Triton grouping, fused AdamW) against the
    release-style fp32 step (no TF32); the grouping's share of our step; Triton against PyTorch
    grouping (time and agreement)."""
    c = S["cuda"]
    size = f"scaling {c['scaling']} B={c['B']} N={c['N']}"
    if not torch.cuda.is_available():
        return [row(n, w, size, t, "", "", None, False, None, "skipped", note="no CUDA device")
                for n, w, t in (
                    ("cuda_step", "training step, ours bf16 vs release-style fp32",
                     ">= 3x samples/s"),
                    ("cuda_grouping_share", "grouping share of our step", "<= 10%"),
                    ("cuda_grouping_time", "FPS + ball query, Triton vs PyTorch", "report"))]
    return cuda_rows(c, torch.device("cuda"), args.repeats)


def cuda_rows(c, dev, repeats):
    """bench_cuda's measurements on `dev` (tools/gpu_check.py rehearses them on the CPU too)."""
    size = f"scaling {c['scaling']} B={c['B']} N={c['N']}"
    torch.manual_seed(0)
    ours = model.PointBert(model.CONFIGS[c["scaling"]]).to(dev).train()
    base, pts = baseline_encoder(ours), cloud(c["B"], c["N"], dev)
    xyz, cfg = pts[..., :3].contiguous(), ours.cfg

    def ours_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return train_step(ours, pts)
    groupings = {"torch": lambda: grouping.group(xyz, pts, cfg.num_patches, cfg.radius, cfg.k,
                                                 backend="torch"),
                 "triton": lambda: grouping.group(xyz, pts, cfg.num_patches, cfg.radius, cfg.k,
                                                  backend="triton")}
    outs, times = interleaved({"baseline": lambda: train_step(base, pts), "ours": ours_step,
                               **groupings}, repeats, dev)
    ot = statistics.median(times["ours"])
    share = statistics.median(times["triton"]) / statistics.median(times["ours"])
    gt, gk, gr = median_ratio(times["torch"], times["triton"])
    agree = (outs["torch"][1] == outs["triton"][1]).float().mean().item()
    mem = {s: peak_extra_mb(encoder_ops, (c,), s, dev) for s in ("baseline", "ours")}
    return [ratio_row("cuda_step", "training step, ours bf16 vs release-style fp32", size,
                      ">= 3x samples/s", times, lambda t: f"{c['B'] / t:.1f} /s", 3,
                      note=f"peak MB fp32 eager {mem}"),
            row("cuda_grouping_share", "grouping share of our step", size, "<= 10%", "",
                f"{100 * share:.1f}% of {fmt_s(ot)}", share, share <= 0.1),
            row("cuda_grouping_time", "FPS + ball query + gather, Triton vs PyTorch", size,
                ">= 99.9% same neighbours", fmt_s(gt), fmt_s(gk), gr, agree >= 0.999,
                note=f"grouped neighbours identical: {100 * agree:.3f}%")]


def bench_data(S, device, args, rates):
    """Samples/s of the training reader (TrainTriplets + 4 workers) next to the encoder step it
    feeds."""
    c = S["encoder"]
    root = args.world or synthetic.ensure_world(progress=False)
    loader, _ = data.make_train_loader(data.TrainTriplets(root, num_points=c["N"]), c["B"],
                                       workers=args.workers)
    batches = iter(loader)
    next(batches)  # worker start-up is not reading
    t0 = time.perf_counter()
    n = sum(len(b["points"]) for _, b in zip(range(S["reader_batches"]), batches))
    rate, step = n / (time.perf_counter() - t0), rates.get("encoder")
    size = f"{args.workers} workers, B={c['B']}, N={c['N']}"
    if step is None:
        return [row("data_reader", "data reader", size, "report", "", f"{rate:.1f} /s", None, True,
                    status="info")]
    return [row("data_reader", "data reader vs the encoder step", size,
                ">= 1x the step's samples/s", f"step {step:.1f} /s", f"{rate:.1f} /s", rate / step,
                rate >= step, samples_per_s=rate)]


# ---- output --------------------------------------------------------------------------------------

def machine_info(device):
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.machine())
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), device=str(device),
                load_avg=[round(x, 2) for x in os.getloadavg()])
    return info | ({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {})


def print_table(rows):
    cols = [("what", 48), ("size", 26), ("target", 24), ("baseline", 28), ("ours", 22),
            ("ratio", 8), ("status", 6)]
    print("  ".join(name.ljust(w) for name, w in cols))
    for r in rows:
        vals = [r["what"], r["size"], r["target"], r["baseline"], r["ours"],
                ("" if r["ratio"] is None
                 else f"{r['ratio']:.2f}" + ("" if "share" in r["name"] else "x")),
                r["status"]]
        print("  ".join(str(v).ljust(w) for v, (_, w) in zip(vals, cols)).rstrip())
    for r in rows:
        if "note" in r:
            print(f"  note, {r['what']}: {r['note']}")


ROWS = {"ball_query": bench_ball_query, "fps": bench_fps, "encoder": bench_encoder,
        "launches": bench_launches, "eval": bench_eval, "train": bench_train, "cuda": bench_cuda,
        "data": bench_data}


def main(argv=None):
    ap = Parser(__doc__.split("\n")[0])
    ap.add_argument("--device", type=device_flag, default="cpu",
                    help="cpu or cuda (the CUDA rows run whenever a GPU exists)")
    ap.add_argument("--out", type=output_file, default="bench.json",
                    help="JSON results (bench*.json is git-ignored)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    ap.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run")
    ap.add_argument("--repeats", type=POSITIVE_INT, default=5,
                    help="timed rounds per side, after one warm-up")
    ap.add_argument("--mem-repeats", type=POSITIVE_INT, default=2,
                    help="peak-memory measurements per side")
    ap.add_argument("--workers", type=COUNT, default=4, help="data reader workers")
    ap.add_argument("--world", type=existing_dir,
                    help="synthetic world for the reader row (default: the cache)")
    ap.add_argument("--threads", type=POSITIVE_INT,
                    help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.world and "data" in args.only:
        data.check_split(args.world, "train_all")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # fp32 means fp32: the parity checks compare fp32 results
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    S, info = QUICK if args.quick else FULL, machine_info(device)
    print("machine: " + " | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    rows, rates = [], {}
    for name in [r for r in ROWS if r in args.only]:
        t0 = time.perf_counter()
        new = ROWS[name](S, device, args, rates)
        rates |= {name: r["samples_per_s"] for r in new if "samples_per_s" in r}
        rows += new
        print(f"done: {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print_table(rows)
    # checked, not made, at parse time
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(machine=info, quick=args.quick, repeats=args.repeats, rows=rows), f,
                  indent=1)
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    run_cli(main)
