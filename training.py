"""What the entry points share: the command line and its checks, distributed setup, presets, the learning-rate
schedule, weight-decay groups, SyncBatchNorm on CPU, the data position of a run, logs and non-finite steps.

The loops themselves stay in train_stage1.py and train_stage2.py, readable top to bottom; weight files are
checkpoint.py's business.
  - A user mistake (a bad flag value, a missing file) is one line on stderr and exit code 2, raised where the
    arguments are parsed, before any work starts (`BadInput`, `Parser`, `run_cli`).
  - One script runs alone on a CPU, on one GPU, or under torchrun (`setup_distributed`: RANK/WORLD_SIZE).
"""
import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.distributed as dist
import torch.nn as nn


class BadInput(Exception):
    """A problem with what the user gave us. The message names the flag or file and the problem."""


def run_cli(main, argv=None):
    """Call `main(argv)`; turn BadInput into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# The command line: every value is checked here, at parse time


class Parser(argparse.ArgumentParser):
    """argparse whose errors are BadInput (one line, exit code 2 through run_cli; argparse would add its usage)."""

    def __init__(self, description=None, **kw):
        super().__init__(description=description, **{"formatter_class": argparse.RawDescriptionHelpFormatter, **kw})

    def error(self, message):
        raise BadInput(message)


def number(kind=float, low=None, high=None, above=False):
    """An argparse type: an int or a finite float in [low, high] (low excluded when `above`)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        too_low = low is not None and (value <= low if above else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bounds = [f"{'>' if above else '>='} {low}" if low is not None else "", f"<= {high}" if high else ""]
            raise argparse.ArgumentTypeError(f"must be {' and '.join(b for b in bounds if b) or 'finite'}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


COUNT, POSITIVE_INT, POSITIVE, NONNEGATIVE = number(int, 0), number(int, 1), number(float, 0, above=True), number(float, 0)
FRACTION = number(float, 0, 1)


def choice(*options):
    """An argparse type: one of `options` (for preset flags, whose values go through a type)."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(options)}, got {text!r}")
        return text
    return parse


def device(text):
    """--device: cpu, cuda or cuda:N, and CUDA only where there is a GPU (N one of them)."""
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} was requested but no CUDA device is available")
    if text.startswith("cuda:") and int(text[5:]) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA devices, 0 to "
                                         f"{torch.cuda.device_count() - 1}")
    return text


def existing_file(text):
    """A file that exists (not a folder)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: {'is a folder, expected a file' if os.path.isdir(text) else 'no such file'}")
    return text


def existing_dir(text):
    """A folder that exists (not a file)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: {'is a file, expected a folder' if os.path.exists(text) else 'no such folder'}")
    return text


def output_file(text):
    """A file to write: not a folder, and the nearest existing folder above it is a writable folder. Creates
    nothing, since a later check may still fail: whoever writes the file makes its missing folders."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a folder, expected a file name")
    folder = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a folder")
    try:
        check_writable(folder, text)  # it exists: only probed
    except BadInput as e:  # as a type error argparse names the flag
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def output_dir(text):
    """A folder to write into: anything but an existing file (it is made when it is needed)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a file, expected a folder")
    return text


def check_writable(folder, what=None):
    """Create `folder` if needed and make sure we can write into it (fail before hours of work)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f".write-test-{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(folder, f".write-test-{os.getpid()}"))
    except OSError as e:
        raise BadInput(f"{what or folder}: output folder {folder} is not writable ({e.strerror})") from None


def parse_names(value, flag):
    """A comma-separated list, or a file with one name per line -> the non-empty names."""
    if os.path.isfile(value):
        with open(value) as f:
            names = [line.strip() for line in f]
    else:
        names = [s.strip() for s in value.split(",")]
    names = [s for s in names if s]
    if not names:
        raise BadInput(f"{flag} {value!r}: no labels given (a comma-separated list, or a file with one per line)")
    return names


def check_points(num_points, scaling=None, flag="--num-points"):
    """FPS picks S patch centres among the points: fewer points than patches cannot be grouped. Without a
    `scaling` (a checkpoint's size is known once it is loaded) the bound is the smallest size's patch count."""
    from model import CONFIGS
    patches = min(CONFIGS[s].num_patches for s in ([scaling] if scaling is not None else CONFIGS))
    if num_points is not None and num_points < patches:
        which = f"--scaling {scaling}" if scaling is not None else "the smallest encoder size"
        raise BadInput(f"{flag} {num_points}: fewer than the {patches} patches of {which}")


def scaling(text):
    """--scaling: a PointBERT size of model.CONFIGS, '1'..'6' or 'tiny'."""
    from model import CONFIGS
    key = int(text) if text.isdigit() else text
    if key not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown size {text!r}, choose one of {', '.join(map(str, CONFIGS))}")
    return key


# ---------------------------------------------------------------------------------------------------------
# Presets: every value of a preset is a flag; --help shows each preset's value and where it comes from


def preset_parser(description, presets, flags):
    """A Parser with one flag per preset key (default None, filled by `apply_preset`); flags[name] = (type, source)."""
    p = Parser(description)
    p.add_argument("--preset", choices=sorted(presets), help="named defaults (default: demo without --data, paper with it)")
    for name, (kind, source) in flags.items():
        shown = ", ".join(f"{k}={v[name]}" for k, v in presets.items())
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"[{shown}; source: {source}]")
    return p


def apply_preset(args, presets):
    """Fill every flag left at None from the chosen preset."""
    args.preset = args.preset or ("paper" if args.data else "demo")
    for name, value in presets[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_batch(batch_size, min_rows=1):
    """The global batch splits evenly over the processes torchrun starts (WORLD_SIZE), >= min_rows each."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world or batch_size // world < min_rows:
        raise BadInput(f"--batch-size {batch_size} (global) must split into {world} equal parts of >= {min_rows} "
                       f"shapes{' (BatchNorm needs 2)' if min_rows > 1 else ''}")


# ---------------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed(device=None):
    """Initialise torch.distributed when launched by torchrun (RANK/WORLD_SIZE set): NCCL on CUDA, gloo on CPU.
    Without torchrun: rank 0 of 1. `device` ('cpu', 'cuda') overrides the default (CUDA when available)."""
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank, local_rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def data_root(data_arg, env):
    """--data as given, or the embedded synthetic world: built once per node by local rank 0 while the other
    ranks wait (nodes need not share a file system), then found in its cache by everyone."""
    if data_arg:
        return data_arg
    from tools import synthetic
    if env.local_rank == 0:
        synthetic.ensure_world()
    if env.distributed:
        dist.barrier()
    return str(synthetic.ensure_world())


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
    and the temperature is a known mistake, so only >= 2-d weights decay unless `decay_everything`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decay_everything or p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast(device, precision):
    """One autocast context for a training forward pass: bf16 or fp16 on CUDA, nothing (fp32) otherwise."""
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def native_bf16():
    """True on CPUs with native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 inference is ~2x faster."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in f.read() for flag in (" avx512_bf16", " amx_bf16"))
    except OSError:
        return False


def precision_context(device, precision):
    """bf16 autocast for CPU inference (`auto`: where the CPU has native bf16); fp32 otherwise and on CUDA."""
    bf16 = device.type == "cpu" and (precision == "bf16" or (precision == "auto" and native_bf16()))
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), "bf16" if bf16 else "fp32"


class _CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's SyncBatchNorm is CUDA-only. This one all-reduces (sum, count), then the centred sum of squares,
    both differentiable (torch.distributed.nn), so statistics and gradients match one process on the global batch."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        dims, shape = [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n, mean = total[-1], total[:-1] / total[-1]
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def sync_batchnorm(module, device):
    """Make every BatchNorm in `module` use global-batch statistics under DDP (in place on CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
            m.__class__ = _CpuSyncBatchNorm
    return module


# ---------------------------------------------------------------------------------------------------------
# A run: its folder, its data position, its log, its non-finite steps


def start_run(args, env, stage):
    """OUT/<stage>/ checked writable, config.json (resolved flags, versions) written by the main process; the log."""
    run_dir = os.path.join(args.out or os.path.join("runs", args.preset), stage)
    if env.is_main:
        check_writable(run_dir, "--out")
        versions = {}
        for pkg in ("torch", "open_clip_torch", "numpy", "tqdm"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        info = {"args": vars(args), "python": sys.version.split()[0], "platform": platform.platform(),
                "packages": versions, "cuda": torch.version.cuda, "argv": sys.argv}
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
    return run_dir, RunLog(run_dir, env.is_main)


class RunLog:
    """Plain `key value | ...` lines on stdout plus one JSON object per line in `log.jsonl` (main process)."""

    def __init__(self, out_dir, enabled):
        self.enabled, self.path = enabled, os.path.join(out_dir, "log.jsonl")

    def __call__(self, record, echo=True):
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                             if k != "time"), flush=True)


class NonFiniteGuard:
    """Skips an update whose loss is not finite and undoes what its forward did to the BatchNorm statistics;
    stops the run after `limit` such steps in a row, leaving the last checkpoint (a good one) in place.
    The loss is all-reduced, so every rank takes the same decision."""

    def __init__(self, model, limit, log, last_checkpoint):
        self.model, self.limit, self.log, self.last_checkpoint, self.in_a_row = model, limit, log, last_checkpoint, 0

    def remember(self):
        self.buffers = [b.clone() for b in self.model.buffers()]  # a few KB of BatchNorm statistics

    def ok(self, step, loss):
        if torch.isfinite(loss).all():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), self.buffers):
                b.copy_(saved)
        self.log({"step": step, "event": "non-finite loss, step skipped", "consecutive": self.in_a_row})
        if self.in_a_row >= self.limit:
            raise SystemExit(f"stopping: {self.in_a_row} consecutive non-finite losses; last good checkpoint: "
                             f"{self.last_checkpoint}")
        return False
