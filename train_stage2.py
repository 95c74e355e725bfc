"""TAMM stage 2: train the point encoder and the Dual Adapters (paper section 3.3, eq. 5-7).

Each step: points -> encoder f -> IAA(f), TAA(f). The frozen CLIP Image Adapter from stage 1 maps
the 4 sampled image-view features of every shape; the contrastive loss (loss.py) aligns IAA(f) with
each adapted view and TAA(f) with the text feature (of the shapes that have one), with one learnable
temperature. `--head-type openshape` trains the paper's baseline instead: OpenShape's single
Linear(dim -> 1280) projection aligned with the same 4 views and the text, without the CIA (add
--cia PATH for "CIA + one head").

    python train_stage2.py                            # CPU demo on the embedded synthetic world
    python train_stage2.py --data /path/to/openshape  # paper preset, one GPU
    torchrun --nproc_per_node=8 train_stage2.py --data /path/to/openshape
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train_stage2.py --data /path/to/openshape

Batch size and learning rate are GLOBAL: the per-GPU batch is batch_size / world_size and nothing
rescales the learning rate. Outputs go to OUT/stage2/: latest.pt (resume and evaluate), log.jsonl
and config.json; a run restarts from OUT/stage2/latest.pt by itself. No gradient accumulation: the
PointNet and both heads use BatchNorm, whose statistics depend on the micro-batch, so micro-batches
would change the function being trained.
"""
import os
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
import data
import evaluate
import grouping
from checkpoint import find_resume, load_checkpoint, load_cia, resume, save_latest
from files import BadInput
from loss import LOGIT_SCALE_MAX, contrastive_loss
from model import CONFIGS, HEAD_TYPES, TAMM
from runtime import (
    AUTOCAST_DTYPES,
    PRECISIONS,
    cleanup_distributed,
    device_type,
    launch_env,
    resolve_precision,
    setup_distributed,
    sync_batchnorm,
)
from tools import synthetic
from training import BrokenShapes, NonFiniteSteps, RunLog, cosine_lr, make_optimizer, record_start

PRESETS = {
    "paper": dict(epochs=200, batch_size=200, lr=6e-4, warmup_epochs=10, weight_decay=0.01,
                  num_points=10000, scaling=4, split="train_all", workers=8, precision="bf16",
                  save_every=1000, eval_every=1),
    "demo": dict(epochs=41, batch_size=32, lr=2e-3, warmup_epochs=1, weight_decay=0.01,
                 num_points=1024, scaling="tiny", split="train_all", workers=2, precision="fp32",
                 save_every=200, eval_every=14),
}
FLAGS = {  # preset flag: (type or choices, where the paper's value comes from)
    "epochs": (cli.POSITIVE_INT, "TAMM configs/Pre-Training/pointbert.yaml max_epoch; demo: "
               "369 steps"),
    "batch_size": (cli.POSITIVE_INT, "global; the config's 50 per GPU x 4 GPUs"),
    "lr": (cli.POSITIVE, "global AdamW lr; the config's 1.5e-4 per GPU x 4"),
    "warmup_epochs": (cli.COUNT, "warmup_epoch"),
    "weight_decay": (cli.NONNEGATIVE, "PyTorch's AdamW default, as the release"),
    "num_points": (cli.POSITIVE_INT, "num_points"),
    "scaling": (cli.scaling, "model.scaling (model.CONFIGS)"),
    "split": (str, "train_split (the shipped config: ablation/train_shapenet_only; the paper: "
              "train_all)"),
    "workers": (cli.COUNT, "DataLoader workers per process"),
    "precision": (PRECISIONS, "autocast; auto: bf16 on CUDA and on CPUs with native bf16, else "
                  "fp32; TF32 on CUDA unless fp32 (the release: fp32)"),
    "save_every": (cli.POSITIVE_INT, "steps between latest.pt writes"),
    "eval_every": (cli.POSITIVE_INT, "epochs between validation zero-shot runs"),
}


def build_parser():
    """The command line, every flag with its type, default and help."""
    p = cli.preset_parser(__doc__.split("\n\n")[0], PRESETS, FLAGS)
    p.add_argument("--data", type=cli.existing_dir,
                   help="OpenShape data root (default: the embedded synthetic world)")
    p.add_argument("--out", type=cli.output_dir, help="output folder (default: runs/<preset>)")
    p.add_argument("--head-type", "--heads", dest="head_type", choices=HEAD_TYPES, default="dual",
                   help="dual: TAMM's Dual Adapters; openshape: OpenShape's single projection "
                   "(the baseline)")
    p.add_argument("--cia", type=cli.existing_file,
                   help="stage-1 adapter (default with --head-type dual: OUT/stage1/cia.pt)")
    p.add_argument("--no-cia", action="store_true",
                   help="no CLIP Image Adapter (the release's shipped use_cia: False)")
    p.add_argument("--sync-bn", choices=["all", "encoder"],
                   help="under DDP, BatchNorm with global statistics in the encoder and the heads "
                   "(all, default) or in the encoder only (the release)")
    p.add_argument("--resume", type=cli.existing_file,
                   help="checkpoint to resume from (default: OUT/stage2/latest.pt)")
    p.add_argument("--device", type=cli.device,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=cli.COUNT, default=0,
                   help="seed of the data order, augmentation, dropout and initial weights")
    p.add_argument("--strict", action="store_true",
                   help="stop on the first broken shape instead of skipping it")
    p.add_argument("--release-exact", action="store_true",
                   help="the release's choices: weight decay on every tensor, temperature never "
                   "clamped, heads' BatchNorm per GPU, fp32 without TF32")
    p.add_argument("--max-steps", type=cli.POSITIVE_INT,
                   help="stop after this many steps (smoke tests)")
    p.add_argument("--knn", action="store_true",
                   help="hard-negative batches from meta_data/point_feat_knn.npy")
    p.add_argument("--fps-random-start", action="store_true",
                   help="start FPS at a random point in training, as the PointNet++ reference "
                   "(default: point 0)")
    p.add_argument("--val", default="val",
                   choices=["none", "val", "modelnet40", "lvis", "scanobjectnn"],
                   help="benchmark for periodic validation ('none': off); never picks a checkpoint")
    p.add_argument("--max-nonfinite", type=cli.POSITIVE_INT, default=20,
                   help="stop after this many consecutive non-finite losses (each is skipped)")
    p.add_argument("--log-every", type=cli.POSITIVE_INT, default=10, help="steps between log lines")
    p.add_argument("--path-prefix", default=data.PATH_PREFIX,
                   help="prefix of data_path in the split files")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.release_exact:
        args.precision = args.precision or "fp32"
        args.sync_bn = args.sync_bn or "encoder"
    args.sync_bn = args.sync_bn or "all"
    args = cli.apply_preset(args, PRESETS)
    args.out = args.out or os.path.join("runs", args.preset)
    cli.check_output(args.out)
    args.precision = resolve_precision(args.precision, device_type(args.device))
    if args.cia and args.no_cia:
        raise BadInput("--cia and --no-cia: choose one")
    if args.head_type == "dual" and not args.no_cia and not args.cia:  # this run's stage 1
        args.cia = os.path.join(args.out, "stage1", "cia.pt")
        if not os.path.isfile(args.cia):
            raise BadInput(f"{args.cia}: no stage-1 adapter; run train_stage1.py first, pass "
                           f"--cia, or --no-cia")
    if args.cia:  # a file of the right kind: a stage-1 adapter, not another checkpoint
        load_checkpoint(args.cia, wanted=("cia",))
    if args.resume:
        load_checkpoint(args.resume, wanted=("stage2",))
    _, _, world_size = launch_env()
    cli.check_batch(args.batch_size, world_size, min_rows=2)
    cli.check_points(args.num_points, args.scaling)
    data.check_split(args.data, args.split)
    if args.knn:  # what the knn sampler would find out only once the run has started
        local = args.batch_size // world_size
        if local % data.KNN_GROUP_SIZE:
            raise BadInput(f"--knn: the batch per process ({local}) is not a multiple of the knn "
                           f"group size {data.KNN_GROUP_SIZE}; change --batch-size")
        if args.data and not data.find_file(args.data, data.KNN_FILE):
            raise BadInput(f"--knn: {os.path.join(args.data, data.KNN_FILE[0])}: file not found")
    return args


def validate(model, val, env, batch_size):
    """Zero-shot top-1 of each branch on the validation set (monitoring: it picks no checkpoint)."""
    loader = data.make_eval_loader(val, batch_size, env.rank, env.world_size)
    feats = evaluate.extract_features(model.eval(), loader, env.device)
    metrics = evaluate.zero_shot(feats, val.class_feat, single_branch=model.head_type != "dual")
    model.train()
    return {f"val_{branch}_top1": m["top1"] for branch, m in metrics.items()}


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    torch.manual_seed(args.seed + env.rank)
    tf32 = env.device.type == "cuda" and args.precision != "fp32"  # fp32 means fp32, as the release
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    run_dir = os.path.join(args.out, "stage2")
    local_batch = args.batch_size // env.world_size

    # ---- data
    root = args.data or str(synthetic.shared_world(env.local_rank, env.distributed))
    dataset = data.TrainTriplets(root, args.split, num_points=args.num_points, seed=args.seed,
                                 strict=args.strict, path_prefix=args.path_prefix)
    knn = None
    if args.knn:
        knn = data.find_file(root, data.KNN_FILE) or os.path.join(root, data.KNN_FILE[0])
    loader, sampler = data.make_train_loader(dataset, local_batch, env.rank, env.world_size,
                                             args.seed, args.workers, knn=knn)
    val = None
    if args.val != "none":
        benchmarks = data.load_benchmarks(root, args.num_points, names=(args.val,),
                                          path_prefix=args.path_prefix)
        val = benchmarks.get(args.val)
        if val is None and env.is_main:
            print(f"note: no '{args.val}' benchmark under {root}; periodic validation is off")

    # ---- model: encoder + heads + temperature in one module (one DDP wrapper); the CIA is frozen
    cia = load_cia(args.cia).to(env.device) if args.cia else nn.Identity()
    logit_scale_max = None if args.release_exact else LOGIT_SCALE_MAX
    model = TAMM(CONFIGS[args.scaling], clip_dim=dataset.clip_dim, head_type=args.head_type,
                 logit_scale_max=logit_scale_max).to(env.device)
    model.encoder.patch_embed.random_start = args.fps_random_start
    optimizer = make_optimizer(model, args.lr, args.weight_decay, env.device,
                               decay_everything=args.release_exact)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.precision == "fp16")
    autocast = torch.autocast(env.device.type, dtype=AUTOCAST_DTYPES[args.precision],
                              enabled=args.precision != "fp32")

    # ---- where the run stands: resumed from OUT/stage2/latest.pt, or already finished
    resume_path = find_resume(args.resume, run_dir)
    step = resume(resume_path, model, optimizer, scaler, env) if resume_path else 0
    steps_per_epoch = len(loader)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10**12)
    warmup_steps = args.warmup_epochs * steps_per_epoch
    if step >= total_steps:
        if env.is_main:
            print(f"already finished at step {step} of {total_steps}: nothing to train, nothing "
                  f"written (more --epochs to continue, or another --out)")
        cleanup_distributed()
        return run_dir
    train_model = model
    if env.distributed:  # global-batch BatchNorm in the encoder (the release), and in the heads
        # unless --sync-bn encoder
        sync_batchnorm(model if args.sync_bn == "all" else model.encoder, env.device)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        train_model = DDP(model, device_ids=device_ids)
    if args.compile:
        grouping.run_eagerly_under_compile()
        train_model = torch.compile(train_model)

    if env.is_main:
        record_start(run_dir, args, step)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"stage 2 | {len(dataset)} shapes | {steps_per_epoch} steps/epoch | global batch "
              f"{args.batch_size} | {params:.2f}M params | heads {args.head_type} | CIA "
              f"{args.cia or 'none'} | {args.precision} | {env.world_size} x {env.device.type} | "
              f"out {run_dir}")
    log = RunLog(run_dir, env.is_main)
    nonfinite = NonFiniteSteps(model, args.max_nonfinite, log, os.path.join(run_dir, "latest.pt"))
    broken = BrokenShapes(run_dir, env.rank, env.world_size)
    batches = data.endless_batches(loader, sampler, step, local_batch)
    skipped = 0
    saved = None  # the last latest.pt written
    t0 = time.time()
    last_time, last_step = t0, step
    train_model.train()
    bar = tqdm(total=total_steps, initial=step, disable=None if env.is_main else True)
    while step < total_steps:
        batch = next(batches)
        broken.note(batch)
        # -------------------------------------------------------------------- one training step
        lr = cosine_lr(step, total_steps, warmup_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        points = batch["points"].to(env.device, non_blocking=True)          # (B, N, 6) xyz, rgb
        views = batch["image_feat"].to(env.device, non_blocking=True)       # (B, V, 1280)
        views = views.transpose(0, 1)                                       # (V, B, 1280)
        text = batch["text_feat"].to(env.device, non_blocking=True)         # (B, 1280)
        valid = batch["valid"].to(env.device)                               # (B,) not broken
        has_text = batch["has_text"].to(env.device)                         # (B,)
        with torch.no_grad():
            targets = torch.cat([cia(views), text[None]])                   # (V + 1, B, 1280)
        mask = torch.cat([valid.expand(len(views), -1), (valid & has_text)[None]])  # (V + 1, B)
        nonfinite.remember()  # the BatchNorm statistics, put back if this step is skipped
        with autocast:
            out = train_model(points)                                       # f, IAA(f), TAA(f)
        anchors = torch.stack([out["image"]] * len(views) + [out["text"]])  # (V + 1, B, 1280)
        # eq. 7: L = sum_v CLIP(IAA(f), CIA(I_v)) + CLIP(TAA(f), T); negatives: the global batch
        res = contrastive_loss(anchors, targets, model.scale(), mask)
        scaler.scale(res.loss).backward()
        if torch.isfinite(res.per_target).all():  # all-reduced: every rank decides alike
            scaler.step(optimizer)
            scaler.update()
            model.clamp_logit_scale_()  # temperature <= 100, as CLIP (--release-exact: never)
            nonfinite.reset()
        else:  # no update; the BatchNorm statistics go back; too many in a row stop the run
            nonfinite.skip(step + 1)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # -------------------------------------------------------------------- once in a while
        bar.update()
        skipped += args.batch_size - res.count[0]
        if nonfinite.in_a_row:  # nothing new to log or save after a skipped step
            continue
        epoch = step // steps_per_epoch
        if step % args.log_every == 0 or step == total_steps:
            now = time.time()
            rate = (step - last_step) * args.batch_size / (now - last_time)
            last_time, last_step = now, step
            log({"step": step, "epoch": epoch, "loss": res.per_target.sum().item(),
                 "loss_image": res.per_target[:-1].mean().item(),  # one view target's term
                 "loss_text": res.per_target[-1].item(),
                 "acc_image": res.accuracy[:-1].mean().item(), "acc_text": res.accuracy[-1].item(),
                 "lr": lr, "scale": model.scale().item(), "interval_samples_s": rate,
                 "skipped_shapes": int(skipped)})
        if val is not None and (step % (args.eval_every * steps_per_epoch) == 0
                                or step == total_steps):
            log({"step": step, "epoch": epoch, **validate(model, val, env, local_batch)})
        if step % args.save_every == 0 or step == total_steps:
            saved = save_latest(run_dir, model, optimizer, scaler, step, steps_per_epoch, args, env,
                                variant={"head_type": args.head_type, "cia": args.cia},
                                teacher=synthetic.teacher_of(root))
    bar.close()
    if env.is_main:
        wrote = f" | wrote {saved}" if saved else ""
        print(f"stage 2 done: step {step} in {(time.time() - t0) / 60:.1f} min{wrote}")
    cleanup_distributed()
    return run_dir


if __name__ == "__main__":
    cli.run_cli(main)
