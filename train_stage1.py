"""TAMM stage 1: train the CLIP Image Adapter (paper section 3.2, eq. 2-4).

CLIP features of rendered views sit away from CLIP's text space (renders are not photos). Stage 1 learns a
small residual MLP on the frozen image-view features so that CIA(image) lines up with the frozen text feature
of the same shape, with a symmetric contrastive loss and a learnable temperature. Only the adapter learns.
The official release ships this stage with its loss and optimiser step commented out; this one trains.

Each step takes the 4 sampled views of every shape as 4 targets of the fused loss (loss.py): anchors
CIA(view_v), targets the shape's text, shapes without text masked out. Before training and after it, the
script reports image->text top-1 retrieval on held-out training shapes (never trained on): identity vs CIA.

    python train_stage1.py                              # CPU demo on the embedded synthetic world (~1 min)
    python train_stage1.py --data /path/to/openshape     # paper preset
    torchrun --nproc_per_node=8 train_stage1.py --data /path/to/openshape

Outputs go to OUT/stage1/: cia.pt (the adapter stage 2 loads), latest.pt (resume), log.jsonl, config.json.
"""
import math
import os
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Subset
from tqdm import tqdm

import data
from adapters import ClipImageAdapter
from loss import contrastive_loss
from training import (all_ranks_have_rows, apply_preset, cosine_lr, data_root, find_resume,
                      param_groups, preset_parser, resume, retrieval_top1, save_latest, start_run)
from utils import BadInput, atomic_save, cleanup_distributed, run_cli, setup_distributed

PRESETS = {
    "paper": dict(epochs=400, batch_size=200, lr=1e-3, warmup_epochs=20, weight_decay=0.01, ratio=0.2,
                  split="train_all", holdout=2000, workers=8, save_every=1000),
    "demo": dict(epochs=30, batch_size=64, lr=1e-3, warmup_epochs=2, weight_decay=0.01, ratio=0.2,
                 split="train_all", holdout=100, workers=0, save_every=500),
}
SOURCES = {
    "epochs": "TAMM stage-1 config / demo: ~1 CPU minute", "batch_size": "global; official 50 per GPU x 4",
    "lr": "global; official 2.5e-4 per GPU x 4 GPUs", "warmup_epochs": "official config",
    "weight_decay": "PyTorch AdamW default", "ratio": "residual ratio r of CIA (paper)",
    "split": "OpenShape split file", "holdout": "training shapes kept out for the before/after retrieval report",
    "workers": "DataLoader workers per process", "save_every": "steps between latest.pt writes",
}


class Stage1Model(nn.Module):
    """The CLIP Image Adapter and its temperature: everything that trains in stage 1, one DDP wrapper."""

    def __init__(self, dim=1280, ratio=0.2):
        super().__init__()
        self.dim, self.ratio = dim, ratio
        self.cia = ClipImageAdapter(dim, ratio=ratio)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(14.28)))  # CLIP-style log temperature, as stage 2

    def forward(self, image):
        return self.cia(image)

    def config(self):
        return {"dim": self.dim, "ratio": self.ratio}


def parse_args(argv):
    p = preset_parser(__doc__.split("\n\n")[0], PRESETS, SOURCES)
    p.add_argument("--data", help="OpenShape data root (default: the embedded synthetic world)")
    p.add_argument("--out", help="output folder (default: runs/<preset>)")
    p.add_argument("--resume", help="checkpoint to resume from (default: OUT/stage1/latest.pt if present)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="stop on the first broken shape instead of skipping it")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--path-prefix", default=data.PATH_PREFIX, help="prefix of data_path in the split files")
    return apply_preset(p.parse_args(argv), PRESETS)


@torch.no_grad()
def heldout_features(dataset):
    """(image view 0, text) features of the held-out shapes that have a text."""
    images, texts = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if item is not None and item["has_text"]:
            images.append(item["image_feat"][0])
            texts.append(item["text_feat"])
    if not images:
        raise BadInput("no held-out shape has a text feature; check the split file")
    return torch.stack(images), torch.stack(texts)


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    torch.manual_seed(args.seed + env.rank)
    run_dir, local_batch, log = start_run(args, env, "stage1")

    # ---- data: only features are used; few points are read (the reader still validates each shape)
    root = data_root(args.data, env)
    full = data.TrainTriplets(root, args.split, num_points=16, augment=False, seed=args.seed, strict=args.strict,
                              path_prefix=args.path_prefix)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(args.seed)).tolist()
    holdout = min(args.holdout, len(full) // 5)
    train_set = Subset(full, order[holdout:])
    loader, sampler = data.make_train_loader(train_set, local_batch, env.rank, env.world_size, args.seed,
                                             args.workers)
    held_image, held_text = heldout_features(Subset(full, order[:holdout]))

    model = Stage1Model(full.clip_dim, args.ratio).to(env.device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    step = start_epoch = start_batch = 0
    resume_path = find_resume(args.resume, run_dir)
    if resume_path:
        step, start_epoch, start_batch = resume(resume_path, model, optimizer, None, env)
    train_model = DDP(model) if env.distributed else model
    before = retrieval_top1(held_image, held_text)

    steps_per_epoch = len(loader)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10 ** 12)
    warmup = args.warmup_epochs * steps_per_epoch
    if env.is_main:
        print(f"stage 1 | {len(train_set)} train / {len(held_image)} held-out pairs | {steps_per_epoch} steps/epoch "
              f"| held-out image->text top-1 before (identity): {before:.3f} | out {run_dir}")
    t0 = time.time()
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch)
        full.set_epoch(epoch)
        first = start_batch if epoch == start_epoch else 0
        sampler.skip(first * local_batch)
        bar = tqdm(loader, total=steps_per_epoch, initial=first, leave=False, desc=f"epoch {epoch}",
                   disable=None if env.is_main else True)
        for batch_idx, batch in enumerate(bar, start=first):
            lr = cosine_lr(step, total_steps, warmup, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if not all_ranks_have_rows(batch, env):  # an all-broken batch somewhere: every rank skips it
                continue
            image = batch["image_feat"].to(env.device).transpose(0, 1)                   # (V, B, D)
            text = batch["text_feat"].to(env.device).expand(image.shape[0], -1, -1)       # (V, B, D)
            mask = (batch["has_text"] & batch["valid"]).to(env.device).expand(image.shape[0], -1)  # (V, B)
            res = contrastive_loss(train_model(image), text, model.logit_scale.exp(), mask)
            res.loss.backward()
            optimizer.step()
            with torch.no_grad():  # temperature at most 100, clamped on the parameter as CLIP does
                model.logit_scale.clamp_(max=math.log(100))
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                record = {"step": step, "epoch": epoch, "loss": res.per_target.sum().item(),
                          "acc": res.accuracy.mean().item(), "lr": lr, "scale": model.logit_scale.exp().item()}
                log(record, echo=bar.disable)  # plain lines when there is no bar (not a terminal)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.2f}", lr=f"{lr:.2e}")
            if step % args.save_every == 0 and batch_idx + 1 < steps_per_epoch:
                save_latest(run_dir, model, optimizer, None, step, epoch, batch_idx + 1, args, env)
            if step >= total_steps:
                break
        ended = batch_idx + 1 == steps_per_epoch
        save_latest(run_dir, model, optimizer, None, step, epoch + 1 if ended else epoch,
                    0 if ended else batch_idx + 1, args, env)

    with torch.no_grad():
        after = retrieval_top1(model.eval()(held_image.to(env.device)).cpu(), held_text)
    if env.is_main:
        atomic_save({"cia": model.cia.state_dict(), "cia_ratio": args.ratio, "step": step}, os.path.join(run_dir, "cia.pt"))
        log({"step": step, "heldout_top1_before": before, "heldout_top1_after": after,
             "minutes": (time.time() - t0) / 60})
        print(f"held-out image->text top-1: {before:.3f} (identity) -> {after:.3f} (CIA) | wrote {run_dir}/cia.pt")
    cleanup_distributed()
    return {"before": before, "after": after, "run_dir": run_dir}


if __name__ == "__main__":
    run_cli(main)
