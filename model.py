"""The point encoder of TAMM and OpenShape ("PointBERT": a point-patch transformer), and the stage-2
model.

Paper section 3.3 uses OpenShape's PointBERT-style encoder (OpenShape src/models/ppat.py):
  1. grouping (grouping.py): farthest point sampling picks S patch centres, a ball query takes the
     first k points by index within radius r of each centre;
  2. a shared PointNet (three 1x1 convs + BN + ReLU) embeds each neighbour's [xyz_j - centre, xyz_j,
     rgb_j] and max-pools over the k neighbours of a patch;
  3. the patch feature and its centre's xyz are lifted to `dim`, a CLS token is prepended, and a
     pre-norm transformer runs (no positional embedding beyond the centre xyz); the CLS output is
     the shape feature f.
`TAMM` puts the encoder, its two heads (adapters.py; or OpenShape's single projection) and the
temperature into one nn.Module, so one DDP wrapper covers everything that trains in stage 2.
Released weights load through checkpoint.py.

    python -c "import model; print(model.TAMM(model.CONFIGS['tiny']))"     # the modules, printed
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import CLIP_DIM, DualAdapters
from grouping import group
from loss import LOGIT_SCALE_MAX, clamp_logit_scale_, logit_scale_parameter


@dataclass
class EncoderConfig:
    dim: int = 512          # transformer width
    depth: int = 12         # transformer blocks
    heads: int = 8          # attention heads, 64 channels each (OpenShape's ppat.py)
    mlp_dim: int = 1536     # hidden width of the feed-forward layer
    sa_dim: int = 256       # output width of the patch PointNet
    num_patches: int = 384  # S, the centres FPS picks
    radius: float = 0.2     # ball-query radius on the unit-sphere-normalised cloud
    k: int = 64             # neighbours per patch
    in_dim: int = 6         # per-point input channels: xyz + rgb
    dim_head: int = 64      # channels per attention head


# The six official sizes (OpenShape src/models/ppat.py `make`; scaling 4 is TAMM's and OpenShape's
# default) and a `tiny` size for CPU demos and tests. Columns: EncoderConfig's first eight fields.
CONFIGS = {  #           dim depth heads mlp_dim sa_dim patches radius    k
    1: EncoderConfig(      256,   6,    4,   1024,    96,     64,   0.4, 256),
    2: EncoderConfig(      512,   6,    8,   1024,   128,     64,   0.4, 256),
    3: EncoderConfig(      512,  12,    8,   1024,   128,    128,  0.35, 128),
    4: EncoderConfig(      512,  12,    8,   1536,   256,    384,   0.2,  64),
    5: EncoderConfig(      768,  12,   12,   2304,   256,    512,   0.2,  64),
    6: EncoderConfig(      768,  24,   12,   3072,   256,    512,   0.2,  64),
    "tiny": EncoderConfig( 128,   2,    2,    256,    64,     64,   0.3,  32),
}


class PatchEmbed(nn.Module):
    """FPS + ball query + shared PointNet: (B, N, 3), (B, N, C) -> centres (B, S, 3), features (B,
    S, sa_dim).

    The release's PointNet is three 1x1 Conv2d + BatchNorm2d on (B, C, k, S). A 1x1 conv is a Linear
    applied to every grouped point, so we run Linear + BatchNorm1d on channels-last (B * S * k, C)
    rows: the same function and statistics, several times faster on the CPU (one GEMM instead of a
    convolution over tiny images). Loading release weights only reshapes the conv kernels (out, in,
    1, 1) -> (out, in)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [3 + cfg.in_dim, 64, 64, cfg.sa_dim]
        self.convs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:])
        self.num_patches = cfg.num_patches
        self.radius = cfg.radius
        self.k = cfg.k
        self.random_start = False  # the reference starts FPS at a random point; we start at 0
        self.backend = "auto"      # grouping.group: Triton kernels on CUDA, PyTorch on the CPU

    def forward(self, xyz, feats):
        # Grouping is index bookkeeping on the fp32 input: autocast off, or its matmul would drop to
        # bf16.
        with torch.autocast(xyz.device.type, enabled=False):
            random_start = self.random_start and self.training
            centres, x = group(xyz, feats, self.num_patches, self.radius, self.k,
                               random_start, self.backend)             # (B, S, 3), (B, S, k, 3 + C)
        B, S, k, _ = x.shape
        x = x.view(B * S * k, -1)                                      # (B * S * k, 3 + C)
        for linear, norm in zip(self.convs, self.norms):
            # in-place ReLU: BatchNorm's backward needs its input, not its output, so this saves a
            # tensor
            x = F.relu(norm(linear(x)), inplace=True)                  # (B * S * k, width)
        return centres, x.view(B, S, k, -1).max(dim=2).values          # (B, S, 3), (B, S, sa_dim)


class Attention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.proj = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, -1)                # (B, L, 3, H, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                           # 3 x (B, H, L, dh)
        x = F.scaled_dot_product_attention(q, k, v)                    # (B, H, L, dh)
        return self.proj(x.transpose(1, 2).reshape(B, L, -1))          # (B, L, dim)


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
        centres, patches = self.patch_embed(points[..., :3], points)   # (B, S, 3), (B, S, sa_dim)
        x = torch.cat([centres, patches], -1).transpose(1, 2)          # (B, 3 + sa_dim, S)
        x = self.lift_norm(self.lift(x).transpose(1, 2))               # (B, S, dim)
        cls = self.cls_token.expand(B, 1, -1).to(x.dtype)              # (B, 1, dim)
        x = torch.cat([cls, x], 1)                                     # (B, 1 + S, dim)
        for block in self.blocks:
            x = block(x)
        return x[:, 0]                                                 # (B, dim); no final norm


HEAD_TYPES = ("dual", "openshape")


class TAMM(nn.Module):
    """The stage-2 model: encoder f, two heads and one learnable temperature, in one nn.Module so
    that one DDP wrapper covers everything that trains.

    head_type "dual": TAMM's Dual Adapters (the IAA aligned with images, the TAA with text).
    head_type "openshape": OpenShape's single Linear(dim -> 1280) projection aligned with both (the
    paper's baseline); its two outputs are the same tensor."""

    def __init__(self, cfg, clip_dim=CLIP_DIM, head_type="dual", logit_scale_max=LOGIT_SCALE_MAX):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head_type {head_type!r}, expected one of {HEAD_TYPES}")
        self.cfg = cfg
        self.clip_dim = clip_dim
        self.head_type = head_type
        self.logit_scale_max = logit_scale_max  # None: never clamped (the release)
        self.encoder = PointBert(cfg)
        if head_type == "dual":
            self.adapters = DualAdapters(cfg.dim, clip_dim)
        else:
            self.proj = nn.Linear(cfg.dim, clip_dim)
        self.logit_scale = logit_scale_parameter()

    def scale(self):
        """The temperature s (the parameter is its log)."""
        return self.logit_scale.exp()

    def clamp_logit_scale_(self):
        clamp_logit_scale_(self.logit_scale, self.logit_scale_max)

    def forward(self, points):
        f = self.encoder(points)                                       # (B, dim)
        # The heads run in fp32 even under autocast: they cost under 1% of the FLOPs, and their
        # outputs are compared with the class features, so bf16 rounds only the encoder (README,
        # evaluation precision).
        with torch.autocast(points.device.type, enabled=False):
            g = f.to(self.logit_scale.dtype)                           # the parameters' dtype
            if self.head_type == "dual":
                image, text = self.adapters(g)                         # IAA(f), TAA(f): (B, 1280)
            else:
                image = text = self.proj(g)                            # (B, 1280)
        return {"backbone": f, "image": image, "text": text}

    def config(self):
        """Everything needed to rebuild this model from a checkpoint alone
        (checkpoint.build_from_config)."""
        return {"encoder": asdict(self.cfg), "clip_dim": self.clip_dim, "head_type": self.head_type,
                "logit_scale_max": self.logit_scale_max}
