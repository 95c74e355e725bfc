"""The contrastive loss of TAMM (paper eq. 7) and OpenShape: symmetric InfoNCE against P target sets
at once.

Stage 2 aligns IAA(f) with each of 4 CIA-adapted image views and TAA(f) with the text feature: P = 5
target sets. Stage 1 aligns CIA(view_v) with the shape's text for 4 views: P = 4. For each target
set p,

    L_p = ( CE(s * a_p t_p^T, i) + CE(s * t_p a_p^T, i) ) / 2,        loss = sum_p L_p,

with a_p, t_p the L2-normalised anchors and targets, s the learnable temperature (one for all
targets) and i the index of each shape's own target. A shape without a target (no text, a broken
file) is neither a positive nor a negative for that target: its row is left out and its column
masked, as OpenShape drops it.

Under DDP (open_clip's ClipLoss with gather_with_grad and local_loss): the features of every rank
are gathered once, with their gradient; each rank computes the rows of its own shapes against the
global batch, labels offset by rank * b, and scales its share by the world size, so that DDP's
gradient average equals one process on the whole batch. The release's loop over the targets (one
clip loss and one gather per target) lives in tools/reference.py as the tests' reference: both give
the same values and gradients.
"""
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOGIT_SCALE_INIT = 14.28  # initial temperature (TAMM configs/Pre-Training/pointbert.yaml)
LOGIT_SCALE_MAX = 100.0   # CLIP's cap on the temperature (the release never clamps it)
MASKED = -1e4             # logit of a masked column: exp(MASKED + s) is 0, in float32 and float64


def logit_scale_parameter(init=LOGIT_SCALE_INIT):
    """The learnable temperature, stored as a log as in CLIP."""
    return torch.nn.Parameter(torch.tensor(math.log(init)))


def clamp_logit_scale_(log_scale, max_scale=LOGIT_SCALE_MAX):
    """After an optimizer step: temperature <= max_scale, clamped on the parameter as CLIP does
    (None: never)."""
    if max_scale is not None:
        with torch.no_grad():
            log_scale.clamp_(max=math.log(max_scale))


def world_info():
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 1 (the batch) with gradient: backward sums every rank's gradient of the
    gathered tensor and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, world = world_info()
        ctx.b = x.shape[1]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(1, ctx.rank * ctx.b, ctx.b)


class LossOutput(NamedTuple):
    loss: torch.Tensor        # scalar to backpropagate: sum over targets, world * this rank's share
    per_target: torch.Tensor  # (P,) global symmetric loss of each target, detached, for the log
    accuracy: torch.Tensor    # (P,) global top-1 accuracy anchor -> target over the valid shapes
    count: torch.Tensor       # (P,) global number of valid (unmasked) shapes of each target


def contrastive_loss(anchors, targets, logit_scale, mask=None):
    """Symmetric InfoNCE of P target sets; equals the release's per-target loop on the global batch.

    anchors, targets: (P, b, D) this rank's features; logit_scale: the temperature s (a scalar
    tensor, not its log); mask: (P, b) bool, False where a shape has no target. Runs in float32
    (float64 stays float64), also inside an autocast region, and never synchronises with the
    host."""
    P, b, D = anchors.shape
    rank, world = world_info()
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    with torch.autocast(anchors.device.type, enabled=False):
        a = F.normalize(anchors.to(dtype), dim=-1)                       # (P, b, D)
        t = F.normalize(targets.to(dtype), dim=-1)                       # (P, b, D)
        s = logit_scale.to(dtype).reshape(())
        if mask is None:
            valid = torch.ones(P, b, dtype=torch.bool, device=a.device)  # (P, b)
        else:
            valid = mask.to(a.device, torch.bool)
        if world > 1:  # one gather for all P targets: [anchors, targets, valid] of every rank
            mine = torch.cat([a, t, valid.unsqueeze(-1).to(dtype)], -1)  # (P, b, 2D + 1)
            every = GatherWithGrad.apply(mine)                           # (P, N, 2D + 1)
            all_a = every[..., :D]                                       # (P, N, D)
            all_t = every[..., D:-1]                                     # (P, N, D)
            all_valid = every[..., -1] > 0                               # (P, N)
        else:
            all_a, all_t, all_valid = a, t, valid                        # N = b
        # this rank's shapes are columns rank * b ... rank * b + b - 1 of the global batch
        labels = (torch.arange(b, device=a.device) + rank * b).repeat(P)  # (P * b,)
        masked = torch.where(all_valid, 0.0, MASKED).to(dtype)           # (P, N)
        logits_a = s * a @ all_t.transpose(1, 2) + masked.unsqueeze(1)   # (P, b, N) a vs every t
        logits_t = s * t @ all_a.transpose(1, 2) + masked.unsqueeze(1)   # (P, b, N) t vs every a
        ce_a = F.cross_entropy(logits_a.flatten(0, 1), labels, reduction="none")  # (P * b,)
        ce_t = F.cross_entropy(logits_t.flatten(0, 1), labels, reduction="none")  # (P * b,)
        # L_p is the mean over the valid shapes of the global batch, both directions averaged
        count = all_valid.sum(1)                                         # (P,)
        weight = valid.to(dtype) / (2 * count.clamp(min=1)).unsqueeze(1)  # (P, b), 0 if masked
        per_target = ((ce_a + ce_t).view(P, b) * weight).sum(1)          # (P,) this rank's share
        hits = (logits_a.argmax(-1) == labels.view(P, b)) & valid        # (P, b) top-1 a -> t
        stats = torch.stack([per_target.detach(), hits.sum(1).to(dtype)])  # (2, P)
        if world > 1:  # for the log: the global loss and accuracy, the same on every rank
            dist.all_reduce(stats)
    return LossOutput(world * per_target.sum(), stats[0], stats[1] / count.clamp(min=1), count)
