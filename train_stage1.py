"""TAMM stage 1: train the CLIP Image Adapter (paper section 3.2, eq. 2-4).

CLIP features of rendered views sit away from CLIP's text space (renders are not photos). Stage 1 learns a small
residual MLP on the frozen image-view features so that CIA(image) lines up with the frozen text feature of the
same shape, with the symmetric contrastive loss and a learnable temperature. Only the adapter learns. The
official release ships this stage with its loss and optimiser step commented out (TAMM
trainers/clip_adapter_trainer.py); this one trains.

Each step takes the 4 sampled views of every shape as 4 target sets of the loss: anchors CIA(view_v), targets the
shape's text, shapes without a text masked out. Texts come from the name texts and captions, without retrieved
texts, as the release's configs/Pre-Training/clip_image_adapter_training.yaml (`--text-sources` to change).
Before and after training the script reports image->text top-1 retrieval on held-out training shapes.

    python train_stage1.py                               # CPU demo on the embedded synthetic world (~30 s)
    python train_stage1.py --data /path/to/openshape      # paper preset
    torchrun --nproc_per_node=8 train_stage1.py --data /path/to/openshape

Outputs go to OUT/stage1/: cia.pt (the adapter stage 2 loads), latest.pt (resume), log.jsonl, config.json.
"""
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Subset
from tqdm import tqdm

import data
import training as T
from adapters import ClipImageAdapter
from checkpoint import atomic_save, endless_batches, find_resume, make_train_loader, resume, save_latest
from loss import clamp_logit_scale_, contrastive_loss, logit_scale_parameter

PRESETS = {
    "paper": dict(epochs=400, batch_size=200, lr=1e-3, warmup_epochs=20, weight_decay=0.01, ratio=0.2,
                  split="train_all", holdout=2000, workers=8, save_every=1000),
    "demo": dict(epochs=140, batch_size=64, lr=1e-3, warmup_epochs=2, weight_decay=0.01, ratio=0.2,
                 split="train_all", holdout=100, workers=0, save_every=500),
}
FLAGS = {  # preset flag: (type, where the paper value comes from)
    "epochs": (T.POSITIVE_INT, "TAMM configs/Pre-Training/clip_image_adapter_training.yaml / demo: 420 steps"),
    "batch_size": (T.POSITIVE_INT, "global; the config's 50 per GPU x 4"),
    "lr": (T.POSITIVE, "global; the config's 2.5e-4 per GPU x 4 GPUs"), "warmup_epochs": (T.COUNT, "warmup_epoch"),
    "weight_decay": (T.NONNEGATIVE, "PyTorch AdamW default"), "ratio": (T.FRACTION, "residual ratio r of CIA (paper)"),
    "split": (str, "train_split (the config: ablation/train_shapenet_only; the paper: train_all)"),
    "holdout": (T.COUNT, "training shapes kept out for the before/after retrieval report"),
    "workers": (T.COUNT, "DataLoader workers per process"), "save_every": (T.POSITIVE_INT, "steps between latest.pt writes"),
}


class Stage1Model(nn.Module):
    """The CLIP Image Adapter and its temperature: everything that trains in stage 1, one DDP wrapper."""

    def __init__(self, dim=1280, ratio=0.2):
        super().__init__()
        self.dim, self.ratio = dim, ratio
        self.cia = ClipImageAdapter(dim, ratio=ratio)
        self.logit_scale = logit_scale_parameter()

    def forward(self, image):
        return self.cia(image)

    def config(self):
        return {"dim": self.dim, "ratio": self.ratio}


def parse_args(argv):
    p = T.preset_parser(__doc__.split("\n\n")[0], PRESETS, FLAGS)
    p.add_argument("--data", type=T.existing_dir, help="OpenShape data root (default: the embedded synthetic world)")
    p.add_argument("--out", type=T.output_dir, help="output folder (default: runs/<preset>)")
    p.add_argument("--resume", type=T.existing_file, help="checkpoint to resume from (default: OUT/stage1/latest.pt)")
    p.add_argument("--device", type=T.device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--text-sources", nargs="+", choices=data.TEXT_SOURCES, default=["text", "caption"],
                   help="texts the adapter is aligned with (default: the release's text_source: [text, caption])")
    p.add_argument("--seed", type=T.COUNT, default=0)
    p.add_argument("--strict", action="store_true", help="stop on the first broken shape instead of skipping it")
    p.add_argument("--max-steps", type=T.POSITIVE_INT, help="stop after this many steps (smoke tests)")
    p.add_argument("--log-every", type=T.POSITIVE_INT, default=20)
    p.add_argument("--path-prefix", default=data.PATH_PREFIX, help="prefix of data_path in the split files")
    args = T.apply_preset(p.parse_args(argv), PRESETS)
    T.check_batch(args.batch_size)
    data.check_split(args.data, args.split)
    return args


@torch.no_grad()
def retrieval_top1(dataset, cia=None):
    """Image (view 0) -> text top-1 retrieval among the held-out shapes that have a text, by cosine similarity."""
    items = [item for item in (dataset[i] for i in range(len(dataset))) if item["valid"] and item["has_text"]]
    if not items:
        raise T.BadInput("no held-out shape has a text feature; check the split file and --text-sources")
    images, texts = torch.stack([x["image_feat"][0] for x in items]), torch.stack([x["text_feat"] for x in items])
    sim = F.normalize(cia(images) if cia else images, dim=-1) @ F.normalize(texts, dim=-1).T
    return (sim.argmax(1) == torch.arange(len(items))).float().mean().item(), len(items)


def main(argv=None):
    args = parse_args(argv)
    env = T.setup_distributed(args.device)
    torch.manual_seed(args.seed + env.rank)
    run_dir, log = T.start_run(args, env, "stage1")
    local_batch = args.batch_size // env.world_size

    # ---- data: only the features are used; few points are read (the reader still checks every shape)
    root = T.data_root(args.data, env)
    full = data.TrainTriplets(root, args.split, num_points=16, augment=False, seed=args.seed, strict=args.strict,
                              path_prefix=args.path_prefix, text_sources=tuple(args.text_sources))
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(args.seed)).tolist()
    holdout = min(args.holdout, len(full) // 5)
    heldout, train_set = Subset(full, order[:holdout]), Subset(full, order[holdout:])
    train_set.set_epoch = full.set_epoch  # the sampler's epoch reaches the dataset through the subset
    loader, sampler = make_train_loader(train_set, local_batch, env.rank, env.world_size, args.seed, args.workers)
    before, n_heldout = retrieval_top1(heldout)

    model = Stage1Model(full.clip_dim, args.ratio).to(env.device)
    optimizer = torch.optim.AdamW(T.param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(env.device.type, enabled=False)  # fp32: the loss and the resume contract need one
    resume_path = find_resume(args.resume, run_dir)
    step = resume(resume_path, model, optimizer, scaler, env) if resume_path else 0
    train_model = DDP(model) if env.distributed else model

    steps_per_epoch = len(loader)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10 ** 12)
    warmup_steps = args.warmup_epochs * steps_per_epoch
    batches, t0 = endless_batches(loader, sampler, step, local_batch), time.time()
    if env.is_main:
        print(f"stage 1 | {len(train_set)} train / {n_heldout} held-out pairs | {steps_per_epoch} steps/epoch "
              f"| held-out image->text top-1 before (identity): {before:.3f} | out {run_dir}")
    bar = tqdm(total=total_steps, initial=step, disable=None if env.is_main else True)
    while step < total_steps:
        batch = next(batches)
        # ---------------------------------------------------------------------------------- one training step
        lr = T.cosine_lr(step, total_steps, warmup_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = batch["image_feat"].to(env.device).transpose(0, 1)                            # (V, B, 1280)
        text = batch["text_feat"].to(env.device).expand(len(views), -1, -1)                   # (V, B, 1280)
        mask = (batch["has_text"] & batch["valid"]).to(env.device).expand(len(views), -1)     # (V, B)
        # eq. 4: L = sum_v CLIP(CIA(I_v), T): each view's adapted feature against the shape's text
        res = contrastive_loss(train_model(views), text, logit_scale=model.logit_scale.exp(), mask=mask)
        res.loss.backward()
        optimizer.step()
        clamp_logit_scale_(model.logit_scale, 100.0)  # temperature <= 100, as CLIP
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # ---------------------------------------------------------------------------------- once in a while
        bar.update()
        if step % args.log_every == 0 or step == total_steps:
            log({"step": step, "epoch": step // steps_per_epoch, "loss": res.per_target.sum().item(),
                 "acc": res.accuracy.mean().item(), "lr": lr, "scale": model.logit_scale.exp().item()})
        if step % args.save_every == 0 or step == total_steps:
            save_latest(run_dir, model, optimizer, scaler, step, steps_per_epoch, args, env)

    after, _ = retrieval_top1(heldout, model.eval().cia.cpu())
    if env.is_main:
        atomic_save({"cia": model.cia.state_dict(), "cia_ratio": args.ratio, "step": step}, os.path.join(run_dir, "cia.pt"))
        log({"step": step, "heldout_top1_before": before, "heldout_top1_after": after, "minutes": (time.time() - t0) / 60})
        print(f"held-out image->text top-1: {before:.3f} (identity) -> {after:.3f} (CIA) | wrote {run_dir}/cia.pt")
    T.cleanup_distributed()
    return {"before": before, "after": after, "run_dir": run_dir}


if __name__ == "__main__":
    T.run_cli(main)
