"""Release-style reference implementations, shared by the tests and tools/bench.py: what the
official code computes, written the way it computes it, so ours can be checked against it index for
index and timed beside it.

  - `release_fps`: PointNet++'s farthest_point_sample (OpenShape src/models/pointnet_util.py): a
    Python step per sample with a boolean-mask update (started at point 0 instead of a random point,
    so indices compare);
  - `release_ball_query`: PointNet++'s query_ball_point: a (B, S, N) int64 index tensor, masked with
    N, sorted;
  - `release_index_points`: advanced indexing with a materialised batch index;
  - `baseline_encoder(enc)`: a copy of our PointBert with the SAME weights whose attention computes
    softmax(Q K^T) V written out (OpenShape src/models/ppat.py) and whose patch embedding runs the
    release's grouping with Conv2d + BatchNorm2d on (B, C, k, S).
  - `clip_loss` and `per_target_loss`: open_clip's ClipLoss for one target set, and the release's
    loop that sums it over the target sets (TAMM trainers/tamm_trainer.py), the reference of
    loss.contrastive_loss.
"""
import copy
import sys
import types

import torch
import torch.nn.functional as F

import grouping
import model


def release_fps(xyz, npoint):
    """PointNet++ farthest_point_sample: one Python step per sample, boolean-mask update of the
    distances."""
    B, N, _ = xyz.shape
    centroids = torch.zeros(B, npoint, dtype=torch.long, device=xyz.device)
    distance = torch.ones(B, N, dtype=xyz.dtype, device=xyz.device) * 1e10
    # the release: torch.randint(0, N, (B,))
    farthest = torch.zeros(B, dtype=torch.long, device=xyz.device)
    batch_indices = torch.arange(B, dtype=torch.long, device=xyz.device)
    for i in range(npoint):
        centroids[:, i] = farthest
        centroid = xyz[batch_indices, farthest, :].view(B, 1, 3)
        dist = torch.sum((xyz - centroid) ** 2, -1)
        mask = dist < distance
        distance[mask] = dist[mask]
        farthest = torch.max(distance, -1)[1]
    return centroids


def release_ball_query(radius, nsample, xyz, new_xyz):
    """PointNet++ query_ball_point: a (B, S, N) int64 index, N where out of range, sorted, first
    nsample kept."""
    B, N, _ = xyz.shape
    S = new_xyz.shape[1]
    group_idx = torch.arange(N, dtype=torch.long, device=xyz.device).view(1, 1, N).repeat([B, S, 1])
    sqrdists = grouping.square_distance(new_xyz, xyz)
    group_idx[sqrdists > radius ** 2] = N
    group_idx = group_idx.sort(dim=-1)[0][:, :, :nsample]
    group_first = group_idx[:, :, 0].view(B, S, 1).repeat([1, 1, nsample])
    mask = group_idx == N
    group_idx[mask] = group_first[mask]
    return group_idx


def release_index_points(points, idx):
    """PointNet++ index_points: advanced indexing with a materialised batch index of idx's shape."""
    B = points.shape[0]
    batch_indices = (torch.arange(B, device=points.device).view(B, *[1] * (idx.dim() - 1))
                     .repeat([1, *idx.shape[1:]]))
    return points[batch_indices, idx, :]


def release_patch_embed(self, xyz, feats):
    """PointNetSetAbstraction.forward of the release (sample_and_group, conv-BN-ReLU, max) on
    PatchEmbed's weights."""
    B = xyz.shape[0]
    fps_idx = release_fps(xyz, self.num_patches)
    new_xyz = release_index_points(xyz, fps_idx)                                 # (B, S, 3)
    idx = release_ball_query(self.radius, self.k, xyz, new_xyz)                  # (B, S, k)
    grouped_xyz = release_index_points(xyz, idx) - new_xyz.view(B, -1, 1, 3)     # (B, S, k, 3)
    new_points = torch.cat([grouped_xyz, release_index_points(feats, idx)], -1)  # (B, S, k, 3 + C)
    new_points = new_points.permute(0, 3, 2, 1)                                  # (B, 3 + C, k, S)
    # the release's Conv2d 1x1 + BatchNorm2d, on our parameters
    for conv, bn in zip(self.convs, self.norms):
        x = F.conv2d(new_points, conv.weight.view(*conv.weight.shape[:2], 1, 1), conv.bias)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training,
                         bn.momentum, bn.eps)
        new_points = F.relu(x)
    return new_xyz, torch.max(new_points, 2)[0].transpose(1, 2)  # (B, S, 3), (B, S, sa_dim)


def eager_attention(self, x):
    """The release's Attention.forward: softmax(Q K^T * scale) V, every intermediate
    materialised."""
    B, T, _ = x.shape
    # 3 x (B, H, T, dh)
    q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    dots = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, T, T)
    out = torch.matmul(dots.softmax(dim=-1), v)                        # (B, H, T, dh)
    return self.proj(out.transpose(1, 2).reshape(B, T, -1))


def baseline_encoder(enc):
    """A copy of `enc` (same weights) with the release's attention and grouping; `enc` itself is
    untouched."""
    base = copy.deepcopy(enc)
    for m in base.modules():
        if isinstance(m, model.Attention):
            m.forward = types.MethodType(eager_attention, m)
        elif isinstance(m, model.PatchEmbed):
            m.forward = types.MethodType(release_patch_embed, m)
    return base


def clip_loss(anchor, target, logit_scale):
    """open_clip's ClipLoss for one target set: (B, D), (B, D) -> (loss, top-1 accuracy
    anchor -> target)."""
    a = F.normalize(anchor, dim=-1)
    t = F.normalize(target, dim=-1)
    logits = logit_scale * a @ t.T  # (B, B): shape i's target is column i
    labels = torch.arange(len(logits), device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss, (logits.argmax(1) == labels).float().mean()


def per_target_loss(anchors, targets, logit_scale, mask=None):
    """The release: clip_loss per target set, summed, each over the shapes that have that target.
    (P, B, D) features, mask (P, B) bool -> (loss, (P,) accuracy)."""
    total = 0.0
    accuracy = []
    for p in range(len(anchors)):
        keep = slice(None) if mask is None else mask[p]
        if mask is not None and not keep.any():  # no shape has this target: it adds nothing
            accuracy.append(anchors.new_zeros(()))
            continue
        loss, acc = clip_loss(anchors[p][keep], targets[p][keep], logit_scale)
        total = total + loss
        accuracy.append(acc)
    return total, torch.stack(accuracy)


if __name__ == "__main__":
    sys.exit("tools/reference.py is a library of release-style references for the tests and "
             "tools/bench.py, not a command (python -m tools.bench)")
