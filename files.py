"""User errors, and files read and written safely: the leaf module the rest of the project builds
on.

- `BadInput` is a problem with what the user gave us: a flag value, a missing or damaged file. The
  entry points turn it into one line on stderr and exit code 2 (cli.run_cli), never into a
  traceback.
- Every write is atomic: `atomic_save` writes a temp file in the same folder, fsyncs it and renames
  it over the target, so a writer killed mid-write never leaves half a checkpoint behind.
- Every read names its file: a missing, truncated or foreign file is one BadInput that says which
  file and what is wrong with it.

The OpenShape release's .npy files are pickles: np.load(allow_pickle=True) can run code, so only
read files from a source you trust (the official Hugging Face dataset). Checkpoints are read with
torch.load(weights_only=True), which unpickles tensors and plain containers only.
"""
import json
import os

import numpy as np
import torch


class BadInput(Exception):
    """A problem with what the user gave us. The message names the flag or file and the problem."""


# ---- writing -------------------------------------------------------------------------------------


def atomic_save(obj, path, save=torch.save):
    """save(obj, file) into a temp file beside `path`, fsync, then rename it over `path` (atomic on
    POSIX).

    The file gets the permissions the umask gives any new file (a mkstemp file would be private)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_npy(path, obj):
    """np.save in the release's format (pickled objects allowed), written atomically."""
    atomic_save(obj, str(path), save=lambda o, f: np.save(f, o, allow_pickle=True))


def save_json(path, obj):
    """JSON with one-space indents, written atomically."""
    atomic_save(obj, str(path), save=lambda o, f: f.write(json.dumps(o, indent=1).encode()))


def check_writable(folder, what=None):
    """Create `folder` if needed and make sure we can write into it (fail before hours of work)."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        what = what or folder
        raise BadInput(f"{what}: output folder {folder} is not writable ({e.strerror})") from None


# ---- reading -------------------------------------------------------------------------------------


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not readable JSON ({e})") from None


def load_entries(path, keys):
    """A JSON list of dicts that all have `keys` (split files, lvis.json, test_split.json)."""
    entries = load_json(path)
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and set(keys) <= e.keys() for e in entries
    ):
        raise BadInput(f"{path}: expected a JSON list of entries with keys {list(keys)}")
    return entries


def load_npy(path, item=False):
    """np.load a release file; with `item`, unwrap the pickled object (a dict in the release)."""
    try:
        arr = np.load(path, allow_pickle=True)
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except Exception as e:  # unpickling a damaged file can raise almost anything
        reason = type(e).__name__
        raise BadInput(f"{path}: cannot read ({reason}); truncated or not a .npy file") from None
    if item and (arr.shape != () or not isinstance(arr.item(), dict)):
        found = type(arr.item()).__name__ if arr.shape == () else f"an array of shape {arr.shape}"
        raise BadInput(f"{path}: expected a pickled dict, found {found}")
    return arr.item() if item else arr


def file_kind(path):
    """What a file looks like from its first bytes, for messages about a file given in the wrong
    place."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (the format torch.save writes)"
    if head.startswith(b"\x80"):
        return "a pickle"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    if head.startswith(b"ply"):
        return "a PLY point cloud"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a binary file of unknown format"


def load_torch(path, what="checkpoint"):
    """torch.load(weights_only=True) on the CPU; a missing, truncated or foreign file is BadInput
    naming it and saying what the file is instead."""
    if not os.path.isfile(path):
        raise BadInput(f"{path}: {what} file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        kind = file_kind(path)
        if "zip" in kind or "pickle" in kind:
            reason = f"damaged or truncated ({type(e).__name__})"
        else:
            reason = f"it is {kind}"
        raise BadInput(f"{path}: not a PyTorch {what}: {reason}") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a {what} dict, found {type(obj).__name__}")
    return obj
