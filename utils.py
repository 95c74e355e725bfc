"""Small shared helpers: user-facing errors, distributed setup, atomic checkpoint files.

Every entry point (train_stage1.py, train_stage2.py, evaluate.py, data.py) uses these so that
 - a user mistake (bad path, corrupt file, wrong checkpoint) ends with one line on stderr and exit code 2,
   never a traceback (`BadInput` + `run_cli`);
 - the same script runs alone on a CPU, on one GPU, or under `torchrun` (`setup_distributed`);
 - a checkpoint on disk is either the old one or the new one, never half of each (`atomic_save`).
"""
import os
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.distributed as dist


class BadInput(Exception):
    """A problem with what the user gave us. The message names the file (or flag) and the problem."""


def run_cli(main, argv=None):
    """Call `main(argv)`; turn BadInput into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
    """Initialise torch.distributed when launched by torchrun (RANK/WORLD_SIZE set); NCCL on CUDA, gloo on CPU.

    Without torchrun this is a no-op and returns rank 0 of 1. `device` ('cpu'/'cuda') overrides the default
    (CUDA when available)."""
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise BadInput("--device cuda was requested but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_info():
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def atomic_save(obj, path, save=torch.save):
    """save(obj, file) to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(folder):
    """Create `folder` if needed and make sure we can write into it (fail before hours of training)."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise BadInput(f"{folder}: output folder is not writable ({e.strerror})") from None


def hub_offline():
    """HF_HUB_OFFLINE as the Hugging Face client reads it (checked at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(endpoint, timeout=5.0):
    """True if a TCP connection to the Hub's host opens within `timeout` s. Without network the hub client
    retries for 25-50 s before giving up, which reads as a hang; the thread bounds slow name resolution too."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    answered = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(answered)
