"""The contrastive (InfoNCE / CLIP) loss of TAMM, fused over targets, batched, distributed.

Paper: TAMM eq. 1-4 (and OpenShape): for every target set (4 image views of CIA-adapted CLIP features and the
text features in stage 2; the text features in stage 1) the symmetric cross-entropy over the cosine-similarity
matrix times a learnable temperature; the text term only over shapes that have a text; the losses are summed.
The release computes 5 separate losses per step, each with its own all_gather, logit matrix and two
cross-entropies. `contrastive_loss` does all P targets at once:

  - one all_gather of the stacked (2, P, B, D) features, with gradient for the local shard; each rank only
    computes the rows of its own samples (labels offset by rank), as open_clip's `local_loss=True`;
  - one batched matmul of the logits and, in a single pass over each logit block, the row log-sum-exp and
    (with one process) the column log-sum-exp; accuracies come from the same pass;
  - a custom autograd.Function that keeps the logits and two log-sum-exp vectors and rebuilds the gradient of
    the logits in place block by block, instead of keeping row and column softmax matrices alive;
  - `chunk_size` processes rows in blocks and keeps no logits at all (recomputed in backward), so a 16k+
    global batch never holds a (P, B, B) matrix in one piece. By default the logits are kept while they
    take at most KEEP_LOGITS elements (fastest: 3 matmuls per target) and recomputed one target at a time
    beyond that (4 matmuls per target, the memory of one (B, B) block).

Scaling under DDP: rank r returns world * (its local share of the global loss), so that DDP's gradient
*average* equals the gradient of the global loss, i.e. exactly one process on the concatenated batch.

    python -m pytest -q tests/test_loss.py
"""
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from utils import world_info

KEEP_LOGITS = 2 ** 25  # (P, B, N) logits kept for backward up to this many elements (128 MB in fp32)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along `dim`; backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x, dim):
        rank, world = world_info()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.dim, ctx.rank, ctx.size = dim, rank, x.shape[dim]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None


def _blocks(n, chunk):
    step = n if chunk is None else max(1, chunk)
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


class _FusedInfoNCE(torch.autograd.Function):
    """Per-target sum_i w[p, i] * CE(row i of s * q_p @ k_p.T, label offset + i)  (+ the column terms).

    q (P, b, D) queries (this rank's rows), k (P, N, D) keys, s a scalar, row_w (P, b) row weights,
    col_w (P, N) column weights (only with `both`: one process, where the columns of the same matrix are the
    other direction of the symmetric loss), row_ok (P, b) / key_ok (P, N) which rows/columns take part.
    Returns (per-target loss (P,), correct (P, b) top-1 of each row)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # fp32 even inside a bf16 autocast
    def forward(ctx, q, k, s, row_w, col_w, row_ok, key_ok, offset, both, chunk):
        P, b, _ = q.shape
        N = k.shape[1]
        masked = not (bool(row_ok.all()) and bool(key_ok.all()))
        keep = chunk is None  # with a chunk size the logits are recomputed in backward, block by block
        logits = torch.bmm(q, k.transpose(1, 2)).mul_(s) if keep else None         # (P, b, N)
        lse_r = q.new_empty(P, b)
        lse_c = q.new_full((P, N), float("-inf")) if both else None
        correct = torch.zeros(P, b, dtype=torch.bool, device=q.device)
        for p in range(P):
            for r0, r1 in _blocks(b, chunk):
                m = logits[p, r0:r1] if keep else torch.mm(q[p, r0:r1], k[p].T).mul_(s)  # (c, N)
                if masked:
                    m.masked_fill_(~(row_ok[p, r0:r1, None] & key_ok[p, None, :]), float("-inf"))
                lse_r[p, r0:r1] = torch.logsumexp(m, -1)
                correct[p, r0:r1] = m.argmax(-1) == torch.arange(r0, r1, device=q.device) + offset
                if both:
                    lse_c[p] = torch.logaddexp(lse_c[p], torch.logsumexp(m, 0))
        # rows/columns that are entirely masked have lse = -inf: make it 0 so exp(-inf - 0) = 0 in backward
        lse_r = torch.where(torch.isinf(lse_r), 0.0, lse_r)
        pos = s * (q * k[:, offset:offset + b]).sum(-1)                             # (P, b) positive logits
        loss = (row_w * (lse_r - pos)).sum(1)
        if both:
            lse_c = torch.where(torch.isinf(lse_c), 0.0, lse_c)
            loss = loss + (col_w * (lse_c - pos)).sum(1)
        ctx.save_for_backward(q, k, s, row_w, col_w if both else None, row_ok, key_ok, lse_r, lse_c, logits)
        ctx.cfg = (offset, both, chunk, masked, keep)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss, _grad_correct):
        q, k, s, row_w, col_w, row_ok, key_ok, lse_r, lse_c, logits = ctx.saved_tensors
        offset, both, chunk, masked, keep = ctx.cfg
        if keep and getattr(ctx, "used", False):
            raise RuntimeError("the fused contrastive loss rebuilds its gradient in place: backward only once")
        ctx.used = True
        P, b, _ = q.shape
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_q = torch.empty_like(q) if keep else torch.zeros_like(q)
        grad_k = torch.zeros_like(k) if need_k else None
        for p in range(P):
            for r0, r1 in _blocks(b, chunk):
                m = logits[p, r0:r1] if keep else torch.mm(q[p, r0:r1], k[p].T).mul_(s)    # (c, N)
                if masked:
                    m.masked_fill_(~(row_ok[p, r0:r1, None] & key_ok[p, None, :]), float("-inf"))
                wr = row_w[p, r0:r1] * grad_loss[p]
                if both:
                    col = (m - lse_c[p]).exp_().mul_(col_w[p] * grad_loss[p])
                # dL/dlogits = w * (softmax - onehot), written over the logits buffer
                g = m.sub_(lse_r[p, r0:r1, None]).exp_().mul_(wr[:, None])
                if both:
                    g.add_(col)
                diag = g[:, offset + r0:offset + r1].diagonal()
                diag.sub_(wr)
                if both:
                    diag.sub_(col_w[p, offset + r0:offset + r1] * grad_loss[p])
                if not keep:  # chunked: use the block now, it is gone after this iteration
                    grad_q[p, r0:r1] = g @ k[p]
                    if need_k:
                        grad_k[p] += g.T @ q[p, r0:r1]
        if keep:  # the whole gradient of the logits is in `logits`: two batched matmuls
            torch.bmm(logits, k, out=grad_q)
            if need_k:
                torch.bmm(logits.transpose(1, 2), q, out=grad_k)
        # dL/ds = sum_ij G_ij * (q_i . k_j) = sum_i q_i . (G @ k)_i
        grad_s = (grad_q * q).sum()
        grad_q = grad_q.mul_(s) if need_q else None
        if need_k:
            grad_k.mul_(s)
        return grad_q, grad_k, grad_s, None, None, None, None, None, None, None


class LossOutput(NamedTuple):
    loss: torch.Tensor        # scalar to backpropagate (sum over targets; see the DDP note above)
    per_target: torch.Tensor  # (P,) global symmetric loss of each target, detached, for logging
    accuracy: torch.Tensor    # (P,) global top-1 retrieval accuracy anchor -> target, for logging


def contrastive_loss(anchors, targets, logit_scale, mask=None, chunk_size=None):
    """Symmetric InfoNCE for P target sets at once.

    anchors, targets: (P, B, D) this rank's features (normalised here); logit_scale: scalar tensor (the
    temperature, already exp'ed and clamped); mask: optional (P, B) bool, False where a sample has no target
    (e.g. no text) — such samples are dropped from that target's rows *and* negatives, as OpenShape does.
    chunk_size: rows per block (None: keep the logits if small, else one target at a time; see above).
    Returns LossOutput. Equal to the plain loop `sum_p (CE(L_p) + CE(L_p.T)) / 2` over the valid samples."""
    P, b, _ = anchors.shape
    dtype = torch.promote_types(anchors.dtype, torch.float32)  # bf16/fp16 features: the loss runs in fp32
    a = F.normalize(anchors.to(dtype), dim=-1)
    t = F.normalize(targets.to(dtype), dim=-1)
    ok = torch.ones(P, b, dtype=torch.bool, device=a.device) if mask is None else mask.to(a.device, torch.bool)
    s = logit_scale.to(dtype).reshape(())
    rank, world = world_info()
    if world > 1:
        a_all, t_all = _GatherWithGrad.apply(torch.stack([a, t]), 2)             # (P, world * B, D) each
        ok_parts = [torch.empty_like(ok, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(ok_parts, ok.to(torch.uint8))  # uint8: every backend has it, not every one has bool
        ok_all = torch.cat(ok_parts, 1).bool()
    else:
        a_all, t_all, ok_all = a, t, ok
    if chunk_size is None and P * b * a_all.shape[1] > KEEP_LOGITS:
        chunk_size = b  # one target's (B, N) block at a time, recomputed in backward
    n_valid = ok_all.sum(1).clamp(min=1).to(dtype)                               # (P,) global counts
    w = ok.to(dtype) * world / (2 * n_valid[:, None])                             # (P, B)
    if world == 1:
        per_target, correct = _FusedInfoNCE.apply(a, t, s, w, w, ok, ok, 0, True, chunk_size)
    else:
        # rows of this rank in both directions: anchors vs all targets, targets vs all anchors
        q, k = torch.cat([a, t]), torch.cat([t_all, a_all])
        per_target, correct = _FusedInfoNCE.apply(q, k, s, torch.cat([w, w]), None, torch.cat([ok, ok]),
                                                  torch.cat([ok_all, ok_all]), rank * b, False, chunk_size)
        per_target, correct = per_target[:P] + per_target[P:], correct[:P]
    stats = torch.stack([per_target.detach() / world, (correct & ok).sum(1).float(), ok.sum(1).float()])
    if world > 1:
        dist.all_reduce(stats)
    return LossOutput(per_target.sum(), stats[0], stats[1] / stats[2].clamp(min=1))
