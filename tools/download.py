"""Downloads from the Hugging Face Hub: the OpenShape training data and the released checkpoints.

- The data: the dataset OpenShape/openshape-training-data (about 205 GB compressed: meta_data.zip,
  ShapeNet, 3D-FUTURE, ABO and 160 Objaverse archives), resumable, optionally unpacked into the data
  root.
- The weights: TAMM's released checkpoints (zhihao406/tamm-models) and OpenShape's PointBERT, by
  name (`evaluate.py --ckpt tamm-ensemble`), fetched once into the Hugging Face cache.
Without network every path fails in seconds with one line (`hub_check`), not after the hub client's
retries.

    # one archive, to look around
    python -m tools.download --out /data/openshape --only meta_data --unpack
    # everything, resumable
    python -m tools.download --out /data/openshape --unpack
"""
import fnmatch
import importlib
import os
import shutil
import socket
import tarfile
import threading
import zipfile
from urllib.parse import urlparse

from tqdm import tqdm

from cli import Parser, output_dir, run_cli
from files import BadInput, check_writable

HF_DATASET = "OpenShape/openshape-training-data"
DOWNLOAD_PARTS = {"meta_data": "meta_data.zip", "shapenet": "ShapeNet.tar.gz",
                  "objaverse": "Objaverse/*", "3d-future": "3D-FUTURE.tar.gz", "abo": "ABO.tar.gz"}
NAMED_CHECKPOINTS = {  # released weights by name -> (Hugging Face repo, file)
    "tamm-ensemble": ("zhihao406/tamm-models", "tamm_pointbert_ensemble.pt"),
    "tamm-no-lvis": ("zhihao406/tamm-models", "tamm_pointbert_no_lvis.pt"),
    "tamm-shapenet": ("zhihao406/tamm-models", "tamm_pointbert_shapenet.pt"),
    "openshape-pointbert": ("OpenShape/openshape-pointbert-vitg14-rgb", "model.pt"),
}
HUB_TIMEOUT = 5.0  # seconds to wait for the Hub before saying there is no network


def hub_reachable(endpoint, timeout=HUB_TIMEOUT):
    """True if a TCP connection to the Hub's host opens within `timeout` s (in a thread: name
    resolution can hang)."""
    url, answered = urlparse(endpoint), []

    def probe():
        try:
            socket.create_connection((url.hostname,
                                      url.port or (443 if url.scheme == "https" else 80)),
                                     timeout).close()
            answered.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(answered)


def hub_check(what, how="check the network connection"):
    """BadInput naming `what` unless the Hub can be asked now: HF_HUB_OFFLINE is unset and its host
    answers."""
    from huggingface_hub import constants
    if (constants.is_offline_mode()
            or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")):
        raise BadInput(f"{what}: cannot download from the Hugging Face Hub, HF_HUB_OFFLINE is set; "
                       f"{how}")
    if not hub_reachable(constants.ENDPOINT):
        raise BadInput(f"{what}: cannot download from the Hugging Face Hub, cannot reach "
                       f"{constants.ENDPOINT} (no network?); {how}")


def resolve_checkpoint(ckpt):
    """A local path, or one of NAMED_CHECKPOINTS -> the path of the file in the Hugging Face
    cache."""
    if os.path.exists(ckpt) or ckpt not in NAMED_CHECKPOINTS:  # a local file wins over a name
        return ckpt
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    repo, filename = NAMED_CHECKPOINTS[ckpt]
    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    hub_check(f"--ckpt {ckpt} ({repo}/{filename})",
              "download it where there is network and pass the file path")
    try:
        return hf_hub_download(repo, filename)
    except Exception as e:  # the hub's HTTP, not-found and offline errors; OSError for the disk
        raise BadInput(f"--ckpt {ckpt}: downloading {repo}/{filename} failed "
                       f"({(str(e).splitlines() or [''])[0][:160]})") from None


def _network_errors():
    """What the hub client raises when the network is down; its HTTP library depends on its
    version."""
    from huggingface_hub.errors import HfHubHTTPError
    # ConnectionError covers OfflineModeIsEnabled
    errors = [ConnectionError, TimeoutError, HfHubHTTPError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"),
                         ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except ImportError:
            pass
    return tuple(errors)


def unpack(out, archives):
    """Extract downloaded .tar.gz/.zip archives into `out` once (a marker under out/.unpacked/
    remembers it)."""
    os.makedirs(os.path.join(out, ".unpacked"), exist_ok=True)
    for name in tqdm(archives, desc="unpack", unit="archive"):
        marker = os.path.join(out, ".unpacked", name.replace("/", "_") + ".done")
        if os.path.exists(marker):
            continue
        if name.endswith(".zip"):
            with zipfile.ZipFile(os.path.join(out, name)) as z:
                z.extractall(out)
        else:
            with tarfile.open(os.path.join(out, name)) as t:
                t.extractall(out, filter="data")  # refuse absolute paths and links out of `out`
        open(marker, "w").close()


def download(out, parts=tuple(DOWNLOAD_PARTS), do_unpack=False):
    """Fetch parts of the OpenShape release into `out` (resumable: finished files are kept and
    skipped)."""
    from huggingface_hub import HfApi, snapshot_download
    check_writable(out, "--out")
    patterns = [DOWNLOAD_PARTS[p] for p in parts]
    hub_check(HF_DATASET)
    try:
        info = HfApi().dataset_info(HF_DATASET, files_metadata=True, timeout=30)
        files = [s for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
        total, free = sum(s.size or 0 for s in files), shutil.disk_usage(out).free
        print(f"{HF_DATASET}: {len(files)} files, {total / 1e9:.1f} GB to fetch into {out} "
              f"({free / 1e9:.0f} GB free{'' if free > total else ' - NOT ENOUGH'})")
        snapshot_download(HF_DATASET, repo_type="dataset", local_dir=out, allow_patterns=patterns)
    except _network_errors() as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BadInput(f"{HF_DATASET}: cannot download from the Hugging Face Hub ({reason}); "
                       "check the network") from None
    except OSError as e:  # disk full, permissions
        raise BadInput(f"{out}: download failed ({e})") from None
    if do_unpack:
        unpack(out, sorted(s.rfilename for s in files if s.rfilename.endswith((".zip", ".tar.gz"))))


def main(argv=None):
    p = Parser(f"Fetch the OpenShape training data from the Hugging Face dataset {HF_DATASET}.")
    p.add_argument("--out", type=output_dir, required=True,
                   help="data root to download into (--data of training)")
    p.add_argument("--only", nargs="+", choices=list(DOWNLOAD_PARTS), default=list(DOWNLOAD_PARTS),
                   help="parts to fetch (default: all, about 205 GB)")
    p.add_argument("--unpack", action="store_true",
                   help="extract the archives into --out after the download")
    args = p.parse_args(argv)
    download(args.out, args.only, args.unpack)


if __name__ == "__main__":
    run_cli(main)
