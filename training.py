"""What train_stage1.py and train_stage2.py share: presets on the command line, the lr schedule, weight-decay
groups, the checkpoint (resume) contract, RNG state, logs, and SyncBatchNorm that also works on CPU.

The two training loops themselves stay in their scripts, readable top to bottom (STYLE.md habit 4).
"""
import argparse
import json
import math
import os
import platform
import random
import sys
import time
from importlib import metadata

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils import BadInput, atomic_save, check_writable

# ---------------------------------------------------------------------------------------------------------
# Presets: every value of a preset is a flag; --help shows each preset's value and where it comes from.


def preset_parser(description, presets, sources, choices=None):
    """An ArgumentParser whose preset-backed flags default to None and are filled by `apply_preset`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets),
                   help="named defaults (default: demo without --data, paper with it)")
    for name, value in presets["paper"].items():
        shown = ", ".join(f"{k}={v[name]}" for k, v in presets.items())
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                       choices=(choices or {}).get(name), help=f"[{shown}; source: {sources[name]}]")
    return p


def apply_preset(args, presets):
    """Fill every flag left at None from the chosen preset."""
    args.preset = args.preset or ("paper" if args.data else "demo")
    for name, value in presets[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ---------------------------------------------------------------------------------------------------------
# Optimisation


def cosine_lr(step, total_steps, warmup_steps, lr, min_lr=0.0):
    """Linear warm-up then cosine decay, per step (the official per-step schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, weight_decay, decay_everything=False):
    """AdamW groups. The release decays every tensor (PyTorch default 0.01); decaying biases, norm parameters
    and the temperature is a known mistake, so by default only >= 2-d weights decay (`decay_everything`
    reproduces the release)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decay_everything or p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast(device, precision):
    """One autocast context for the forward pass: bf16 or fp16 on CUDA, nothing (fp32) otherwise."""
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------------------------
# SyncBatchNorm: torch's version is CUDA-only; this one all-reduces the statistics with gloo on CPU.


class _CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are over the global batch: all_reduce of (sum, count) then of the
    centred sum of squares, both differentiable (torch.distributed.nn), so gradients match one process."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def sync_batchnorm(model, device):
    """Under DDP, make every BatchNorm use global-batch statistics (the release uses SyncBatchNorm)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats:
            module.__class__ = _CpuSyncBatchNorm
    return model


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: the resume contract (STYLE.md habit 8)


def rng_state():
    """This process's RNG streams, as plain tensors/ints (loadable with weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [key.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(env):
    """Every rank's RNG state, in rank order (a collective: call it on every rank before saving)."""
    state = rng_state()
    if not env.distributed:
        return [state]
    states = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def save_latest(run_dir, model, optimizer, scaler, step, epoch, batch_in_epoch, args, env):
    """RUN_DIR/latest.pt: model (unwrapped), optimizer, scaler, position in the data, flags and every rank's RNG,
    written atomically by the main process. A collective (the RNG gather): call it on every rank."""
    rng = all_rng_states(env)
    if not env.is_main:
        return
    module = model.module if hasattr(model, "module") else model
    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    path = os.path.join(run_dir, "latest.pt")
    atomic_save({"model": module.state_dict(), "config": module.config(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "step": step, "epoch": epoch,
                 "batch_in_epoch": batch_in_epoch, "args": vars(args), "rng": rng}, path)


def resume(path, model, optimizer, scaler, env):
    """Load a checkpoint written by save_latest into the (unwrapped) model and optimizer, restore this
    rank's RNG streams, and return (step, epoch, batch_in_epoch). A checkpoint of another model is BadInput."""
    from model import load_checkpoint_file, load_exact
    ckpt = load_checkpoint_file(path)
    if ckpt.get("config") != model.config():
        raise BadInput(f"{path}: checkpoint of another model ({ckpt.get('config')}); "
                       f"this run builds {model.config()} (another --out, or matching flags)")
    load_exact(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    if len(rng) == env.world_size:
        set_rng_state(rng[env.rank])
    else:  # another world size: the data order is still exact, the dropout stream is re-derived
        torch.manual_seed(ckpt["step"] * 1_000_003 + env.rank)
    if env.is_main:
        print(f"resumed from {path} at step {ckpt['step']} (epoch {ckpt['epoch']}, batch {ckpt['batch_in_epoch']})")
    return ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]


def data_root(data_arg, env):
    """--data as given (checked by the reader), or the embedded synthetic world, built once per node by its
    local rank 0 while the other ranks wait (nodes need not share a file system)."""
    if data_arg:
        return data_arg
    import synthetic
    if env.local_rank == 0:
        synthetic.ensure_world()
    if env.distributed:
        dist.barrier()
    return str(synthetic.ensure_world())


def find_resume(resume, out_dir):
    """--resume PATH, else `latest.pt` in the output folder if a previous run left one, else None."""
    if resume:
        if not os.path.exists(resume):
            raise BadInput(f"{resume}: --resume checkpoint not found")
        return resume
    latest = os.path.join(out_dir, "latest.pt")
    return latest if os.path.exists(latest) else None


# ---------------------------------------------------------------------------------------------------------
# Logs


class RunLog:
    """Plain `key value | ...` lines on stdout plus one JSON object per line in `log.jsonl` (main process)."""

    def __init__(self, out_dir, enabled):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.jsonl")

    def __call__(self, record, echo=True):
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                             if k != "time"), flush=True)


def start_run(args, env, stage):
    """Global batch -> per-process batch, OUT/<stage>/ checked writable, config.json written, the run log.
    Returns (run_dir, local_batch, log)."""
    if args.batch_size % env.world_size:
        raise BadInput(f"--batch-size {args.batch_size} (global) is not divisible by {env.world_size} processes")
    run_dir = os.path.join(args.out or os.path.join("runs", args.preset), stage)
    if env.is_main:
        check_writable(run_dir)
        write_run_info(run_dir, args)
    return run_dir, args.batch_size // env.world_size, RunLog(run_dir, env.is_main)


def write_run_info(out_dir, args):
    """config.json with the resolved flags and the package versions, written once at start."""
    versions = {}
    for pkg in ("torch", "open_clip_torch", "numpy", "tqdm"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info = {"args": vars(args), "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions, "cuda": torch.version.cuda, "argv": sys.argv}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)


def all_ranks_have_rows(batch, env, min_rows=1):
    """False if this or any other rank got fewer than `min_rows` loadable shapes (one tiny all_reduce)."""
    ok = torch.tensor([float(len(batch["index"]) >= min_rows)], device=env.device)
    if env.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def all_reduce_mean(x):
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def retrieval_top1(queries, keys):
    """Top-1 of query i retrieving key i among all keys, by cosine similarity."""
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    return (sim.argmax(1) == torch.arange(len(queries), device=sim.device)).float().mean().item()
