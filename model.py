"""The point encoder of TAMM/OpenShape ("PointBERT"): a point-patch transformer, plus the stage-2 model.

Paper: TAMM section 3.3 uses the PointBERT-style encoder of OpenShape (OpenShape src/models/ppat.py):
  1. farthest point sampling picks S patch centres; a ball query takes, for each centre, the first k points
     *by index* within radius r (not the k nearest), padding empty slots with the first hit;
  2. a shared PointNet (three 1x1 convs + BN + ReLU) embeds [xyz_j - centre, xyz_j, rgb_j] and max-pools over
     the k neighbours;
  3. the patch feature and the centre xyz are lifted to `dim`, a CLS token is prepended and a pre-norm
     transformer (no positional embedding beyond the centre xyz) runs; the CLS output is the shape feature.
`TAMM` wraps the encoder, the Dual Adapters (adapters.py) or OpenShape's single projection, and the shared
temperature in one nn.Module, so one DDP wrapper covers everything that trains in stage 2. Released weights
load through checkpoint.py.

    python -c "import model; m = model.PointBert(model.CONFIGS[4]); print(sum(p.numel() for p in m.parameters()))"
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import DualAdapters
from loss import clamp_logit_scale_, logit_scale_parameter


@dataclass
class EncoderConfig:
    dim: int = 512          # transformer width
    depth: int = 12         # transformer blocks
    heads: int = 8          # attention heads, 64 channels each (as in OpenShape's ppat.py)
    mlp_dim: int = 1536     # hidden width of the feed-forward layer
    sa_dim: int = 256       # output width of the patch PointNet
    num_patches: int = 384  # S, centres picked by FPS
    radius: float = 0.2     # ball-query radius on the unit-sphere-normalised cloud
    k: int = 64             # neighbours per patch
    in_dim: int = 6         # per-point input channels: xyz + rgb
    dim_head: int = 64


# The six official sizes (OpenShape src/models/ppat.py `make`; scaling 4 is TAMM's and OpenShape's default) and a
# `tiny` size for CPU demos and tests (1-2k points, a few minutes of training on 2 cores).
CONFIGS = {
    1: EncoderConfig(dim=256, depth=6, heads=4, mlp_dim=1024, sa_dim=96, num_patches=64, radius=0.4, k=256),
    2: EncoderConfig(dim=512, depth=6, heads=8, mlp_dim=1024, sa_dim=128, num_patches=64, radius=0.4, k=256),
    3: EncoderConfig(dim=512, depth=12, heads=8, mlp_dim=1024, sa_dim=128, num_patches=128, radius=0.35, k=128),
    4: EncoderConfig(dim=512, depth=12, heads=8, mlp_dim=1536, sa_dim=256, num_patches=384, radius=0.2, k=64),
    5: EncoderConfig(dim=768, depth=12, heads=12, mlp_dim=2304, sa_dim=256, num_patches=512, radius=0.2, k=64),
    6: EncoderConfig(dim=768, depth=24, heads=12, mlp_dim=3072, sa_dim=256, num_patches=512, radius=0.2, k=64),
    "tiny": EncoderConfig(dim=128, depth=2, heads=2, mlp_dim=256, sa_dim=64, num_patches=64, radius=0.3, k=32),
}


# ----------------------------------------------------------------------------------------------------------
# Grouping: farthest point sampling and ball query (pure PyTorch, same indices as the PointNet++ reference)

def square_distance(src, dst):
    """(B, S, 3), (B, N, 3) -> (B, S, N) squared distances, the |a|^2 - 2ab + |b|^2 form of the reference."""
    dist = torch.matmul(src, dst.transpose(1, 2)).mul_(-2)  # in place: one (B, S, N) buffer, same values
    dist += torch.sum(src ** 2, -1).unsqueeze(-1)
    dist += torch.sum(dst ** 2, -1).unsqueeze(1)
    return dist


@torch.compiler.disable  # a 384-step Python loop: tracing it would unroll it; it runs eagerly under --compile
@torch.no_grad()
def farthest_point_sample(xyz, num_samples, start=None):
    """(B, N, 3) -> (B, S) indices. Starts at point 0 (deterministic), or at the (B,) indices `start`.

    Same arithmetic as the reference loop, so the same indices, about 8x faster on CPU: coordinates are kept
    planar (B, 3, N) so the squared distance is two vector adds instead of a reduction over a size-3 axis, the
    running minimum uses `torch.minimum` into preallocated buffers instead of a boolean-mask assignment."""
    B, N, _ = xyz.shape
    planar = xyz.transpose(1, 2).contiguous()                                   # (B, 3, N)
    idx = torch.empty(B, num_samples, dtype=torch.long, device=xyz.device)
    nearest = torch.full((B, N), 1e10, dtype=xyz.dtype, device=xyz.device)
    diff, dist = torch.empty_like(planar), torch.empty_like(nearest)
    farthest = torch.zeros(B, dtype=torch.long, device=xyz.device) if start is None else start
    for i in range(num_samples):
        idx[:, i] = farthest
        centre = torch.gather(planar, 2, farthest.view(B, 1, 1).expand(B, 3, 1))  # (B, 3, 1)
        torch.sub(planar, centre, out=diff)
        diff.mul_(diff)
        torch.add(diff[:, 0], diff[:, 1], out=dist)
        dist.add_(diff[:, 2])
        torch.minimum(nearest, dist, out=nearest)
        farthest = nearest.argmax(-1)
    return idx


@torch.compiler.disable  # data-dependent shapes (nonzero)
@torch.no_grad()
def ball_query(xyz, centres, radius, k, max_elements=None):
    """First k point indices (by index) within `radius` of each centre, padded with the first hit.

    xyz (B, N, 3), centres (B, S, 3) -> (B, S, k) int64. The reference writes N into a (B, S, N) int64 index
    tensor and sorts it (about 6 GB at B=200, S=384, N=10k). Here a boolean mask and its running count give
    each hit its slot directly, and centres are processed in chunks of at most `max_elements` (B * chunk * N)
    entries, so the peak extra memory is bounded independently of S. Default chunk: 2M entries on CPU (the
    passes over it stay in cache: 2.4x faster than 16M at B=16, N=10k), 16M on GPU (fewer kernel launches)."""
    B, N, _ = xyz.shape
    S = centres.shape[1]
    out = torch.empty(B, S, k, dtype=torch.long, device=xyz.device)
    if max_elements is None:
        max_elements = 2 ** 21 if xyz.device.type == "cpu" else 2 ** 24
    chunk = max(8, max_elements // max(1, B * N))  # >= 8: BLAS keeps its FMA kernel (see kernels.py)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32's 1e-3 error would move points across the radius
    try:
        for s0 in range(0, S, chunk):
            _ball_query_block(xyz, centres[:, s0:s0 + chunk], radius, k, out[:, s0:s0 + chunk])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def _ball_query_block(xyz, centres, radius, k, out):
    """ball_query for a block of c centres, written into `out` (B, c, k)."""
    inside = square_distance(centres, xyz) <= radius ** 2                       # (B, c, N)
    rank = torch.cumsum(inside, -1, dtype=torch.int32)                         # 1-based slot of each hit
    b, s, n = torch.nonzero(inside & (rank <= k), as_tuple=True)
    block = torch.full(out.shape, -1, dtype=torch.long, device=xyz.device)
    block[b, s, rank[b, s, n].long() - 1] = n
    # a centre is itself a point of the cloud, so slot 0 always holds a hit
    out.copy_(torch.where(block < 0, block[..., :1], block))


def index_points(points, idx):
    """points (B, N, C), idx (B, ...) -> (B, ..., C)."""
    B = points.shape[0]
    flat = idx.reshape(B, -1)
    out = torch.gather(points, 1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return out.view(*idx.shape, points.shape[-1])


def group(xyz, feats, num_patches, radius, k, random_start=False, backend="auto"):
    """FPS + ball query + gather: (B, N, 3), (B, N, C) -> centres (B, S, 3), neighbours (B, S, k, 3 + C) as
    [xyz_j - centre, feats_j]. backend "torch": the functions above; "triton": kernels.py, one launch each and no
    host sync (CUDA, or CPU tensors under TRITON_INTERPRET=1); "auto": Triton on CUDA tensors when it imports."""
    if backend == "auto":
        backend = "triton" if xyz.is_cuda and xyz.dtype == torch.float32 and _triton() else "torch"
    B, N, _ = xyz.shape
    start = torch.randint(0, N, (B,), device=xyz.device) if random_start else None
    if backend == "triton":
        import kernels
        centres = index_points(xyz, kernels.farthest_point_sample(xyz, num_patches, start))      # (B, S, 3)
        nbr = kernels.ball_query(xyz, centres, radius, k)                                         # (B, S, k)
        return centres, kernels.group(xyz, feats, centres, nbr)                                 # (B, S, k, 3 + C)
    centres = index_points(xyz, farthest_point_sample(xyz, num_patches, start))                  # (B, S, 3)
    nbr = ball_query(xyz, centres, radius, k)                                                     # (B, S, k)
    return centres, torch.cat([index_points(xyz, nbr) - centres.unsqueeze(2), index_points(feats, nbr)], -1)


_TRITON = []


def _triton():
    """Whether kernels.py's Triton path can run; says once when it cannot (the PyTorch path then runs)."""
    if not _TRITON:
        import kernels
        _TRITON.append(kernels.AVAILABLE)
        if not kernels.AVAILABLE:
            print("note: Triton is not importable; grouping runs the PyTorch path (~5,000 launches per forward)")
    return _TRITON[0]


# ----------------------------------------------------------------------------------------------------------
# The encoder

class PatchEmbed(nn.Module):
    """FPS + ball query + shared PointNet: (B, N, 3), (B, N, C) -> centres (B, S, 3), features (B, S, sa_dim).

    The release's PointNet is three 1x1 Conv2d + BatchNorm2d on (B, C, k, S); a 1x1 conv is a Linear applied to
    every grouped point, so we run Linear + BatchNorm1d on channels-last (B * S * k, C) rows: the same function
    and statistics, several times faster on CPU (one GEMM instead of a convolution kernel over tiny images).
    Loading release weights only reshapes the conv kernels (out, in, 1, 1) -> (out, in)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [3 + cfg.in_dim, 64, 64, cfg.sa_dim]
        self.convs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:])
        self.num_patches, self.radius, self.k = cfg.num_patches, cfg.radius, cfg.k
        self.random_start = False  # the reference starts FPS at a random point; we start at 0 (see README)
        self.backend = "auto"      # grouping: Triton kernels on CUDA, PyTorch on CPU (see `group`)

    def forward(self, xyz, feats):
        # Grouping is index bookkeeping on the fp32 input: autocast off, or its matmul would drop to bf16.
        with torch.autocast(xyz.device.type, enabled=False):
            centres, x = group(xyz, feats, self.num_patches, self.radius, self.k,
                               self.random_start and self.training, self.backend)          # (B, S, 3), (B, S, k, 3 + C)
        B, S, k, _ = x.shape
        x = x.view(B * S * k, -1)
        for linear, norm in zip(self.convs, self.norms):
            # in-place ReLU: BatchNorm's backward needs its input, not its output, so this saves one tensor
            x = F.relu(norm(linear(x)), inplace=True)                              # (B * S * k, width)
        return centres, x.view(B, S, k, -1).max(dim=2).values                      # (B, S, 3), (B, S, sa_dim)


class Attention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.proj = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, dh)
        x = F.scaled_dot_product_attention(q, k, v)                                   # (B, H, T, dh)
        return self.proj(x.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PointBert(nn.Module):
    """(B, N, in_dim) points with xyz in the first 3 channels -> (B, dim) CLS feature."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.lift = nn.Conv1d(cfg.sa_dim + 3, cfg.dim, 1)
        self.lift_norm = nn.LayerNorm(cfg.dim)
        self.cls_token = nn.Parameter(torch.randn(cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def forward(self, points):
        B = points.shape[0]
        centres, patches = self.patch_embed(points[..., :3], points)               # (B, S, 3), (B, S, sa_dim)
        x = torch.cat([centres, patches], -1).transpose(1, 2)                      # (B, 3 + sa_dim, S)
        x = self.lift_norm(self.lift(x).transpose(1, 2))                           # (B, S, dim)
        x = torch.cat([self.cls_token.expand(B, 1, -1).to(x.dtype), x], 1)         # (B, 1 + S, dim)
        for block in self.blocks:
            x = block(x)
        return x[:, 0]                                                             # (B, dim); no final norm


class TAMM(nn.Module):
    """Stage-2 model: encoder f + two heads + one learnable temperature, one nn.Module so one DDP wrapper covers
    everything that trains.

    heads="dual": TAMM's Dual Adapters (IAA aligned with images, TAA with text). heads="openshape": OpenShape's
    single Linear(dim -> 1280) projection aligned with both (the paper's baseline); its two outputs are equal."""

    def __init__(self, cfg, clip_dim=1280, heads="dual", logit_scale_max=100.0):
        super().__init__()
        self.cfg, self.clip_dim, self.heads, self.logit_scale_max = cfg, clip_dim, heads, logit_scale_max
        self.encoder = PointBert(cfg)
        if heads == "dual":
            self.adapters = DualAdapters(cfg.dim, clip_dim)
        elif heads == "openshape":
            self.proj = nn.Linear(cfg.dim, clip_dim)
        else:
            raise ValueError(f"unknown heads {heads!r}")
        self.logit_scale = logit_scale_parameter()

    def scale(self):
        return self.logit_scale.exp()

    def clamp_logit_scale_(self):
        clamp_logit_scale_(self.logit_scale, self.logit_scale_max)

    def forward(self, points):
        f = self.encoder(points)                                                   # (B, dim)
        # The heads run in fp32 even under autocast: they cost under 1% of the FLOPs, and their outputs are what
        # the class features are compared with, so bf16 inference rounds only the encoder. See the README.
        with torch.autocast(points.device.type, enabled=False):
            g = f.to(self.logit_scale.dtype)                                       # the parameters' dtype
            image, text = self.adapters(g) if self.heads == "dual" else (self.proj(g),) * 2  # (B, 1280) each
        return {"backbone": f, "image": image, "text": text}

    def config(self):
        """Everything needed to rebuild this model from a checkpoint alone (checkpoint.build_from_config)."""
        return {"encoder": asdict(self.cfg), "clip_dim": self.clip_dim, "heads": self.heads,
                "logit_scale_max": self.logit_scale_max}
