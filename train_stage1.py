"""TAMM stage 1: train the CLIP Image Adapter (paper section 3.2).

CLIP features of rendered views sit away from CLIP's text space (renders are not photos). Stage 1
learns a small residual MLP on the frozen image-view features so that CIA(image) lines up with the
frozen text feature of the same shape, with the symmetric contrastive loss and a learnable
temperature. Only the adapter learns. The official release ships this stage with its loss and
optimiser step commented out (TAMM trainers/clip_adapter_trainer.py); this one trains.

Each step takes the 4 sampled views of every shape as 4 target sets of the loss: anchors
CIA(view_v), targets the shape's text, shapes without a text masked out. The texts are name texts
and captions, no retrieved texts, as in the release's configs/Pre-Training/
clip_image_adapter_training.yaml (`--text-sources` to change). Before and after training it reports
image -> text top-1 retrieval on a fixed set of held-out pairs.

    python train_stage1.py                            # CPU demo on the embedded synthetic world
    python train_stage1.py --data /path/to/openshape  # paper preset
    torchrun --nproc_per_node=8 train_stage1.py --data /path/to/openshape

Outputs go to OUT/stage1/: cia.pt (the adapter stage 2 loads), latest.pt (resume), log.jsonl,
config.json.
"""
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Subset
from tqdm import tqdm

import cli
import data
from adapters import CIA_RATIO, ClipImageAdapter
from checkpoint import find_resume, load_checkpoint, resume, save_latest
from files import BadInput, atomic_save
from loss import LOGIT_SCALE_MAX, clamp_logit_scale_, contrastive_loss, logit_scale_parameter
from runtime import cleanup_distributed, launch_env, setup_distributed
from tools import synthetic
from training import BrokenShapes, RunLog, cosine_lr, make_optimizer, record_start

PRESETS = {
    "paper": dict(epochs=400, batch_size=200, lr=1e-3, warmup_epochs=20, weight_decay=0.01,
                  ratio=CIA_RATIO, split="train_all", holdout=2000, workers=8, save_every=1000),
    "demo": dict(epochs=140, batch_size=64, lr=1e-3, warmup_epochs=2, weight_decay=0.01,
                 ratio=CIA_RATIO, split="train_all", holdout=100, workers=0, save_every=500),
}
FLAGS = {  # preset flag: (type, where the paper's value comes from)
    "epochs": (cli.POSITIVE_INT, "TAMM configs/Pre-Training/clip_image_adapter_training.yaml "
               "max_epoch / demo: 420 steps"),
    "batch_size": (cli.POSITIVE_INT, "global; the config's 50 per GPU x 4"),
    "lr": (cli.POSITIVE, "global; the config's 2.5e-4 per GPU x 4 GPUs"),
    "warmup_epochs": (cli.COUNT, "warmup_epoch"),
    "weight_decay": (cli.NONNEGATIVE, "PyTorch's AdamW default"),
    "ratio": (cli.FRACTION, "residual ratio r of the CIA (paper)"),
    "split": (str, "train_split (the config: ablation/train_shapenet_only; the paper: train_all)"),
    "holdout": (cli.COUNT, "training shapes kept out for the before/after retrieval report"),
    "workers": (cli.COUNT, "DataLoader workers per process"),
    "save_every": (cli.POSITIVE_INT, "steps between latest.pt writes"),
}


class Stage1Model(nn.Module):
    """The CLIP Image Adapter and its temperature: everything that trains in stage 1, one DDP
    wrapper."""

    def __init__(self, dim, ratio):
        super().__init__()
        self.dim = dim
        self.ratio = ratio
        self.cia = ClipImageAdapter(dim, ratio=ratio)
        self.logit_scale = logit_scale_parameter()

    def forward(self, image):
        return self.cia(image)

    def config(self):
        return {"dim": self.dim, "ratio": self.ratio}


def build_parser():
    """The command line, every flag with its type, default and help."""
    p = cli.preset_parser(__doc__.split("\n\n")[0], PRESETS, FLAGS)
    p.add_argument("--data", type=cli.existing_dir,
                   help="OpenShape data root (default: the embedded synthetic world)")
    p.add_argument("--out", type=cli.output_dir, help="output folder (default: runs/<preset>)")
    p.add_argument("--resume", type=cli.existing_file,
                   help="checkpoint to resume from (default: OUT/stage1/latest.pt)")
    p.add_argument("--device", type=cli.device,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--text-sources", nargs="+", choices=data.TEXT_SOURCES,
                   default=["text", "caption"],
                   help="texts the adapter is aligned with (the release's text_source)")
    p.add_argument("--seed", type=cli.COUNT, default=0,
                   help="seed of the data order, the held-out shapes and the initial weights")
    p.add_argument("--strict", action="store_true",
                   help="stop on the first broken shape instead of skipping it")
    p.add_argument("--max-steps", type=cli.POSITIVE_INT,
                   help="stop after this many steps (smoke tests)")
    p.add_argument("--log-every", type=cli.POSITIVE_INT, default=20, help="steps between log lines")
    p.add_argument("--path-prefix", default=data.PATH_PREFIX,
                   help="prefix of data_path in the split files")
    return p


def parse_args(argv):
    args = cli.apply_preset(build_parser().parse_args(argv), PRESETS)
    args.out = args.out or os.path.join("runs", args.preset)
    cli.check_output(args.out)
    if args.resume:  # a file of the right kind
        load_checkpoint(args.resume, wanted=("stage1",))
    _, _, world_size = launch_env()
    cli.check_batch(args.batch_size, world_size)
    data.check_split(args.data, args.split)
    return args


def heldout_pairs(dataset, indices):
    """(view 0 (M, D), text (M, D)) of the held-out shapes that have a text. Drawn once, at the
    dataset's epoch 0, so the before/after figure compares the same pairs whenever it is
    computed."""
    items = [dataset[i] for i in indices]
    items = [x for x in items if x["valid"] and x["has_text"]]
    if not items:
        raise BadInput("no held-out shape has a text feature; check the split file and "
                       "--text-sources")
    images = torch.stack([x["image_feat"][0] for x in items])
    texts = torch.stack([x["text_feat"] for x in items])
    return images, texts


@torch.no_grad()
def retrieval_top1(images, texts, cia=None):
    """Image -> text top-1 retrieval among the held-out pairs, by cosine similarity."""
    if cia is not None:
        images = cia(images)
    sim = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T     # (M, M)
    return (sim.argmax(1) == torch.arange(len(sim))).float().mean().item()


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    torch.manual_seed(args.seed + env.rank)
    run_dir = os.path.join(args.out, "stage1")
    local_batch = args.batch_size // env.world_size

    # ---- data: only the CLIP features are used; few points are read (every shape is still checked)
    root = args.data or str(synthetic.shared_world(env.local_rank, env.distributed))
    full = data.TrainTriplets(root, args.split, num_points=16, augment=False, seed=args.seed,
                              strict=args.strict, path_prefix=args.path_prefix,
                              text_sources=tuple(args.text_sources))
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(args.seed)).tolist()
    holdout = min(args.holdout, len(full) // 5)
    heldout = heldout_pairs(full, order[:holdout])
    train_set = Subset(full, order[holdout:])
    train_set.set_epoch = full.set_epoch  # the sampler's epoch reaches the dataset through this
    loader, sampler = data.make_train_loader(train_set, local_batch, env.rank, env.world_size,
                                             args.seed, args.workers)
    before = retrieval_top1(*heldout)

    # ---- model, optimizer, and where the run stands
    model = Stage1Model(full.clip_dim, args.ratio).to(env.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=False)  # fp32, but resume expects one
    resume_path = find_resume(args.resume, run_dir)
    step = resume(resume_path, model, optimizer, scaler, env) if resume_path else 0
    train_model = DDP(model) if env.distributed else model
    steps_per_epoch = len(loader)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10**12)
    warmup_steps = args.warmup_epochs * steps_per_epoch
    if env.is_main:
        print(f"stage 1 | {len(train_set)} train / {len(heldout[0])} held-out pairs | "
              f"{steps_per_epoch} steps/epoch | held-out image->text top-1 before (identity): "
              f"{before:.3f} | out {run_dir}")
    if step >= total_steps:  # a finished run: report, write nothing
        after = retrieval_top1(*heldout, model.eval().cia.cpu())
        if env.is_main:
            print(f"already finished at step {step} of {total_steps}: nothing to train, nothing "
                  f"written (more --epochs to continue, or another --out)")
            print(f"held-out image->text top-1: {before:.3f} (identity) -> {after:.3f} (CIA)")
        cleanup_distributed()
        return {"before": before, "after": after, "run_dir": run_dir, "trained": False}

    if env.is_main:
        record_start(run_dir, args, step)
    log = RunLog(run_dir, env.is_main)
    broken = BrokenShapes(run_dir, env.rank, env.world_size)
    batches = data.endless_batches(loader, sampler, step, local_batch)
    t0 = time.time()
    bar = tqdm(total=total_steps, initial=step, disable=None if env.is_main else True)
    while step < total_steps:
        batch = next(batches)
        broken.note(batch)
        # -------------------------------------------------------------------- one training step
        lr = cosine_lr(step, total_steps, warmup_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = batch["image_feat"].to(env.device).transpose(0, 1)               # (V, B, 1280)
        text = batch["text_feat"].to(env.device).expand(len(views), -1, -1)      # (V, B, 1280)
        has_text = (batch["has_text"] & batch["valid"]).to(env.device)           # (B,)
        mask = has_text.expand(len(views), -1)                                   # (V, B)
        # the loss sums, over the views, the contrastive term of each view's adapted feature
        # against the shape's text
        res = contrastive_loss(train_model(views), text, model.logit_scale.exp(), mask)
        res.loss.backward()
        optimizer.step()
        clamp_logit_scale_(model.logit_scale, LOGIT_SCALE_MAX)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # -------------------------------------------------------------------- once in a while
        bar.update()
        if step % args.log_every == 0 or step == total_steps:
            log({"step": step, "epoch": step // steps_per_epoch,
                 "loss": res.per_target.sum().item(), "acc": res.accuracy.mean().item(), "lr": lr,
                 "scale": model.logit_scale.exp().item()})
        if step % args.save_every == 0 or step == total_steps:
            save_latest(run_dir, model, optimizer, scaler, step, steps_per_epoch, args, env)
    bar.close()

    after = retrieval_top1(*heldout, model.eval().cia.cpu())
    if env.is_main:
        cia_path = os.path.join(run_dir, "cia.pt")
        atomic_save({"cia": model.cia.state_dict(), "cia_ratio": args.ratio, "step": step},
                    cia_path)
        minutes = (time.time() - t0) / 60
        log({"step": step, "heldout_top1_before": before, "heldout_top1_after": after,
             "minutes": minutes})
        print(f"held-out image->text top-1: {before:.3f} (identity) -> {after:.3f} (CIA) | "
              f"wrote {cia_path} and {run_dir}/latest.pt ({minutes:.1f} min)")
    cleanup_distributed()
    return {"before": before, "after": after, "run_dir": run_dir, "trained": True}


if __name__ == "__main__":
    cli.run_cli(main)
