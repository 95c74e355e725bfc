"""One stage-2 optimizer step, run alone (`python tests/ddp_step.py OUT`) or under
`torchrun --nproc_per_node=2 tests/ddp_step.py OUT [all|encoder]`; test_reliability.py compares the
two.

Every process builds the same model (same seed) and the same global batch, takes its shard of it,
and does exactly what train_stage2.py does: DDP + SyncBatchNorm (in the whole model, `all`, the
default, or in the encoder only, `encoder`: train_stage2.py --sync-bn, the release's choice), fused
loss over 4 image views + text (some shapes without text), backward, optimizer step.
OUT/world{N}_{mode}.pt holds rank 0's results and the BatchNorm running statistics of every rank.
Dropout is off so the two runs compute the same function, and the run is in float64: in float32
some gradients that are zero in exact arithmetic (biases before BatchNorm) or sums that nearly
cancel differ at the 1e-3 level between *any* two reductions orders, even between one process with
1 and with 2 threads. The step is plain SGD for the same reason: Adam's first step is
lr * sign(g), which turns such noise into full-size weight differences.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import contrastive_loss  # noqa: E402
from model import CONFIGS, TAMM  # noqa: E402
from runtime import cleanup_distributed, setup_distributed, sync_batchnorm  # noqa: E402
from training import param_groups  # noqa: E402

GLOBAL_BATCH, NUM_POINTS, VIEWS, DIM = 8, 256, 4, 1280


def build():
    """The model (seed 0, dropout off) and the global batch (points, image, text, has_text) every
    process starts from; call with float64 as the default dtype (main does; the test rebuilds them
    to compute expectations)."""
    torch.manual_seed(0)
    model = TAMM(CONFIGS["tiny"])
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(1)
    points = torch.rand(GLOBAL_BATCH, NUM_POINTS, 6, generator=g) * 2 - 1
    image = torch.randn(VIEWS, GLOBAL_BATCH, DIM, generator=g)
    text = torch.randn(1, GLOBAL_BATCH, DIM, generator=g)
    return model, points, image, text, torch.arange(GLOBAL_BATCH) % 3 != 1


def batchnorm_statistics(model):
    """{name: buffer} of every BatchNorm's running mean, running variance and batch count."""
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


def main(out_dir, sync_bn="all"):
    env = setup_distributed("cpu")
    torch.set_default_dtype(torch.float64)
    model, points, image, text, has_text = build()
    b = GLOBAL_BATCH // env.world_size
    mine = slice(env.rank * b, (env.rank + 1) * b)

    # as train_stage2.py: global statistics in the encoder, and in the heads unless "encoder"
    if env.distributed:
        sync_batchnorm(model if sync_bn == "all" else model.encoder, env.device)
    train_model = DDP(model) if env.distributed else model
    optimizer = torch.optim.SGD(param_groups(model, 0.01), lr=0.1)
    out = train_model(points[mine])
    targets = torch.cat([image[:, mine], text[:, mine]])
    mask = torch.ones(VIEWS + 1, b, dtype=torch.bool)
    mask[-1] = has_text[mine]
    anchors = torch.stack([out["image"]] * VIEWS + [out["text"]])
    res = contrastive_loss(anchors, targets, model.scale(), mask)
    res.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    statistics = [batchnorm_statistics(model)]
    # every rank's: with per-GPU BatchNorm in the heads they differ between ranks
    if env.distributed:
        statistics = [None] * env.world_size
        dist.all_gather_object(statistics, batchnorm_statistics(model))
    if env.is_main:
        torch.save({"loss": res.per_target.sum().item(), "accuracy": res.accuracy, "grads": grads,
                    "state": model.state_dict(), "batchnorm": statistics},
                   os.path.join(out_dir, f"world{env.world_size}_{sync_bn}.pt"))
    cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
