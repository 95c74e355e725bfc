"""What a run reads and writes on disk: files read and written safely, the resume contract (weights, optimizer,
RNG and data position), the released TAMM and OpenShape checkpoints, the CIA.

- Files: `atomic_save` and `save_npy` write a temp file and rename it into place (a killed writer never leaves
  half a file); `load_json`, `load_entries` and `load_npy` turn a missing or damaged file into one line naming it.
- `save_latest` / `resume`: RUN_DIR/latest.pt holds the unwrapped model, its config, the optimizer, the grad
  scaler, the step, the flags and every rank's RNG state, so a resumed run replays the same arithmetic.
- The data position is a function of the step: `ShardedSampler` (resumable mid-epoch) or `KnnBatchSampler`
  (OpenShape's hard negatives) under `make_train_loader`, and `endless_batches`; `make_eval_loader` puts every
  sample on exactly one rank.
- `load_pretrained`: our stage-2 checkpoint, a released TAMM checkpoint (`state_dict` + `image_alignment_adapter`
  + `text_alignment_adapter` + `logit_scale`, every key under DDP's `module.`) or OpenShape's PointBERT
  (`state_dict` with `module.ppat.*` and `module.proj.*`) -> a TAMM model. The release's module names come from
  OpenShape's src/models/ppat.py (PreNorm/Sequential wrappers, hence the numeric indices); `release_key_table`
  maps them to ours, one row per module.
- `load_cia`: the frozen CLIP Image Adapter of stage 1 (ours, or the release's `adapter.fc.*`).

Weights are read with torch.load(weights_only=True): no arbitrary unpickling. The release's .npy files are
pickles: read them only from a source you trust.
"""
import json
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from adapters import ClipImageAdapter
from model import TAMM, EncoderConfig, CONFIGS
from training import BadInput


# ---- files, read and written safely --------------------------------------------------------------------------

def atomic_save(obj, path, save=torch.save):
    """save(obj, file) to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX). The
    file gets the permissions of the umask, as any other file (mkstemp's would be private)."""
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
    if not isinstance(entries, list) or not all(isinstance(e, dict) and set(keys) <= e.keys() for e in entries):
        raise BadInput(f"{path}: expected a JSON list of entries with keys {list(keys)}")
    return entries


def load_npy(path, item=False):
    """np.load a release file; with `item`, unwrap the pickled object (a dict in the release)."""
    try:
        arr = np.load(path, allow_pickle=True)
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except Exception as e:  # unpickling a damaged file can raise almost anything
        raise BadInput(f"{path}: cannot read ({type(e).__name__}); truncated or not a .npy file") from None
    if item and (arr.shape != () or not isinstance(arr.item(), dict)):
        found = type(arr.item()).__name__ if arr.shape == () else f"an array of shape {arr.shape}"
        raise BadInput(f"{path}: expected a pickled dict, found {found}")
    return arr.item() if item else arr


def save_npy(path, obj):
    """np.save in the release's format (pickles allowed), written atomically."""
    atomic_save(obj, str(path), save=lambda o, f: np.save(f, o, allow_pickle=True))


# ---- the resume contract -------------------------------------------------------------------------------------

def rng_state():
    """This process's RNG streams as plain tensors and numbers (loadable with weights_only=True)."""
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


def unwrap(model):
    """The module inside DDP and torch.compile wrappers: what checkpoints store."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_latest(run_dir, model, optimizer, scaler, step, steps_per_epoch, args, env, **extra):
    """RUN_DIR/latest.pt after `step` steps (every rank's RNG is gathered: call it on every rank)."""
    states = [rng_state()]
    if env.distributed:
        states = [None] * env.world_size
        dist.all_gather_object(states, rng_state())
    if not env.is_main:
        return
    model = unwrap(model)
    epoch, batch_in_epoch = divmod(step, steps_per_epoch)
    atomic_save({"model": model.state_dict(), "config": model.config(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "args": vars(args), "rng": states, **extra}, os.path.join(run_dir, "latest.pt"))


def find_resume(resume_arg, run_dir):
    """--resume PATH, else RUN_DIR/latest.pt if a previous run left one, else None."""
    latest = os.path.join(run_dir, "latest.pt")
    return resume_arg or (latest if os.path.exists(latest) else None)


def resume(path, model, optimizer, scaler, env):
    """Load a save_latest checkpoint into the (unwrapped) model and optimizer and restore this rank's RNG;
    returns the step. A checkpoint of another model is BadInput."""
    ckpt = load_checkpoint_file(path)
    if ckpt.get("config") != model.config():
        raise BadInput(f"{path}: checkpoint of another model ({ckpt.get('config')}); "
                       f"this run builds {model.config()} (another --out, or matching flags)")
    load_exact(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # empty when fp16 loss scaling is off
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == env.world_size:
        set_rng_state(ckpt["rng"][env.rank])
    else:  # another world size: the data order is still exact (it follows the step), dropout is re-seeded
        torch.manual_seed(ckpt["step"] * 1_000_003 + env.rank)
    if env.is_main:
        print(f"resumed from {path} at step {ckpt['step']} (epoch {ckpt['epoch']}, batch {ckpt['batch_in_epoch']})")
    return ckpt["step"]


# ---- the data position: samplers that follow the step, and the eval sharding ---------------------------------

class ShardedSampler(Sampler):
    """DistributedSampler for training: a (seed, epoch) shuffle cut to a multiple of world_size (drop_last); rank r
    takes every world_size-th index. `skip(n)`: this rank already consumed the first n samples of the epoch."""

    def __init__(self, dataset, rank=0, world_size=1, seed=0, shuffle=True):
        self.dataset, self.rank, self.world_size, self.seed, self.shuffle = dataset, rank, world_size, seed, shuffle
        self.epoch, self.start, self.num_samples = 0, 0, len(dataset) // world_size

    def set_epoch(self, epoch):
        """Start epoch `epoch` from its beginning; the dataset's augmentation follows the same epoch."""
        self.epoch, self.start = epoch, 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def skip(self, n):
        self.start = n

    def __iter__(self):
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        return iter(order[: self.num_samples * self.world_size][self.rank::self.world_size][self.start:].tolist())

    def __len__(self):
        return max(0, self.num_samples - self.start)


KNN_NEIGHBORS, KNN_GROUP_SIZE = 31, 4  # hard negatives among a seed's 31 neighbours; the configs ship size 1 (off)


class KnnBatchSampler(ShardedSampler):
    """OpenShape's hard negatives (meta_data/point_feat_knn.npy): a batch is batch_size / group_size seed shapes,
    each with group_size - 1 shapes among its `num_neighbors` nearest neighbours in point-feature space.

    An epoch has len(dataset) / group_size seeds in a (seed, epoch) shuffle; batches are dealt to ranks in turn.
    Neighbours outside the split are passed over, and a group short of them is filled with random shapes."""

    def __init__(self, dataset, batch_size, knn_path, group_size=KNN_GROUP_SIZE, num_neighbors=KNN_NEIGHBORS,
                 rank=0, world_size=1, seed=0):
        super().__init__(dataset, rank, world_size, seed)
        if batch_size % group_size:
            raise BadInput(f"--batch-size {batch_size} is not a multiple of the knn group size {group_size}")
        self.knn = load_npy(knn_path, item=True)
        if not {"name", "index"} <= self.knn.keys():
            raise BadInput(f"{knn_path}: expected a dict with 'name' and 'index'")
        self.batch_size, self.group_size, self.num_neighbors = batch_size, group_size, num_neighbors
        self.uid_to_index = {uid: k for k, uid in enumerate(dataset.ids)}
        self.num_batches = len(dataset) // batch_size // world_size

    def _group(self, seed_index, rng):
        neighbours = self.knn["index"].get(self.dataset.ids[seed_index], [])[1:self.num_neighbors + 1]  # [0] = self
        ranked = [self.knn["name"][j] for j in np.asarray(neighbours)[rng.permutation(len(neighbours))]]
        group = [seed_index] + [self.uid_to_index[u] for u in ranked if u in self.uid_to_index][:self.group_size - 1]
        return group + rng.integers(0, len(self.dataset), self.group_size - len(group)).tolist()

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        seeds, per_batch = rng.permutation(len(self.dataset))[: len(self.dataset) // self.group_size], self.batch_size // self.group_size
        # every rank builds every batch, so the rng draws stay in step; rank r keeps batches r, r + world, ...
        batches = [[k for s in seeds[b * per_batch:(b + 1) * per_batch] for k in self._group(int(s), rng)]
                   for b in range(self.num_batches * self.world_size)]
        return iter(batches[self.rank::self.world_size][self.start // self.batch_size:])

    def __len__(self):
        return max(0, self.num_batches - self.start // self.batch_size)


def make_train_loader(dataset, batch_size, rank=0, world_size=1, seed=0, workers=0, knn=None,
                      knn_group_size=KNN_GROUP_SIZE):
    """(loader, sampler) of drop_last training batches; `knn` = path of point_feat_knn.npy for hard negatives."""
    # its own generator: DataLoader would otherwise draw worker seeds from the global RNG at every epoch, which
    # would make the model's dropout stream depend on when an epoch's iterator was created (breaks exact resume)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed))
    if knn:
        sampler = KnnBatchSampler(dataset, batch_size, knn, knn_group_size, rank=rank, world_size=world_size, seed=seed)
        loader = DataLoader(dataset, batch_sampler=sampler, **common)
    else:
        sampler = ShardedSampler(dataset, rank, world_size, seed)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    if len(loader) == 0:
        raise BadInput(f"{getattr(dataset, 'split_path', 'dataset')}: {len(dataset)} shapes are not enough for one "
                       f"batch of {batch_size} on each of {world_size} ranks")
    return loader, sampler


class _Indexed(Dataset):
    """ds[i] + (i,): evaluation gathers the indices with the features, to count every sample exactly once."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


def make_eval_loader(dataset, batch_size, rank=0, world_size=1, workers=0):
    """Batches of (points, labels, indices) over samples rank, rank + world, ...: each sample on exactly one rank,
    none padded or repeated (unlike DistributedSampler), so gathered counts are exact."""
    # its own generator: creating the iterator would otherwise draw from the global RNG, so validating during
    # training would change the training's dropout stream
    return DataLoader(_Indexed(dataset), batch_size=batch_size, sampler=range(rank, len(dataset), world_size),
                      num_workers=workers, pin_memory=torch.cuda.is_available(), generator=torch.Generator())


def endless_batches(loader, sampler, step, local_batch):
    """The batches of a run from global step `step` on, epoch after epoch (epoch = step // batches per epoch).
    The data position is a function of the step alone, so a resumed run sees exactly the batches it missed."""
    epoch, done = divmod(step, len(loader))
    while True:
        sampler.set_epoch(epoch)  # a new shuffle; the dataset's augmentation follows the epoch too
        sampler.skip(done * local_batch)
        yield from loader
        epoch, done = epoch + 1, 0


# ---- reading weights -----------------------------------------------------------------------------------------

def load_checkpoint_file(path):
    """torch.load with weights_only=True; a missing, truncated or foreign file is BadInput naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"{path}: checkpoint file not found") from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        first = (str(e).splitlines() or [""])[0][:120]
        raise BadInput(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict):
        raise BadInput(f"{path}: expected a checkpoint dict, found {type(ckpt).__name__}")
    return ckpt


def load_exact(model, state, where):
    """load_state_dict that names the first missing, unexpected or mis-shaped key instead of a wall of text."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing:
        raise BadInput(f"{where}: missing key {missing[0]!r} ({len(missing)} missing; wrong model size or kind?)")
    if unexpected:
        raise BadInput(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BadInput(f"{where}: {k!r} has shape {tuple(v.shape)}, this model expects {tuple(own[k].shape)} "
                           f"(a checkpoint of another size? try --scaling)")
    model.load_state_dict(state)


def release_key_table(depth):
    """Our parameter-name prefix -> the release's (OpenShape ppat.py), one row per renamed module. `lift.1` is
    a Rearrange, `net.1`/`net.2` GELU/Dropout, the heads' `classifier.2/3/6/7` GELU/Dropout: no weights."""
    table = {"encoder.cls_token": "ppat.cls_token", "encoder.lift.": "ppat.lift.0.", "encoder.lift_norm.": "ppat.lift.2."}
    for i in range(3):
        table[f"encoder.patch_embed.convs.{i}."] = f"ppat.sa.mlp_convs.{i}."
        table[f"encoder.patch_embed.norms.{i}."] = f"ppat.sa.mlp_bns.{i}."
    for i in range(depth):
        ours, theirs = f"encoder.blocks.{i}.", f"ppat.transformer.layers.{i}."
        table.update({ours + "norm1.": theirs + "0.norm.", ours + "attn.qkv.": theirs + "0.fn.to_qkv.",
                      ours + "attn.proj.": theirs + "0.fn.to_out.0.", ours + "norm2.": theirs + "1.norm.",
                      ours + "fc1.": theirs + "1.fn.net.0.", ours + "fc2.": theirs + "1.fn.net.3."})
    return table


def _rename(state, table, where):
    """Strip DDP's `module.`, then map release names to ours (longest matching prefix wins); unknown keys are errors."""
    if not isinstance(state, dict):
        raise BadInput(f"{where}: expected a dict of tensors, found {type(state).__name__}")
    reverse = sorted(((theirs, ours) for ours, theirs in table.items()), key=lambda t: -len(t[0]))
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        match = next(((t, o) for t, o in reverse if key == t or (t.endswith(".") and key.startswith(t))), None)
        if match is None:
            raise BadInput(f"{where}: unexpected key {key!r} (not part of the PointBERT/TAMM layout)")
        out[match[1] + key[len(match[0]):]] = value
    return out


def release_state_dict(ckpt, depth, where="checkpoint"):
    """A TAMM release dict or an OpenShape PointBERT dict -> (our TAMM state_dict, heads)."""
    dual = "image_alignment_adapter" in ckpt
    table = release_key_table(depth) | ({} if dual else {"proj.": "proj."})  # OpenShape's single projection
    state = _rename(ckpt["state_dict"], table, where + "[state_dict]")
    for i in range(3):  # the release's 1x1 Conv2d kernels (out, in, 1, 1) -> our Linear (out, in)
        key = f"encoder.patch_embed.convs.{i}.weight"
        if key in state and state[key].dim() == 4:
            state[key] = state[key].flatten(1)
    if dual:
        for part, ours in (("image_alignment_adapter", "adapters.image."), ("text_alignment_adapter", "adapters.text.")):
            state.update(_rename(ckpt.get(part), {ours: "classifier."}, f"{where}[{part}]"))
    logit = ckpt.get("logit_scale")
    if isinstance(logit, dict):
        logit = _rename(logit, {"logit_scale": "logit_scale"}, where + "[logit_scale]").get("logit_scale")
    state["logit_scale"] = torch.as_tensor(logit if logit is not None else math.log(14.28), dtype=torch.float32)
    return state, "dual" if dual else "openshape"


def build_from_config(config):
    return TAMM(EncoderConfig(**config["encoder"]), clip_dim=config["clip_dim"], heads=config["heads"],
                logit_scale_max=config.get("logit_scale_max", 100.0))


def load_pretrained(path_or_ckpt, scaling=4, clip_dim=1280, where=None):
    """Our stage-2 checkpoint, a released TAMM checkpoint or OpenShape's PointBERT -> TAMM model in eval mode.

    Released files carry no config: their encoder size is `scaling` (4 for every public checkpoint). Every
    tensor must map: a missing or unexpected key, or a shape mismatch, is BadInput naming it."""
    where = where or (str(path_or_ckpt) if not isinstance(path_or_ckpt, dict) else "checkpoint")
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint_file(path_or_ckpt)
    if "config" in ckpt and "model" in ckpt:
        if "encoder" not in (ckpt["config"] or {}):
            raise BadInput(f"{where}: a stage-1 checkpoint (CLIP Image Adapter), not a point encoder; "
                           f"evaluate the stage-2 checkpoint (OUT/stage2/latest.pt)")
        model, state = build_from_config(ckpt["config"]), ckpt["model"]
    elif "state_dict" in ckpt:
        cfg = CONFIGS[scaling]
        state, heads = release_state_dict(ckpt, cfg.depth, where)
        model = TAMM(cfg, clip_dim=clip_dim, heads=heads, logit_scale_max=None)
    else:
        raise BadInput(f"{where}: not a TAMM/OpenShape checkpoint (top-level keys: {sorted(ckpt)[:8]})")
    load_exact(model, state, where)
    return model.eval()


def variant(ckpt):
    """Which comparison of the paper a checkpoint is: its heads and whether stage 2 used the CIA."""
    if "config" not in ckpt:  # a released file: TAMM's has two adapter heads, OpenShape's one projection
        return "TAMM (released)" if "image_alignment_adapter" in ckpt else "OpenShape (released)"
    heads, cia = ckpt["config"]["heads"], bool((ckpt.get("variant") or {}).get("cia"))
    return {("dual", True): "TAMM (CIA + Dual Adapters)", ("dual", False): "Dual Adapters, no CIA",
            ("openshape", True): "CIA + one head", ("openshape", False): "OpenShape (one head, no CIA)"}[heads, cia]


def load_cia(path_or_state, dim=1280):
    """A frozen CIA from our stage-1 cia.pt or a release-style `adapter.fc.*` state dict."""
    ckpt = path_or_state if isinstance(path_or_state, dict) else load_checkpoint_file(path_or_state)
    state = {k.removeprefix("module.").removeprefix("adapter."): v for k, v in ckpt.get("cia", ckpt).items()}
    cia = ClipImageAdapter(dim, ratio=ckpt.get("cia_ratio", 0.2))
    load_exact(cia, state, "CIA state" if isinstance(path_or_state, dict) else str(path_or_state))
    return cia.eval().requires_grad_(False)
