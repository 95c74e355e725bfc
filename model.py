"""The point encoder of TAMM/OpenShape ("PointBERT"): a point-patch transformer, plus the stage-2 model.

Paper: TAMM section 3.3 uses the PointBERT-style encoder of OpenShape (tamm-facts.md section 3):
  1. farthest point sampling picks S patch centres; a ball query takes, for each centre, the first k points
     *by index* within radius r (not the k nearest), padding empty slots with the first hit;
  2. a shared PointNet (three 1x1 convs + BN + ReLU) embeds [xyz_j - centre, xyz_j, rgb_j] and max-pools over
     the k neighbours;
  3. the patch feature and the centre xyz are lifted to `dim`, a CLS token is prepended and a pre-norm
     transformer (no positional embedding beyond the centre xyz) runs; the CLS output is the shape feature.
`TAMM` wraps the encoder, the Dual Adapters (adapters.py) and the shared logit scale in one nn.Module so one
DDP wrapper covers everything that trains in stage 2. `load_pretrained` reads our checkpoints, the released
TAMM checkpoints and OpenShape's PointBERT checkpoint.

    python -c "import model; m = model.PointBert(model.CONFIGS[4]); print(sum(p.numel() for p in m.parameters()))"
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import DualAdapters
from utils import BadInput


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


# The six official sizes (tamm-facts.md section 3 table; scaling 4 is TAMM's and OpenShape's default) and a
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


def encoder_config(scaling):
    """CONFIGS lookup that accepts '4' as well as 4 (command-line values arrive as strings)."""
    key = int(scaling) if str(scaling).isdigit() else scaling
    if key not in CONFIGS:
        raise BadInput(f"--scaling {scaling}: unknown size, choose one of {list(CONFIGS)}")
    return CONFIGS[key]


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
def farthest_point_sample(xyz, num_samples, random_start=False):
    """(B, N, 3) -> (B, S) indices. Starts at point 0 (deterministic) unless `random_start`.

    Same arithmetic as the reference loop, so the same indices, about 8x faster on CPU: coordinates are kept
    planar (B, 3, N) so the squared distance is two vector adds instead of a reduction over a size-3 axis, the
    running minimum uses `torch.minimum` into preallocated buffers instead of a boolean-mask assignment."""
    B, N, _ = xyz.shape
    planar = xyz.transpose(1, 2).contiguous()                                   # (B, 3, N)
    idx = torch.empty(B, num_samples, dtype=torch.long, device=xyz.device)
    nearest = torch.full((B, N), 1e10, dtype=xyz.dtype, device=xyz.device)
    diff, dist = torch.empty_like(planar), torch.empty_like(nearest)
    if random_start:
        farthest = torch.randint(0, N, (B,), device=xyz.device)
    else:
        farthest = torch.zeros(B, dtype=torch.long, device=xyz.device)
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
    chunk = max(1, max_elements // max(1, B * N))
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

    def forward(self, xyz, feats):
        # Grouping is index bookkeeping on the fp32 input: autocast off, or its matmul would drop to bf16.
        with torch.autocast(xyz.device.type, enabled=False):
            centre_idx = farthest_point_sample(xyz, self.num_patches, self.random_start and self.training)
            centres = index_points(xyz, centre_idx)                                # (B, S, 3)
            nbr = ball_query(xyz, centres, self.radius, self.k)                    # (B, S, k)
            local = index_points(xyz, nbr) - centres.unsqueeze(2)                  # (B, S, k, 3)
            x = torch.cat([local, index_points(feats, nbr)], -1)                              # (B, S, k, 3 + C)
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
    """Stage-2 model: encoder f + Dual Adapters (IAA, TAA) + one learnable temperature.

    With `heads="openshape"` the two adapters are replaced by OpenShape's single Linear(dim -> 1280)
    projection, so OpenShape's released PointBERT can be evaluated by the same code (both branches equal)."""

    def __init__(self, cfg, clip_dim=1280, heads="dual", logit_scale_init=14.28, logit_scale_max=100.0):
        super().__init__()
        self.cfg, self.clip_dim, self.heads = cfg, clip_dim, heads
        self.encoder = PointBert(cfg)
        if heads == "dual":
            self.adapters = DualAdapters(cfg.dim, clip_dim)
        elif heads == "openshape":
            self.proj = nn.Linear(cfg.dim, clip_dim)
        else:
            raise ValueError(f"unknown heads {heads!r}")
        # stored as a log like CLIP; init 14.28 (official config). `logit_scale_max`: after every optimizer
        # step the parameter is clamped to log(max), as CLIP does (None: the release, which never clamps).
        # Clamping the parameter, not its exp() in the forward, keeps the gradient alive at the bound.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.logit_scale_max = logit_scale_max

    def scale(self):
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self):
        if self.logit_scale_max is not None:
            self.logit_scale.clamp_(max=math.log(self.logit_scale_max))

    def forward(self, points):
        f = self.encoder(points)                                                   # (B, dim)
        if self.heads == "dual":
            image, text = self.adapters(f)                                         # (B, 1280) each
        else:
            image = text = self.proj(f)
        return {"backbone": f, "image": image, "text": text}

    def config(self):
        """Everything needed to rebuild this model from a checkpoint alone."""
        return {"encoder": asdict(self.cfg), "clip_dim": self.clip_dim, "heads": self.heads,
                "logit_scale_max": self.logit_scale_max}


def build_from_config(config):
    cfg = EncoderConfig(**config["encoder"])
    return TAMM(cfg, clip_dim=config["clip_dim"], heads=config["heads"],
                logit_scale_max=config.get("logit_scale_max", 100.0))


# ----------------------------------------------------------------------------------------------------------
# Loading released weights

def release_key_table(depth):
    """Our parameter name prefix -> the release's (OpenShape ppat.py) name, one row per renamed module.

    The release wraps modules in PreNorm/Sequential, hence the numeric indices (`lift.1` is a Rearrange,
    `net.1`/`net.2` are GELU/Dropout, `classifier.2/3/6/7` GELU/Dropout)."""
    table = {"encoder.cls_token": "ppat.cls_token", "encoder.lift.": "ppat.lift.0.",
             "encoder.lift_norm.": "ppat.lift.2."}
    for i in range(3):
        table[f"encoder.patch_embed.convs.{i}."] = f"ppat.sa.mlp_convs.{i}."
        table[f"encoder.patch_embed.norms.{i}."] = f"ppat.sa.mlp_bns.{i}."
    for i in range(depth):
        ours, theirs = f"encoder.blocks.{i}.", f"ppat.transformer.layers.{i}."
        table[ours + "norm1."] = theirs + "0.norm."
        table[ours + "attn.qkv."] = theirs + "0.fn.to_qkv."
        table[ours + "attn.proj."] = theirs + "0.fn.to_out.0."
        table[ours + "norm2."] = theirs + "1.norm."
        table[ours + "fc1."] = theirs + "1.fn.net.0."
        table[ours + "fc2."] = theirs + "1.fn.net.3."
    return table


def _strip_module(state, where):
    if not isinstance(state, dict):
        raise BadInput(f"{where}: expected a dict of tensors, found {type(state).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _rename(state, table, where):
    """Map release names to ours through `table` (longest matching prefix wins); unknown names are errors."""
    out = {}
    reverse = sorted(((theirs, ours) for ours, theirs in table.items()), key=lambda t: -len(t[0]))
    for key, value in state.items():
        for theirs, ours in reverse:
            if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
                out[ours + key[len(theirs):]] = value
                break
        else:
            raise BadInput(f"{where}: unexpected key {key!r} (not part of the PointBERT/TAMM layout)")
    return out


def release_state_dict(ckpt, depth, where="checkpoint"):
    """Convert a TAMM release dict or an OpenShape PointBERT dict to our TAMM state_dict; returns (state, heads)."""
    table = release_key_table(depth)
    dual = "image_alignment_adapter" in ckpt
    if not dual:
        table["proj."] = "proj."  # OpenShape's single projection head
    state = _rename(_strip_module(ckpt["state_dict"], where + "[state_dict]"), table, where + "[state_dict]")
    for i in range(3):  # 1x1 Conv2d kernels (out, in, 1, 1) -> our Linear (out, in)
        key = f"encoder.patch_embed.convs.{i}.weight"
        if key in state and state[key].dim() == 4:
            state[key] = state[key].flatten(1)
    if dual:
        for part, ours in (("image_alignment_adapter", "adapters.image."), ("text_alignment_adapter", "adapters.text.")):
            sub = _strip_module(ckpt.get(part), f"{where}[{part}]")
            state.update(_rename(sub, {ours: "classifier."}, f"{where}[{part}]"))
    logit = ckpt.get("logit_scale")
    if isinstance(logit, dict):
        logit = _strip_module(logit, where + "[logit_scale]").get("logit_scale")
    state["logit_scale"] = torch.as_tensor(logit if logit is not None else math.log(14.28), dtype=torch.float32)
    return state, "dual" if dual else "openshape"


def load_pretrained(path_or_ckpt, scaling=4, clip_dim=1280, where=None):
    """Our stage-2 checkpoint, a released TAMM checkpoint, or OpenShape's PointBERT -> TAMM model (eval mode).

    Released files carry no config, so their encoder size is `scaling` (4 for every public checkpoint).
    Every tensor must map: a missing or unexpected key, or a shape mismatch, is a BadInput naming it."""
    where = where or (str(path_or_ckpt) if not isinstance(path_or_ckpt, dict) else "checkpoint")
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint_file(path_or_ckpt)
    if "config" in ckpt and "model" in ckpt:
        if "encoder" not in (ckpt["config"] or {}):
            raise BadInput(f"{where}: a stage-1 checkpoint (CLIP Image Adapter), not a point encoder; "
                           f"evaluate the stage-2 checkpoint (OUT/stage2/latest.pt)")
        model, state = build_from_config(ckpt["config"]), ckpt["model"]
    elif "state_dict" in ckpt:
        cfg = encoder_config(scaling)
        state, heads = release_state_dict(ckpt, cfg.depth, where)
        model = TAMM(cfg, clip_dim=clip_dim, heads=heads, logit_scale_max=None)
    else:
        raise BadInput(f"{where}: not a TAMM/OpenShape checkpoint (top-level keys: {sorted(ckpt)[:8]})")
    load_exact(model, state, where)
    return model.eval()


def load_exact(model, state, where):
    """load_state_dict that names the first missing/unexpected/mis-shaped key instead of a wall of text."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise BadInput(f"{where}: missing key {missing[0]!r} ({len(missing)} missing; wrong model size or kind?)")
    if unexpected:
        raise BadInput(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BadInput(f"{where}: {k!r} has shape {tuple(v.shape)}, this model expects {tuple(own[k].shape)} "
                           f"(a checkpoint of another size? try --scaling)")
    model.load_state_dict(state)


def load_checkpoint_file(path):
    """torch.load with weights_only=True (no arbitrary unpickling); corrupt files become BadInput."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"{path}: checkpoint file not found") from None
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise BadInput(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict):
        raise BadInput(f"{path}: expected a checkpoint dict, found {type(ckpt).__name__}")
    return ckpt
