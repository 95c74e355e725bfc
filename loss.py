"""The contrastive loss of TAMM (CVPR 2024, eq. 1-7) and OpenShape: symmetric InfoNCE against P target sets.

Per target set (stage 2: 4 image views of CIA-adapted CLIP features + the text feature; stage 1: the text feature for
4 CIA(view) anchors): L2-normalise, logits = s * a @ t.T with the learnable temperature s, (CE(logits, labels) +
CE(logits.T, labels)) / 2, summed over the targets. A sample without a target (no text, a broken shape) leaves that
target's rows and negatives, as in OpenShape. `clip_loss` and `per_target_loss` are this definition (the release's
loop, the reference of the tests and tools/bench.py); `contrastive_loss` computes the same for all P at once:
  - under DDP, ONE all_gather of [targets, anchors, mask] with gradient; each rank computes its own rows (labels
    offset by rank * b, open_clip's local_loss=True) and returns world * its share, so that DDP's gradient average
    equals one process on the concatenated batch;
  - `_InfoNCE`, one autograd.Function for normalisation, logits and both cross-entropies: it keeps the logits and
    two log-sum-exp vectors, and backward turns the logits into dL/dlogits in place, block by block in cache.
Why the Function, measured (2 CPU cores, P=5, D=1280, fwd+bwd, anchors and temperature trained; time of the loop /
time, interleaved medians, B = 256, 1024, 2048, 4096; peak memory at B=4096, loop 968 MB):
  bmm + F.cross_entropy both ways (plain autograd)       0.75 0.83 0.81 0.77   1480 MB (keeps 3 logit-sized tensors)
  bmm + a Function for the cross-entropies only          1.02 1.05 1.08 1.29   (the bmm gives whole targets to threads)
  P GEMMs + that Function                                1.06 1.21 1.14 1.48
  this file: + normalisation and temperature inside      1.47 1.33 1.29 1.52    445 MB; 205 MB with chunk_size=1024
"""
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

MASKED = -1e4     # logit bias of a sample without this target: 2 ** (MASKED + 300) == 0, also in float32
BLOCK = 2 ** 20   # logits per block of the elementwise passes on CPU: a block and its buffer (8 MB) stay in cache
EPS = 1e-12       # as F.normalize


def clip_loss(anchor, target, logit_scale):
    """open_clip's ClipLoss for one target set: (B, D), (B, D) -> (loss, top-1 accuracy anchor -> target)."""
    a, t = F.normalize(anchor, dim=-1), F.normalize(target, dim=-1)
    logits = logit_scale * a @ t.T                                       # (B, B): sample i's target is column i
    labels = torch.arange(len(logits), device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss, (logits.argmax(1) == labels).float().mean()


def per_target_loss(anchors, targets, logit_scale, mask=None):
    """The release: clip_loss per target set, summed. (P, B, D) features, mask (P, B) bool -> (loss, (P,) accuracy)."""
    total, accuracy = 0.0, []
    for p in range(len(anchors)):
        keep = slice(None) if mask is None else mask[p]
        if mask is not None and not keep.any():  # no sample has this target: it adds nothing
            accuracy.append(anchors.new_zeros(()))
            continue
        loss, acc = clip_loss(anchors[p][keep], targets[p][keep], logit_scale)
        total = total + loss
        accuracy.append(acc)
    return total, torch.stack(accuracy)


def logit_scale_parameter(init=14.28):
    """The learnable temperature, stored as a log like CLIP; 14.28 at init (official config)."""
    return torch.nn.Parameter(torch.tensor(math.log(init)))


def clamp_logit_scale_(log_scale, max_scale):
    """After an optimizer step: temperature <= max_scale, clamped on the parameter as CLIP does (None: never)."""
    if max_scale is not None:
        with torch.no_grad():
            log_scale.clamp_(max=math.log(max_scale))


def world_info():
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """all_gather along dim 2 with gradient (torch.distributed.nn's is deprecated): backward sums all ranks'
    gradients and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        (ctx.rank, world), ctx.b = world_info(), x.shape[2]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(2, ctx.rank * ctx.b, ctx.b)


def _blocks(n, size):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _walk(L, q, k, to_logits, chunk, rows, compute):
    """Yield (chunk c, rows i, their (P, len(i), N) logits) for every cache-sized row block, chunk by chunk; with
    `compute`, first the chunk's GEMMs into L, then `to_logits` on each block. P GEMMs, each on all threads:
    a CPU bmm gives each thread whole batch entries, and 5 targets on 2 cores make it 1.2x slower."""
    for c in _blocks(q.shape[1], chunk):
        for p in range(len(q) if compute else 0):
            torch.mm(q[p, c], k[p].T, out=L[p, :c.stop - c.start])
        for r in _blocks(c.stop - c.start, rows):
            i = slice(c.start + r.start, c.start + r.stop)
            yield c, i, to_logits(L[:, r], i) if compute else L[:, r]


def _project(grad, x, norm):
    """grad (n, D) w.r.t. x with the scale 1/|x| held fixed -> the full gradient, in place: minus the radial part
    x (x . grad) / |x|^2 (what F.normalize's backward does). Returns x . grad (n,)."""
    dot = (grad * x).sum(-1)
    grad.addcmul_(x, (dot / norm ** 2)[:, None], value=-1)
    return dot


class _InfoNCE(torch.autograd.Function):
    """(P,) sum_i w_pi CE(row i of L_p, label offset + i) [+ the same over columns], and the (P, b) top-1 row hits.

    q (P, b, D), k (P, N, D) raw features; L_pij = s cos(q_pi, k_pj) + bias_q_pi + bias_k_pj, in base 2: exp2 is 3x
    cheaper than exp on CPU, and log2(e) costs nothing in the row scale. `columns`: one process (N == b), the columns
    are the other direction of the same matrix. chunk: rows of logits held at once (None: all, kept for backward;
    else recomputed there). Saves a pass over the logits wherever it can: each op runs on a block in cache."""

    @staticmethod
    def forward(ctx, q, k, s, bias_q, bias_k, w, offset, columns, chunk):
        (P, b, _), N = q.shape, k.shape[1]
        nq, nk = q.norm(dim=-1).clamp_min(EPS), k.norm(dim=-1).clamp_min(EPS)      # (P, b), (P, N)
        fq, fk = s / math.log(2) / nq, 1 / nk                                    # L = fq_i fk_j q_i.k_j + biases
        # rows per cache block; on a GPU, blocks 64x larger (a few kernel launches; not measured there)
        chunk, rows = min(chunk or b, b), max(1, (BLOCK if q.is_cpu else 64 * BLOCK) // (P * N))

        def to_logits(m, i):  # (P, c, N) block of q.k for the rows i -> logits, in place
            return m.mul_(fq[:, i, None]).mul_(fk[:, None]).add_(bias_q[:, i, None]).add_(bias_k[:, None])
        ctx.cfg, ctx.to_logits = (chunk, rows, offset), to_logits
        L, buf = q.new_empty(P, chunk, N), q.new_empty(P, min(rows, chunk), N)
        pos, lse_q, hit = q.new_empty(P, b), q.new_empty(P, b), torch.empty(P, b, dtype=torch.bool, device=q.device)
        col_max, col_sum = q.new_full((P, N), -math.inf), q.new_zeros(P, N)    # online column log-sum-exp
        for _, i, m in _walk(L, q, k, to_logits, chunk, rows, True):   # m: (P, c, N) block of logits
            tmp, mx = buf[:, :i.stop - i.start], m.amax(-1, keepdim=True)      # (P, c, N), (P, c, 1)
            pos[:, i] = m.diagonal(offset + i.start, 1, 2)
            hit[:, i] = pos[:, i] >= mx[..., 0]
            lse_q[:, i] = torch.sub(m, mx, out=tmp).exp2_().sum(-1).log2_() + mx[..., 0]
            if columns:  # running column max and sum of 2^(L - max), rescaled when the max grows
                new = torch.maximum(col_max, m.amax(1))                       # (P, N)
                col_sum.mul_((col_max - new).exp2_()).add_(torch.sub(m, new[:, None], out=tmp).exp2_().sum(1))
                col_max = new
        w = w * math.log(2)                                                  # (P, b), bits -> nats
        lse_k = col_sum.log2_().add_(col_max) if columns else None           # (P, N)
        loss = (w * (lse_q - pos)).sum(1) + ((w * (lse_k - pos)).sum(1) if columns else 0)  # (P,)
        # dL/dL_ij = w_i 2^(L_ij - lse_q_i) [+ w_j 2^(L_ij - lse_k_j)] - (w_i [+ w_j]) at the positives; keep
        # lse - log2 w as the shift, so w costs no pass (w = 0: shift inf, gradient 0)
        ctx.save_for_backward(q, k, s, nq, fq, nk, fk, L, lse_q - w.log2(), lse_k - w.log2() if columns else None,
                              w * (1 + columns))
        ctx.mark_non_differentiable(hit)
        return loss, hit

    @staticmethod
    def backward(ctx, grad, _):
        if ctx.to_logits is None:  # the kept logits have become gradients
            raise RuntimeError("_InfoNCE rebuilds its gradient over the saved logits: backward only once")
        q, k, s, nq, fq, nk, fk, L, shift_q, shift_k, w_pos = ctx.saved_tensors
        (chunk, rows, offset), (P, b, _) = ctx.cfg, q.shape
        buf, grad_q = torch.empty_like(L[:, :rows]), torch.empty_like(q)
        grad_k = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        for c, i, m in _walk(L, q, k, ctx.to_logits, chunk, rows, chunk < b):  # m becomes dL/d(q.k) in place
            if shift_k is not None:
                tmp = torch.sub(m, shift_k[:, None], out=buf[:, :i.stop - i.start]).exp2_()
            m.sub_(shift_q[:, i, None]).exp2_()
            if shift_k is not None:
                m.add_(tmp)
            m.diagonal(offset + i.start, 1, 2).sub_(w_pos[:, i])
            m.mul_(grad[:, None, None] * fq[:, i, None]).mul_(fk[:, None])    # chain rule to q.k
            for p in range(P if i.stop == c.stop else 0):                     # the chunk is done: its GEMMs
                torch.mm(L[p, :c.stop - c.start], k[p], out=grad_q[p, c])
                if grad_k is not None:
                    grad_k[p].addmm_(L[p, :c.stop - c.start].T, q[p, c])
        ctx.to_logits = None
        # before the projection q_i . dL/dq_i = sum_j dL/dL_ij L_ij, so dL/ds = the sum of those / s
        grad_s = sum(_project(grad_q[p], q[p], nq[p]).sum() for p in range(P)) / s
        for p in range(P if grad_k is not None else 0):
            _project(grad_k[p], k[p], nk[p])
        return grad_q, grad_k, grad_s, None, None, None, None, None, None


class LossOutput(NamedTuple):
    loss: torch.Tensor        # scalar to backpropagate: sum over targets (world * this rank's share under DDP)
    per_target: torch.Tensor  # (P,) global symmetric loss of each target, detached, for logging
    accuracy: torch.Tensor    # (P,) global top-1 accuracy anchor -> target over the valid samples
    count: torch.Tensor       # (P,) global number of valid (unmasked) samples of each target


def contrastive_loss(anchors, targets, logit_scale, mask=None, chunk_size=None):
    """Symmetric InfoNCE of P target sets at once; equals per_target_loss on the global batch.

    anchors, targets: (P, b, D) this rank's features; logit_scale: the temperature (scalar tensor, exp'ed); mask:
    (P, b) bool, False where a sample has no target. chunk_size: rows of logits held at once (--loss-chunk), so no
    (P, b, N) tensor exists in one piece; they are recomputed in backward (one more GEMM: 1.4x slower at B=4096).
    No host synchronisation; float32 (float64 stays float64), also inside an autocast region."""
    (P, b, D), (rank, world) = anchors.shape, world_info()
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    with torch.autocast(anchors.device.type, enabled=False):
        a, t, s = anchors.to(dtype), targets.to(dtype), logit_scale.to(dtype).reshape(())
        valid = torch.ones(P, b, dtype=torch.bool, device=a.device) if mask is None else mask.to(a.device, torch.bool)
        bias = torch.zeros(P, b, dtype=dtype, device=a.device).masked_fill_(~valid, MASKED)  # the mask, additive
        if world == 1:
            count = valid.sum(1)
            w = valid.to(dtype) / (2 * count.clamp(min=1))[:, None]         # (P, b) weight of each row and column
            per_target, hit = _InfoNCE.apply(a, t, s, bias, bias, w, 0, True, chunk_size)
        else:  # this rank's rows in both directions: anchors vs all targets, targets vs all anchors
            keys = _AllGather.apply(torch.cat([torch.stack([t, a]), bias.expand(2, P, b)[..., None]], -1))
            count = (keys[0, :, :, D] == 0).sum(1)                           # keys: (2, P, N, D + 1), mask last
            w = valid.to(dtype) * world / (2 * count.clamp(min=1))[:, None]
            loss, hit = _InfoNCE.apply(torch.cat([a, t]), keys[..., :D].flatten(0, 1), s, bias.repeat(2, 1),
                                       keys[..., D].flatten(0, 1), w.repeat(2, 1), rank * b, False, chunk_size)
            per_target, hit = loss[:P] + loss[P:], hit[:P]
        stats = torch.stack([per_target.detach() / world, (hit & valid).sum(1).to(dtype)])
        if world > 1:  # logging only: the same numbers on every rank
            dist.all_reduce(stats)
    return LossOutput(per_target.sum(), stats[0], stats[1] / count.clamp(min=1), count)
