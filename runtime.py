"""Where a run runs: one process or torchrun, CPU or GPU, which number format, and on what code.

- One path for every launch (nanoGPT's): without torchrun a script is rank 0 of 1; under torchrun
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) it joins a process group, NCCL on CUDA
  and gloo on the CPU. `launch_env` checks those variables where the arguments are parsed, so a
  stale or partial set is one line and exit code 2, not a traceback from init_process_group.
- SyncBatchNorm: torch's is CUDA-only; `sync_batchnorm` gives the CPU the same global-batch
  statistics.
- Precision: `auto` is bf16 autocast on CUDA and on CPUs with native bf16 arithmetic (AVX-512 BF16
  or AMX), fp32 elsewhere. The entry point resolves it once (`resolve_precision`) and opens
  `torch.autocast` itself.
- `provenance`: the code version and software a result came from, written beside every run and
  report.
"""
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.distributed as dist
import torch.nn as nn

from files import BadInput

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


# ---- launching -----------------------------------------------------------------------------------


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


def _env_int(name, low=0, high=None):
    text = os.environ[name]
    if not text.strip().isdigit() or int(text) < low or (high is not None and int(text) > high):
        bounds = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise BadInput(f"{name}={text!r}: expected {bounds} (torchrun sets it)")
    return int(text)


def launch_env():
    """(rank, local_rank, world_size) from torchrun's variables, checked before any work: a variable
    left over from another launch, or a partial set, is one line naming what is wrong and what is
    missing."""
    env = os.environ
    world = _env_int("WORLD_SIZE", low=1) if "WORLD_SIZE" in env else 1
    if world == 1:
        for name in ("RANK", "LOCAL_RANK"):
            if name in env and _env_int(name) != 0:
                raise BadInput(f"{name}={env[name]} is set but WORLD_SIZE is not (or is 1): launch "
                               f"with torchrun, or unset {name}")
        return 0, 0, 1
    missing = [n for n in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if n not in env]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise BadInput(f"WORLD_SIZE={world} is set but {', '.join(missing)} {verb} not: launch "
                       f"with torchrun, which sets them all, or unset WORLD_SIZE to run one "
                       f"process")
    rank = _env_int("RANK")
    if rank >= world:
        raise BadInput(f"RANK={rank} is not below WORLD_SIZE={world}")
    _env_int("MASTER_PORT", low=1, high=65535)
    return rank, _env_int("LOCAL_RANK"), world


SHARED_STORE_ADVICE = (
    "torchrun --max-restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 where torchrun starts, or a "
    "restarted group can read the previous group's addresses from torchrun's store and fail to "
    "connect (pytorch/pytorch#135712)")


def restarts_share_a_store():
    """torchrun may restart the workers, and they keep their keys in its own rendezvous store, which
    outlives a restart."""
    return (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def setup_distributed(device=None):
    """Join the process group when launched by torchrun, else rank 0 of 1. `device` ('cpu', 'cuda',
    'cuda:N') overrides the default, CUDA when available (each process then takes GPU
    LOCAL_RANK)."""
    rank, local_rank, world = launch_env()
    cuda = device_type(device) == "cuda"
    if cuda:
        index = int(device[5:]) if device and device.startswith("cuda:") else local_rank
        if index >= torch.cuda.device_count():
            raise BadInput(f"LOCAL_RANK={local_rank}: this machine has {torch.cuda.device_count()} "
                           f"CUDA devices (start at most that many processes per node)")
        torch.cuda.set_device(index)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if rank == 0 and "TORCHELASTIC_RUN_ID" not in os.environ:  # launched by hand, not torchrun
            print(f"waiting for the other {world - 1} processes at {where} (torch.distributed's "
                  f"timeout: 30 min)", file=sys.stderr)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if rank == 0 and first_attempt and restarts_share_a_store():
            print(SHARED_STORE_ADVICE, file=sys.stderr)
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as e:  # DistStoreError and others are RuntimeErrors
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            hint = "start all of them, e.g. with torchrun"
            if restarts_share_a_store():
                hint = SHARED_STORE_ADVICE
            raise BadInput(f"the {world} processes did not meet at MASTER_ADDR:MASTER_PORT {where} "
                           f"({reason}); {hint}") from None
    run_device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return DistInfo(rank, local_rank, world, run_device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env):
    if env.distributed:
        dist.barrier()


# ---- SyncBatchNorm on the CPU --------------------------------------------------------------------


class SumOverRanks(torch.autograd.Function):
    """all_reduce (sum) with gradient: every rank's loss depends on the sum, so the gradient that
    reaches each rank's input is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's SyncBatchNorm runs on CUDA only. This one sums (sum, count) over the ranks, then the
    centred sum of squares, both with gradient (SumOverRanks), so the statistics and the gradients
    equal one process on the global batch."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))  # every dimension but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # a (C,) statistic broadcast over x
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = SumOverRanks.apply(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        var = SumOverRanks.apply((x - mean.view(shape)).pow(2).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        x_hat = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


def sync_batchnorm(module, device):
    """Make every BatchNorm in `module` use global-batch statistics under DDP (in place on the
    CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
            m.__class__ = CpuSyncBatchNorm
    return module


# ---- precision -----------------------------------------------------------------------------------


def native_bf16(amx_only=False):
    """True on CPUs with native bf16 arithmetic: AVX-512 BF16 or AMX (only AMX with `amx_only`)."""
    flags = (" amx_bf16",) if amx_only else (" avx512_bf16", " amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        return False
    return any(flag in cpuinfo for flag in flags)


def device_type(device=None):
    """The type of the --device a run asks for, "cuda" or "cpu" (default: CUDA when available)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def resolve_precision(choice, device_type, auto_on_cuda="bf16"):
    """`auto` -> `auto_on_cuda` on CUDA; on the CPU bf16 where it is native, else fp32. Other
    choices stay."""
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return auto_on_cuda
    return "bf16" if native_bf16() else "fp32"


# ---- provenance ----------------------------------------------------------------------------------


def code_version():
    """The git commit of this checkout (with "+dirty" for uncommitted changes), or None outside
    git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def provenance():
    """What produced a result: the time, the command, the code version and the software."""
    versions = {}
    for package in ("torch", "open_clip_torch", "numpy", "tqdm", "triton"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "code": code_version(),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions, "cuda": torch.version.cuda}
