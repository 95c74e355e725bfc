"""TAMM stage 2: train the point encoder and the Dual Adapters (paper section 3.3, eq. 5-7).

Each step: points -> encoder f -> IAA(f), TAA(f). The frozen CLIP Image Adapter from stage 1 maps the 4 sampled
image-view features of every shape; the fused contrastive loss (loss.py) aligns IAA(f) with each of the 4
adapted views and TAA(f) with the text feature (only shapes that have a text), with one learnable temperature.

    python train_stage2.py                              # CPU demo on the embedded synthetic world (~5 min)
    python train_stage2.py --data /path/to/openshape     # paper preset, one GPU
    torchrun --nproc_per_node=8 train_stage2.py --data /path/to/openshape
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train_stage2.py --data ...

Batch size and learning rate are GLOBAL (summed over GPUs): the per-GPU batch is batch_size / world_size, and
no hidden `lr *= num_gpus` happens. Outputs go to OUT/stage2/: latest.pt (resume + evaluate), log.jsonl,
config.json. A run restarts from OUT/stage2/latest.pt automatically if it exists.

No gradient accumulation: the encoder's PointNet and both adapter heads use BatchNorm, whose statistics depend
on the micro-batch, so micro-batching changes the function being trained (not only the negatives), and
open_clip's cache-and-recompute trick would also need identical dropout masks in both passes. The global
batch of the paper (200) fits without it; for larger batches add GPUs (the loss's negatives are the global
batch at any world size) and use --loss-chunk to bound the loss memory.
"""
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate
from adapters import load_cia
from loss import contrastive_loss
from model import TAMM, encoder_config
from training import (all_ranks_have_rows, all_reduce_mean, apply_preset, autocast, cosine_lr,
                      data_root, find_resume, param_groups, preset_parser, resume, save_latest, start_run,
                      sync_batchnorm)
from utils import BadInput, cleanup_distributed, run_cli, setup_distributed

PRESETS = {
    "paper": dict(epochs=200, batch_size=200, lr=6e-4, warmup_epochs=10, weight_decay=0.01, num_points=10000,
                  scaling="4", split="train_all", workers=8, precision="bf16", save_every=1000, eval_every=1),
    "demo": dict(epochs=12, batch_size=32, lr=2e-3, warmup_epochs=1, weight_decay=0.01, num_points=1024,
                 scaling="tiny", split="train_all", workers=2, precision="fp32", save_every=200, eval_every=4),
}
SOURCES = {
    "epochs": "TAMM stage-2 config / demo: ~5 CPU minutes",
    "batch_size": "global; official 50 per GPU x 4 GPUs",
    "lr": "global AdamW lr; official 1.5e-4 per GPU x 4",
    "warmup_epochs": "official config", "weight_decay": "PyTorch AdamW default, as the release",
    "num_points": "OpenShape/TAMM dataset.num_points", "scaling": "PointBERT size (model.CONFIGS)",
    "split": "OpenShape split file", "workers": "DataLoader workers per process",
    "precision": "bf16 autocast on CUDA (release: fp32)", "save_every": "steps between latest.pt writes",
    "eval_every": "epochs between validation zero-shot runs",
}


def parse_args(argv):
    p = preset_parser(__doc__.split("\n\n")[0], PRESETS, SOURCES, choices={"precision": ("bf16", "fp16", "fp32")})
    p.add_argument("--data", help="OpenShape data root (default: the embedded synthetic world)")
    p.add_argument("--out", help="output folder (default: runs/<preset>)")
    p.add_argument("--cia", help="stage-1 adapter (default: OUT/stage1/cia.pt)")
    p.add_argument("--no-cia", action="store_true", help="no CLIP Image Adapter: the OpenShape-style ablation")
    p.add_argument("--resume", help="checkpoint to resume from (default: OUT/stage2/latest.pt if present)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="stop on the first broken shape instead of skipping it")
    p.add_argument("--release-exact", action="store_true",
                   help="reproduce the release: weight decay on every tensor, temperature never clamped")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    p.add_argument("--loss-chunk", type=int, help="rows per block in the loss (bounds memory for huge batches)")
    p.add_argument("--knn", action="store_true", help="hard-negative batches from meta_data/point_feat_knn.npy")
    p.add_argument("--fps-random-start", action="store_true",
                   help="start FPS at a random point in training, as the PointNet++ reference (default: point 0)")
    p.add_argument("--val", default="val", help="benchmark for periodic validation ('none' to disable); "
                   "never used to pick a checkpoint")
    p.add_argument("--max-nonfinite", type=int, default=20,
                   help="stop after this many consecutive non-finite losses (each is skipped)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--path-prefix", default=data.PATH_PREFIX, help="prefix of data_path in the split files")
    return apply_preset(p.parse_args(argv), PRESETS)


def validate(model, val, env, batch_size):
    """Zero-shot top-1 of each branch on the validation set (monitoring only: no checkpoint is selected)."""
    loader = data.make_eval_loader(val, batch_size, env.rank, env.world_size)
    feats = evaluate.extract_features(model.eval(), loader, env.device)
    metrics = evaluate.zero_shot(feats, val.class_feat, single_branch=model.heads != "dual")
    return {f"val_{branch}_top1": m["top1"] for branch, m in metrics.items()}


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    torch.manual_seed(args.seed + env.rank)
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_dir, local_batch, log = start_run(args, env, "stage2")
    if local_batch < 2:
        raise BadInput(f"--batch-size {args.batch_size} gives {local_batch} shape per process; BatchNorm needs >= 2")

    # ---- data
    root = data_root(args.data, env)
    dataset = data.TrainTriplets(root, args.split, num_points=args.num_points, seed=args.seed, strict=args.strict,
                                 path_prefix=args.path_prefix)
    knn = (data.find_file(root, data.KNN_FILE) or os.path.join(root, data.KNN_FILE[0])) if args.knn else None
    loader, sampler = data.make_train_loader(dataset, local_batch, env.rank, env.world_size, args.seed,
                                             args.workers, knn=knn)
    val = None
    if args.val != "none":
        val = data.load_benchmarks(root, args.num_points, names=(args.val,), path_prefix=args.path_prefix).get(args.val)
        if val is None and env.is_main:
            print(f"note: no '{args.val}' benchmark under {root}; periodic validation is off")

    # ---- model: encoder + dual adapters + temperature in one module, one DDP wrapper; CIA frozen outside
    cia = None
    if not args.no_cia:
        cia_path = args.cia or os.path.join(os.path.dirname(run_dir), "stage1", "cia.pt")
        if not os.path.exists(cia_path):
            raise BadInput(f"{cia_path}: no stage-1 adapter; run train_stage1.py first, pass --cia, or --no-cia")
        cia = load_cia(cia_path).to(env.device)
    model = TAMM(encoder_config(args.scaling), clip_dim=dataset.clip_dim,
                 logit_scale_max=None if args.release_exact else 100.0).to(env.device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, decay_everything=args.release_exact),
                                  lr=args.lr, betas=(0.9, 0.999), eps=1e-8)  # betas/eps: official config
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" and env.device.type == "cuda" else None
    model.encoder.patch_embed.random_start = args.fps_random_start
    step = start_epoch = start_batch = 0
    resume_path = find_resume(args.resume, run_dir)
    if resume_path:
        step, start_epoch, start_batch = resume(resume_path, model, optimizer, scaler, env)
    train_model = model
    if env.distributed:
        train_model = DDP(sync_batchnorm(model, env.device),
                          device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    steps_per_epoch = len(loader)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10 ** 12)
    warmup = args.warmup_epochs * steps_per_epoch
    skipped_shapes = nonfinite = 0
    res = None
    if env.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage 2 | {len(dataset)} shapes | {steps_per_epoch} steps/epoch | global batch {args.batch_size} "
              f"| {n_params / 1e6:.2f}M params | {env.world_size} x {env.device.type} | out {run_dir}")

    # ---- train
    train_model.train()
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch)  # also the dataset's epoch: its augmentation depends on it
        first = start_batch if epoch == start_epoch else 0
        sampler.skip(first * local_batch)
        bar = tqdm(loader, total=steps_per_epoch, initial=first, disable=None if env.is_main else True, leave=False,
                   desc=f"epoch {epoch}")
        t0, seen = time.time(), 0
        for batch_idx, batch in enumerate(bar, start=first):
            lr = cosine_lr(step, total_steps, warmup, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            skipped_shapes += batch["num_skipped"]
            if not all_ranks_have_rows(batch, env):  # an all-broken batch somewhere: every rank skips it
                continue
            points = batch["points"].to(env.device, non_blocking=True)                   # (B, N, 6)
            image = batch["image_feat"].to(env.device, non_blocking=True).transpose(0, 1)  # (V, B, D)
            text = batch["text_feat"].to(env.device, non_blocking=True)                   # (B, D)
            with torch.no_grad():
                image = cia(image) if cia is not None else image
            targets = torch.cat([image, text.unsqueeze(0)])                              # (V + 1, B, D)
            mask = batch["valid"].to(env.device).repeat(targets.shape[0], 1)              # (V + 1, B)
            mask[-1] &= batch["has_text"].to(env.device)
            buffers = [b.clone() for b in model.buffers()]  # BatchNorm statistics, restored if the step is bad
            with autocast(env.device, args.precision):
                out = train_model(points)
            anchors = torch.stack([out["image"]] * image.shape[0] + [out["text"]])       # (V + 1, B, D)
            res = contrastive_loss(anchors, targets, model.scale(), mask, args.loss_chunk)
            if not torch.isfinite(res.per_target.sum()):  # same decision on every rank (all-reduced)
                nonfinite += 1
                if env.distributed:  # DDP expects a backward after each forward; these gradients are dropped
                    res.loss.backward()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b, saved in zip(model.buffers(), buffers):
                        b.copy_(saved)
                log({"step": step, "event": "non-finite loss, step skipped", "consecutive": nonfinite})
                if nonfinite >= args.max_nonfinite:
                    raise SystemExit(f"stopping: {nonfinite} consecutive non-finite losses; "
                                     f"last good checkpoint: {os.path.join(run_dir, 'latest.pt')}")
                continue
            nonfinite = 0
            if scaler is not None:
                scaler.scale(res.loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                res.loss.backward()
                optimizer.step()
            model.clamp_logit_scale_()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += points.shape[0] * env.world_size

            if step % args.log_every == 0 or step == total_steps:
                rate = seen / (time.time() - t0)
                record = {"step": step, "epoch": epoch, "loss": res.per_target.sum().item(),
                          "acc_image": res.accuracy[:-1].mean().item(), "acc_text": res.accuracy[-1].item(),
                          "lr": lr, "scale": model.scale().item(), "samples_s": rate,
                          "skipped_shapes": int(all_reduce_mean(torch.tensor(float(skipped_shapes), device=env.device))
                                                * env.world_size)}
                log(record, echo=bar.disable)  # plain lines when there is no bar (not a terminal)
                bar.set_postfix(loss=f"{record['loss']:.3f}", img=f"{record['acc_image']:.2f}",
                                txt=f"{record['acc_text']:.2f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
            last_in_epoch = batch_idx + 1 == steps_per_epoch
            if (step % args.save_every == 0 or step == total_steps) and not last_in_epoch:
                save_latest(run_dir, model, optimizer, scaler, step, epoch, batch_idx + 1, args, env)
            if step >= total_steps:
                break
        if env.is_main and res is not None:
            print(f"epoch {epoch} | step {step} | loss {res.per_target.sum().item():.4f} | "
                  f"acc img {res.accuracy[:-1].mean().item():.3f} txt {res.accuracy[-1].item():.3f} | "
                  f"{seen / (time.time() - t0):.1f} samples/s | skipped shapes {skipped_shapes}", flush=True)
        done_epoch = step < total_steps or batch_idx + 1 == steps_per_epoch
        if val is not None and ((epoch + 1) % args.eval_every == 0 or step >= total_steps):
            log({"step": step, "epoch": epoch, **validate(model, val, env, local_batch)})
            train_model.train()
        save_latest(run_dir, model, optimizer, scaler, step, epoch + 1 if done_epoch else epoch,
                    0 if done_epoch else batch_idx + 1, args, env)
    cleanup_distributed()
    return run_dir


if __name__ == "__main__":
    run_cli(main)
