"""Weight files: our checkpoints (the resume contract), the released TAMM and OpenShape checkpoints, the CIA.

- `save_latest` / `resume`: RUN_DIR/latest.pt holds the unwrapped model, its config, the optimizer, the grad
  scaler, the step, the flags and every rank's RNG state, written atomically (a temp file, fsync, rename), so
  a killed run leaves the previous checkpoint intact and a resumed run replays the same arithmetic.
- `load_pretrained`: our stage-2 checkpoint, a released TAMM checkpoint (`state_dict` + `image_alignment_adapter`
  + `text_alignment_adapter` + `logit_scale`, every key under DDP's `module.`) or OpenShape's PointBERT
  (`state_dict` with `module.ppat.*` and `module.proj.*`) -> a TAMM model. The release's module names come from
  OpenShape's src/models/ppat.py (PreNorm/Sequential wrappers, hence the numeric indices); `release_key_table`
  maps them to ours, one row per module.
- `load_cia`: the frozen CLIP Image Adapter of stage 1 (ours, or the release's `adapter.fc.*`).

Every file is read with torch.load(weights_only=True): no arbitrary unpickling.
"""
import math
import os
import random
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from adapters import ClipImageAdapter
from model import TAMM, EncoderConfig, CONFIGS
from training import BadInput


def atomic_save(obj, path, save=torch.save):
    """save(obj, file) to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
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
