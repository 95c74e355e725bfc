"""TAMM stage 2: train the point encoder and the Dual Adapters (paper section 3.3, eq. 5-7).

Each step: points -> encoder f -> IAA(f), TAA(f). The frozen CLIP Image Adapter from stage 1 maps the 4 sampled
image-view features of every shape; the contrastive loss (loss.py) aligns IAA(f) with each adapted view and
TAA(f) with the text feature (only shapes that have a text), with one learnable temperature.
`--heads openshape` trains the paper's baseline instead: OpenShape's one Linear(dim -> 1280) projection aligned
with the same 4 views and text, without CIA (add --cia PATH for the "CIA + one head" ablation).

    python train_stage2.py                               # CPU demo on the embedded synthetic world (~2 min)
    python train_stage2.py --data /path/to/openshape      # paper preset, one GPU
    torchrun --nproc_per_node=8 train_stage2.py --data /path/to/openshape
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train_stage2.py --data ...

Batch size and learning rate are GLOBAL: the per-GPU batch is batch_size / world_size and nothing rescales the
learning rate. Outputs go to OUT/stage2/: latest.pt (resume + evaluate), log.jsonl, config.json; a run restarts
from OUT/stage2/latest.pt automatically. No gradient accumulation: the PointNet and both heads use BatchNorm,
whose statistics depend on the micro-batch, so micro-batching would change the function being trained. For
batches beyond memory add GPUs (the loss's negatives are the global batch) and bound the loss with --loss-chunk.
"""
import os
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate
import training as T
from checkpoint import (KNN_GROUP_SIZE, endless_batches, find_resume, load_cia, make_eval_loader, make_train_loader,
                        resume, save_latest)
from loss import contrastive_loss
from model import CONFIGS, TAMM

PRESETS = {
    "paper": dict(epochs=200, batch_size=200, lr=6e-4, warmup_epochs=10, weight_decay=0.01, num_points=10000,
                  scaling=4, split="train_all", workers=8, precision="bf16", save_every=1000, eval_every=1),
    "demo": dict(epochs=41, batch_size=32, lr=2e-3, warmup_epochs=1, weight_decay=0.01, num_points=1024,
                 scaling="tiny", split="train_all", workers=2, precision="fp32", save_every=200, eval_every=14),
}
FLAGS = {  # preset flag: (type, where the paper value comes from)
    "epochs": (T.POSITIVE_INT, "TAMM configs/Pre-Training/pointbert.yaml max_epoch / demo: 369 steps, ~80 CPU s"),
    "batch_size": (T.POSITIVE_INT, "global; the config's 50 per GPU x 4 GPUs"),
    "lr": (T.POSITIVE, "global AdamW lr; the config's 1.5e-4 per GPU x 4"),
    "warmup_epochs": (T.COUNT, "warmup_epoch"), "weight_decay": (T.NONNEGATIVE, "PyTorch AdamW default, as the release"),
    "num_points": (T.POSITIVE_INT, "num_points"), "scaling": (T.scaling, "model.scaling (model.CONFIGS)"),
    "split": (str, "train_split (the shipped config: ablation/train_shapenet_only; the paper: train_all)"),
    "workers": (T.COUNT, "DataLoader workers per process"),
    "precision": (T.choice("bf16", "fp16", "fp32"), "bf16 autocast + TF32 on CUDA (release: fp32)"),
    "save_every": (T.POSITIVE_INT, "steps between latest.pt writes"),
    "eval_every": (T.POSITIVE_INT, "epochs between validation zero-shot runs"),
}


def parse_args(argv):
    p = T.preset_parser(__doc__.split("\n\n")[0], PRESETS, FLAGS)
    p.add_argument("--data", type=T.existing_dir, help="OpenShape data root (default: the embedded synthetic world)")
    p.add_argument("--out", type=T.output_dir, help="output folder (default: runs/<preset>)")
    p.add_argument("--heads", choices=["dual", "openshape"], default="dual",
                   help="dual: TAMM's Dual Adapters; openshape: OpenShape's single projection (the baseline)")
    p.add_argument("--cia", type=T.existing_file, help="stage-1 adapter (default with --heads dual: OUT/stage1/cia.pt)")
    p.add_argument("--no-cia", action="store_true", help="no CLIP Image Adapter (the release's shipped use_cia: False)")
    p.add_argument("--sync-bn", choices=["all", "encoder"], help="under DDP, BatchNorm with global statistics in "
                   "the encoder and the heads (all, default) or in the encoder only (the release)")
    p.add_argument("--resume", type=T.existing_file, help="checkpoint to resume from (default: OUT/stage2/latest.pt)")
    p.add_argument("--device", type=T.device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=T.COUNT, default=0)
    p.add_argument("--strict", action="store_true", help="stop on the first broken shape instead of skipping it")
    p.add_argument("--release-exact", action="store_true", help="the release's choices: weight decay on every "
                   "tensor, temperature never clamped, heads' BatchNorm per GPU, fp32 without TF32")
    p.add_argument("--max-steps", type=T.POSITIVE_INT, help="stop after this many steps (smoke tests)")
    p.add_argument("--loss-chunk", type=T.POSITIVE_INT, help="rows per block in the loss (bounds its memory)")
    p.add_argument("--knn", action="store_true", help="hard-negative batches from meta_data/point_feat_knn.npy")
    p.add_argument("--fps-random-start", action="store_true",
                   help="start FPS at a random point in training, as the PointNet++ reference (default: point 0)")
    p.add_argument("--val", default="val", choices=["none", "val", "modelnet40", "lvis", "scanobjectnn"],
                   help="benchmark for periodic validation ('none': off); never picks a checkpoint")
    p.add_argument("--max-nonfinite", type=T.POSITIVE_INT, default=20,
                   help="stop after this many consecutive non-finite losses (each is skipped)")
    p.add_argument("--log-every", type=T.POSITIVE_INT, default=10)
    p.add_argument("--path-prefix", default=data.PATH_PREFIX, help="prefix of data_path in the split files")
    args = p.parse_args(argv)
    if args.release_exact:
        args.precision, args.sync_bn = args.precision or "fp32", args.sync_bn or "encoder"
    args.sync_bn = args.sync_bn or "all"
    args = T.apply_preset(args, PRESETS)
    if args.cia and args.no_cia:
        raise T.BadInput("--cia and --no-cia: choose one")
    if args.heads == "dual" and not args.no_cia and not args.cia:  # the default: stage 1's adapter of this run
        args.cia = os.path.join(args.out or os.path.join("runs", args.preset), "stage1", "cia.pt")
        if not os.path.isfile(args.cia):
            raise T.BadInput(f"{args.cia}: no stage-1 adapter; run train_stage1.py first, pass --cia, or --no-cia")
    T.check_batch(args.batch_size, min_rows=2)
    T.check_points(args.num_points, args.scaling)
    data.check_split(args.data, args.split)
    if args.knn:  # what the knn sampler would find out only once the run has started
        local = args.batch_size // int(os.environ.get("WORLD_SIZE", "1"))
        if local % KNN_GROUP_SIZE:
            raise T.BadInput(f"--knn: the batch per process ({local}) is not a multiple of the knn group size "
                             f"{KNN_GROUP_SIZE}; change --batch-size")
        if args.data and not data.find_file(args.data, data.KNN_FILE):
            raise T.BadInput(f"--knn: {os.path.join(args.data, data.KNN_FILE[0])}: file not found")
    return args


def validate(model, val, env, batch_size):
    """Zero-shot top-1 of each branch on the validation set (monitoring only: no checkpoint is selected)."""
    feats = evaluate.extract_features(model.eval(), make_eval_loader(val, batch_size, env.rank, env.world_size),
                                      env.device)
    metrics = evaluate.zero_shot(feats, val.class_feat, single_branch=model.heads != "dual")
    model.train()
    return {f"val_{branch}_top1": m["top1"] for branch, m in metrics.items()}


def main(argv=None):
    args = parse_args(argv)
    env = T.setup_distributed(args.device)
    torch.manual_seed(args.seed + env.rank)
    tf32 = env.device.type == "cuda" and args.precision != "fp32"  # fp32 means fp32, as in the release
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    run_dir, log = T.start_run(args, env, "stage2")
    local_batch = args.batch_size // env.world_size

    # ---- data
    root = T.data_root(args.data, env)
    dataset = data.TrainTriplets(root, args.split, num_points=args.num_points, seed=args.seed, strict=args.strict,
                                 path_prefix=args.path_prefix)
    knn = (data.find_file(root, data.KNN_FILE) or os.path.join(root, data.KNN_FILE[0])) if args.knn else None
    loader, sampler = make_train_loader(dataset, local_batch, env.rank, env.world_size, args.seed, args.workers,
                                        knn=knn)
    val = None if args.val == "none" else data.load_benchmarks(root, args.num_points, names=(args.val,),
                                                               path_prefix=args.path_prefix).get(args.val)
    if val is None and args.val != "none" and env.is_main:
        print(f"note: no '{args.val}' benchmark under {root}; periodic validation is off")

    # ---- model: encoder + heads + temperature in one module (one DDP wrapper); the CIA is frozen, outside it
    cia_path = args.cia  # checked by parse_args (default with --heads dual: OUT/stage1/cia.pt)
    cia = load_cia(cia_path).to(env.device) if cia_path else nn.Identity()
    model = TAMM(CONFIGS[args.scaling], clip_dim=dataset.clip_dim, heads=args.heads,
                 logit_scale_max=None if args.release_exact else 100.0).to(env.device)
    model.encoder.patch_embed.random_start = args.fps_random_start
    optimizer = torch.optim.AdamW(T.param_groups(model, args.weight_decay, decay_everything=args.release_exact),
                                  lr=args.lr, betas=(0.9, 0.999), eps=1e-8,  # betas, eps: the official config
                                  fused=env.device.type == "cuda")  # on CUDA one kernel for all tensors (bench.py)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.precision == "fp16")
    resume_path = find_resume(args.resume, run_dir)
    start = resume(resume_path, model, optimizer, scaler, env) if resume_path else 0
    train_model = model
    if env.distributed:  # SyncBatchNorm: the encoder's always (as the release), the heads' unless --sync-bn encoder
        T.sync_batchnorm(model if args.sync_bn == "all" else model.encoder, env.device)
        train_model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    steps_per_epoch = len(loader)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10 ** 12)
    warmup_steps = args.warmup_epochs * steps_per_epoch
    guard = T.NonFiniteGuard(model, args.max_nonfinite, log, os.path.join(run_dir, "latest.pt"))
    batches = endless_batches(loader, sampler, start, local_batch)
    skipped, seen, t0 = 0, 0, time.time()
    if env.is_main:
        print(f"stage 2 | {len(dataset)} shapes | {steps_per_epoch} steps/epoch | global batch {args.batch_size} | "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | heads {args.heads} | CIA "
              f"{cia_path or 'none'} | {env.world_size} x {env.device.type} | out {run_dir}")

    train_model.train()
    bar = tqdm(total=total_steps, initial=start, disable=None if env.is_main else True)
    step = start
    while step < total_steps:
        batch = next(batches)
        # ---------------------------------------------------------------------------------- one training step
        lr = T.cosine_lr(step, total_steps, warmup_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        points = batch["points"].to(env.device, non_blocking=True)                           # (B, N, 6) xyz, rgb
        views = batch["image_feat"].to(env.device, non_blocking=True).transpose(0, 1)         # (V, B, 1280)
        text = batch["text_feat"].to(env.device, non_blocking=True)                           # (B, 1280)
        valid, has_text = batch["valid"].to(env.device), batch["has_text"].to(env.device)     # (B,) broken, no text
        with torch.no_grad():
            targets = torch.cat([cia(views), text[None]])                                     # (V + 1, B, 1280)
        mask = torch.cat([valid.expand(len(views), -1), (valid & has_text)[None]])            # (V + 1, B)
        guard.remember()  # the BatchNorm statistics, restored if this step's loss is not finite
        with T.autocast(env.device, args.precision):
            out = train_model(points)                                                         # f, IAA(f), TAA(f)
        anchors = torch.stack([out["image"]] * len(views) + [out["text"]])                    # (V + 1, B, 1280)
        # eq. 7: L = sum_v CLIP(IAA(f), CIA(I_v)) + CLIP(TAA(f), T), one temperature, negatives = the global batch
        res = contrastive_loss(anchors, targets, logit_scale=model.scale(), mask=mask, chunk_size=args.loss_chunk)
        scaler.scale(res.loss).backward()
        if guard.ok(step + 1, res.per_target):  # a non-finite loss: no update (and a log line)
            scaler.step(optimizer)
            scaler.update()
            model.clamp_logit_scale_()  # temperature <= 100, as CLIP (--release-exact: never clamped)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # ---------------------------------------------------------------------------------- once in a while
        bar.update()
        skipped, seen = skipped + args.batch_size - res.count[0], seen + args.batch_size
        if guard.in_a_row:  # nothing new to log or save after a skipped step
            continue
        if step % args.log_every == 0 or step == total_steps:
            log({"step": step, "epoch": step // steps_per_epoch, "loss": res.per_target.sum().item(),
                 "acc_image": res.accuracy[:-1].mean().item(), "acc_text": res.accuracy[-1].item(), "lr": lr,
                 "scale": model.scale().item(), "samples_s": seen / (time.time() - t0), "skipped_shapes": int(skipped)})
        if val is not None and (step % (args.eval_every * steps_per_epoch) == 0 or step == total_steps):
            log({"step": step, "epoch": step // steps_per_epoch, **validate(model, val, env, local_batch)})
        if step % args.save_every == 0 or step == total_steps:
            save_latest(run_dir, model, optimizer, scaler, step, steps_per_epoch, args, env,
                        variant={"heads": args.heads, "cia": cia_path})
    T.cleanup_distributed()
    return run_dir


if __name__ == "__main__":
    T.run_cli(main)
