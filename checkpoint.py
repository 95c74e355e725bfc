"""Saving, resuming and loading weights: our checkpoints, the released TAMM and OpenShape files, the
CIA.

- `save_latest` / `resume`: RUN_DIR/latest.pt is the resume contract. It holds the unwrapped model
  and its config, the optimizer, the grad scaler, the step, the flags and every rank's RNG state, so
  a resumed run replays the same arithmetic; the data position follows from the step
  (data.endless_batches).
- `load_pretrained`: our stage-2 checkpoint, a released TAMM checkpoint (`state_dict` +
  `image_alignment_adapter` + `text_alignment_adapter` + `logit_scale`, every key under DDP's
  `module.`) or OpenShape's PointBERT (`state_dict` with `module.ppat.*` and `module.proj.*`) -> a
  TAMM model. The release's module names come from OpenShape's src/models/ppat.py (PreNorm and
  Sequential wrappers, hence the numeric indices); `release_key_table` maps them to ours, one row
  per module.
- `load_cia`: the frozen CLIP Image Adapter of stage 1 (ours, or the release's `adapter.fc.*`).
- `describe`: what a checkpoint file is, so a file given in the wrong place gets a message that says
  so.

Weights are read with torch.load(weights_only=True): no arbitrary unpickling.
"""
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from adapters import CIA_RATIO, CLIP_DIM, ClipImageAdapter
from files import BadInput, atomic_save, load_torch
from loss import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX
from model import CONFIGS, TAMM, EncoderConfig

# ---- the resume contract -------------------------------------------------------------------------


def rng_state():
    """This process's RNG streams as plain tensors and numbers (loadable with weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [key.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()[1]),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


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
    """RUN_DIR/latest.pt after `step` steps -> its path. Every rank's RNG is gathered: call it on
    every rank; only the main process writes."""
    states = [rng_state()]
    if env.distributed:
        states = [None] * env.world_size
        dist.all_gather_object(states, rng_state())
    path = os.path.join(run_dir, "latest.pt")
    if env.is_main:
        model = unwrap(model)
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        ckpt = {
            "model": model.state_dict(),
            "config": model.config(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "args": vars(args),
            "rng": states,
            **extra,
        }
        atomic_save(ckpt, path)
    return path


def find_resume(resume_arg, run_dir):
    """--resume PATH, else RUN_DIR/latest.pt if a previous run left one, else None."""
    latest = os.path.join(run_dir, "latest.pt")
    return resume_arg or (latest if os.path.exists(latest) else None)


def same_config(saved, built):
    """A saved model config equals this run's (checkpoints before `head_type` called it `heads`)."""
    saved = dict(saved or {})
    if "heads" in saved:
        saved["head_type"] = saved.pop("heads")
    return saved == built


def resume(path, model, optimizer, scaler, env):
    """Load a save_latest checkpoint into the (unwrapped) model and optimizer and restore this
    rank's RNG -> the step. A checkpoint of another model is BadInput."""
    ckpt = load_torch(path)
    if not same_config(ckpt.get("config"), model.config()):
        raise BadInput(f"{path}: checkpoint of another model ({ckpt.get('config')}); this run "
                       f"builds {model.config()} (another --out, or matching flags)")
    load_exact(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # empty when fp16 loss scaling is off
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == env.world_size:
        set_rng_state(ckpt["rng"][env.rank])
    else:  # another world size: the data order still follows the step; dropout is re-seeded
        torch.manual_seed(ckpt["step"] * 1_000_003 + env.rank)
    if env.is_main:
        print(f"resumed from {path} at step {ckpt['step']} (epoch {ckpt['epoch']}, "
              f"batch {ckpt['batch_in_epoch']})")
    return ckpt["step"]


def load_exact(model, state, where):
    """load_state_dict that names the first missing, unexpected or mis-shaped key, not a wall of
    text."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise BadInput(f"{where}: missing key {missing[0]!r} ({len(missing)} missing; wrong model "
                       f"size or kind?)")
    if unexpected:
        raise BadInput(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BadInput(f"{where}: {k!r} has shape {tuple(v.shape)}, this model expects "
                           f"{tuple(own[k].shape)} (a checkpoint of another size? try --scaling)")
    model.load_state_dict(state)


# ---- what a checkpoint file is -------------------------------------------------------------------

KINDS = {  # kind: (what it is, what takes it)
    "stage2": ("a stage-2 checkpoint (train_stage2.py's latest.pt)",
               "evaluate.py --ckpt and train_stage2.py --resume take it"),
    "stage1": ("a stage-1 checkpoint (train_stage1.py's latest.pt)",
               "train_stage1.py --resume takes it; train_stage2.py --cia the cia.pt beside it"),
    "cia": ("a stage-1 CLIP Image Adapter (train_stage1.py's cia.pt)",
            "train_stage2.py --cia takes it"),
    "tamm-release": ("a released TAMM checkpoint", "evaluate.py --ckpt takes it"),
    "openshape-release": ("a released OpenShape PointBERT checkpoint",
                          "evaluate.py --ckpt takes it"),
}


def describe(ckpt):
    """Which of KINDS a loaded checkpoint dict is, or None."""
    if "config" in ckpt and "model" in ckpt:
        return "stage2" if "encoder" in (ckpt["config"] or {}) else "stage1"
    if "cia" in ckpt or any(str(k).removeprefix("module.").startswith("adapter.fc.") for k in ckpt):
        return "cia"
    if "state_dict" in ckpt:
        return "tamm-release" if "image_alignment_adapter" in ckpt else "openshape-release"
    return None


def wrong_kind(path, ckpt, wanted):
    """BadInput for the checkpoint dict `ckpt` given where `wanted` was expected: what it is
    instead, and what takes it."""
    kind = describe(ckpt)
    if kind is None:
        keys = sorted(map(str, ckpt))[:8]
        return BadInput(f"{path}: not a checkpoint of this project (top-level keys: {keys}), "
                        f"not {wanted}")
    what, taker = KINDS[kind]
    return BadInput(f"{path}: {what}, not {wanted}; {taker}")


def load_checkpoint(path, wanted=("stage2", "tamm-release", "openshape-release")):
    """load_torch + describe: the dict of a checkpoint of one of the `wanted` kinds, else BadInput
    saying what the file is and where it belongs."""
    ckpt = load_torch(path)
    if describe(ckpt) not in wanted:
        raise wrong_kind(path, ckpt, " or ".join(KINDS[k][0].split(" (")[0] for k in wanted))
    return ckpt


# ---- released weights ----------------------------------------------------------------------------


def release_key_table(depth):
    """Our parameter-name prefix -> the release's (OpenShape ppat.py), one row per renamed module.
    `lift.1` is a Rearrange, `net.1`/`net.2` GELU/Dropout and the heads' `classifier.2/3/6/7`
    GELU/Dropout: no weights."""
    table = {"encoder.cls_token": "ppat.cls_token", "encoder.lift.": "ppat.lift.0.",
             "encoder.lift_norm.": "ppat.lift.2."}
    for i in range(3):
        table[f"encoder.patch_embed.convs.{i}."] = f"ppat.sa.mlp_convs.{i}."
        table[f"encoder.patch_embed.norms.{i}."] = f"ppat.sa.mlp_bns.{i}."
    for i in range(depth):
        ours = f"encoder.blocks.{i}."
        theirs = f"ppat.transformer.layers.{i}."
        table[ours + "norm1."] = theirs + "0.norm."
        table[ours + "attn.qkv."] = theirs + "0.fn.to_qkv."
        table[ours + "attn.proj."] = theirs + "0.fn.to_out.0."
        table[ours + "norm2."] = theirs + "1.norm."
        table[ours + "fc1."] = theirs + "1.fn.net.0."
        table[ours + "fc2."] = theirs + "1.fn.net.3."
    return table


def rename(state, table, where):
    """Strip DDP's `module.`, then map release names to ours (the longest matching prefix wins); a
    key that maps to nothing is an error."""
    if not isinstance(state, dict):
        raise BadInput(f"{where}: expected a dict of tensors, found {type(state).__name__}")
    by_length = sorted(((theirs, ours) for ours, theirs in table.items()), key=lambda t: -len(t[0]))
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for theirs, ours in by_length:
            if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
                out[ours + key[len(theirs):]] = value
                break
        else:
            raise BadInput(f"{where}: unexpected key {key!r} (not part of the PointBERT/TAMM "
                           f"layout)")
    return out


def release_state_dict(ckpt, depth, where="checkpoint"):
    """A TAMM release dict or an OpenShape PointBERT dict -> (our TAMM state_dict, head_type)."""
    dual = "image_alignment_adapter" in ckpt
    table = release_key_table(depth)
    if not dual:
        table["proj."] = "proj."  # OpenShape's single projection
    state = rename(ckpt["state_dict"], table, where + "[state_dict]")
    for i in range(3):  # the release's 1x1 Conv2d kernels (out, in, 1, 1) -> our Linear (out, in)
        key = f"encoder.patch_embed.convs.{i}.weight"
        if key in state and state[key].dim() == 4:
            state[key] = state[key].flatten(1)
    if dual:
        heads = {"image_alignment_adapter": "adapters.image.",
                 "text_alignment_adapter": "adapters.text."}
        for part, ours in heads.items():
            state.update(rename(ckpt.get(part), {ours: "classifier."}, f"{where}[{part}]"))
    logit = ckpt.get("logit_scale")
    if isinstance(logit, dict):
        logit = rename(logit, {"logit_scale": "logit_scale"}, where + "[logit_scale]")
        logit = logit.get("logit_scale")
    if logit is None:
        logit = math.log(LOGIT_SCALE_INIT)
    state["logit_scale"] = torch.as_tensor(logit, dtype=torch.float32)
    return state, "dual" if dual else "openshape"


def build_from_config(config):
    """A TAMM model from a checkpoint's config (checkpoints before `head_type` called it
    `heads`)."""
    head_type = config.get("head_type", config.get("heads"))
    encoder = EncoderConfig(**config["encoder"])
    return TAMM(encoder, clip_dim=config["clip_dim"], head_type=head_type,
                logit_scale_max=config.get("logit_scale_max", LOGIT_SCALE_MAX))


def load_pretrained(path_or_ckpt, scaling=4, clip_dim=CLIP_DIM, where=None):
    """Our stage-2 checkpoint, a released TAMM checkpoint or OpenShape's PointBERT -> TAMM model,
    eval mode.

    Released files carry no config: their encoder size is `scaling` (4 for every public checkpoint).
    Every tensor must map: a missing or unexpected key, or a shape mismatch, is BadInput naming
    it."""
    if isinstance(path_or_ckpt, dict):
        ckpt, where = path_or_ckpt, where or "checkpoint"
    else:
        ckpt, where = load_checkpoint(path_or_ckpt), where or str(path_or_ckpt)
    kind = describe(ckpt)
    if kind == "stage2":
        model = build_from_config(ckpt["config"])
        state = ckpt["model"]
    elif kind in ("tamm-release", "openshape-release"):
        cfg = CONFIGS[scaling]
        state, head_type = release_state_dict(ckpt, cfg.depth, where)
        model = TAMM(cfg, clip_dim=clip_dim, head_type=head_type, logit_scale_max=None)
    else:
        raise wrong_kind(where, ckpt, "a point encoder")
    load_exact(model, state, where)
    return model.eval()


def variant(ckpt):
    """Which comparison of the paper a checkpoint is: its heads and whether stage 2 used the CIA."""
    if "config" not in ckpt:  # a released file: TAMM's has two heads, OpenShape's one projection
        return "TAMM (released)" if "image_alignment_adapter" in ckpt else "OpenShape (released)"
    config = ckpt["config"]
    head_type = config.get("head_type", config.get("heads"))
    cia = bool((ckpt.get("variant") or {}).get("cia"))
    names = {
        ("dual", True): "TAMM (CIA + Dual Adapters)",
        ("dual", False): "Dual Adapters, no CIA",
        ("openshape", True): "CIA + one head",
        ("openshape", False): "OpenShape (one head, no CIA)",
    }
    return names[head_type, cia]


def load_cia(path_or_state, dim=CLIP_DIM):
    """A frozen CIA from our stage-1 cia.pt or a release-style `adapter.fc.*` state dict."""
    if isinstance(path_or_state, dict):
        ckpt, where = path_or_state, "CIA state"
    else:
        ckpt, where = load_checkpoint(path_or_state, wanted=("cia",)), str(path_or_state)
    weights = ckpt.get("cia", ckpt)
    state = {k.removeprefix("module.").removeprefix("adapter."): v for k, v in weights.items()}
    cia = ClipImageAdapter(dim, ratio=ckpt.get("cia_ratio", CIA_RATIO))
    load_exact(cia, state, where)
    return cia.eval().requires_grad_(False)
