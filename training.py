"""What the two training loops share: the optimiser and its schedule, the run's folder and record,
its log, and the bookkeeping of skipped steps and broken shapes.

The loops themselves stay in train_stage1.py and train_stage2.py, readable top to bottom; each takes
its decisions there (what to log, whether to step) and calls these helpers for the bookkeeping.
"""
import json
import math
import os
import time
import warnings

import torch

from files import load_json, save_json
from runtime import provenance

ADAMW_BETAS = (0.9, 0.999)  # training.beta1, beta2 of TAMM's configs/Pre-Training/*.yaml
ADAMW_EPS = 1e-8            # training.eps of the same configs


# ---- the optimiser and its schedule --------------------------------------------------------------


def cosine_lr(step, total_steps, warmup_steps, lr, min_lr=0.0):
    """Linear warm-up, then cosine decay to min_lr, per step (the official per-step schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, weight_decay, decay_everything=False):
    """AdamW groups. The release decays every tensor (PyTorch's default 0.01); decaying biases, norm
    parameters and the temperature is a known mistake, so only >= 2-d weights decay unless asked."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decay_everything or p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr, weight_decay, device, decay_everything=False):
    """AdamW with the official betas and eps; fused on CUDA (one kernel for every tensor,
    bench.py)."""
    groups = param_groups(model, weight_decay, decay_everything)
    return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                             fused=device.type == "cuda")


# ---- the run's folder and record -----------------------------------------------------------------


def record_start(run_dir, args, step):
    """RUN_DIR/config.json is the run's record. The first start writes it (flags, command, code
    version, software); each later start appends what it was (its step, command and changed flags)
    to "resumed", so re-running a command never erases how the run began. Call it on the main
    process, once every check has passed: nothing of a run is written before."""
    path = os.path.join(run_dir, "config.json")
    flags = {k: v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)
             for k, v in vars(args).items()}
    if step == 0 or not os.path.exists(path):
        record = {"args": flags, **provenance(), "start_step": step, "resumed": []}
    else:
        record = load_json(path)
        first = record.get("args", {})
        changed = {k: v for k, v in flags.items() if first.get(k) != v}
        start = {k: v for k, v in provenance().items() if k in ("time", "argv", "code")}
        record.setdefault("resumed", []).append({**start, "step": step, "changed_flags": changed})
    save_json(path, record)


class RunLog:
    """Plain `key value | ...` lines on stdout plus one JSON object per line in RUN_DIR/log.jsonl,
    written by the main process only."""

    def __init__(self, run_dir, enabled):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "log.jsonl")

    def __call__(self, record, echo=True):
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in record.items() if k != "time"]
            print(" | ".join(shown), flush=True)


# ---- bookkeeping of the loop ---------------------------------------------------------------------


class NonFiniteSteps:
    """The bookkeeping of steps whose loss is not finite, which the loop decides to skip: `remember`
    the BatchNorm statistics before each forward; `skip` puts them back (the forward moved them),
    logs the step and stops the run after `limit` such steps in a row, leaving the last checkpoint
    (a good one) in place."""

    def __init__(self, model, limit, log, last_checkpoint):
        self.model = model
        self.limit = limit
        self.log = log
        self.last_checkpoint = last_checkpoint
        self.in_a_row = 0
        self.saved = []

    def remember(self):
        self.saved = [b.clone() for b in self.model.buffers()]  # a few KB of BatchNorm statistics

    def reset(self):
        self.in_a_row = 0

    def skip(self, step):
        self.in_a_row += 1
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), self.saved):
                buffer.copy_(saved)
        self.log({"step": step, "event": "non-finite loss, step skipped",
                  "consecutive": self.in_a_row})
        if self.in_a_row >= self.limit:
            raise SystemExit(f"stopping: {self.in_a_row} consecutive non-finite losses; last good "
                             f"checkpoint: {self.last_checkpoint}")


class BrokenShapes:
    """Names the first broken shapes a rank meets and counts the rest: a long run that meets
    thousands of them warns a few times, and lists every one in RUN_DIR/broken_shapes.txt (one line
    each, every rank)."""

    NAMED = 10  # warnings per rank; the others are counted (skipped_shapes in the log) and listed

    def __init__(self, run_dir, rank, world_size):
        self.path = os.path.join(run_dir, "broken_shapes.txt")
        self.prefix = f"rank {rank}: " if world_size > 1 else ""
        self.seen = 0

    def note(self, batch):
        """Record the stand-ins (valid False) of a training batch from data.TrainTriplets."""
        errors = [e for e, ok in zip(batch["error"], batch["valid"].tolist()) if not ok]
        if not errors:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)  # a rank may get here first
        with open(self.path, "a") as f:
            f.writelines(e + "\n" for e in errors)
        for error in errors:
            self.seen += 1
            if self.seen <= self.NAMED:
                warnings.warn(f"{self.prefix}skipping broken shape: {error}", stacklevel=2)
            if self.seen == self.NAMED:
                warnings.warn(f"{self.prefix}further broken shapes are counted (skipped_shapes in "
                              f"the log) and listed in {self.path}", stacklevel=2)
