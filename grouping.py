"""The encoder's point grouping (paper section 3.3, OpenShape src/models/pointnet_util.py), in
PyTorch.

PointBERT-style encoders cut a cloud into patches before the transformer sees it:
  1. farthest point sampling (FPS) picks S patch centres, each the point farthest from those picked
     so far;
  2. a ball query takes, for each centre, the first k points *by index* whose distance is within the
     radius (not the k nearest), and pads the free slots with the first hit;
  3. each neighbour becomes [xyz_j - centre, features_j], the PointNet's input.
These functions return exactly the indices of the PointNet++ reference (tools/reference.py, tested
index for index) with less time and memory. kernels.py does the same in three Triton launches on
CUDA; `group` picks.

    python -c "import torch, grouping as g; print(g.farthest_point_sample(torch.rand(1, 99, 3), 8))"
"""
import torch


def square_distance(src, dst):
    """(B, S, 3), (B, N, 3) -> (B, S, N) squared distances.

    On the CPU as the reference computes them, |a|^2 - 2 a.b + |b|^2 with a.b from a matmul, so the
    ball query returns the reference's indices bit for bit. On CUDA that matmul may run in TF32 (a
    10-bit mantissa, when the run allows TF32 for speed), whose 1e-3 error moves points across the
    radius; there the differences are squared in plain fp32 instead (`exact_square_distance`), exact
    whatever the TF32 setting."""
    if src.is_cuda:
        return exact_square_distance(src, dst)
    dist = torch.matmul(src, dst.transpose(1, 2)).mul_(-2)  # in place: one (B, S, N) buffer
    dist += torch.sum(src**2, -1).unsqueeze(-1)
    dist += torch.sum(dst**2, -1).unsqueeze(1)
    return dist


def exact_square_distance(src, dst):
    """(B, S, 3), (B, N, 3) -> (B, S, N) as sum((a - b)^2): elementwise fp32, no matmul, no TF32."""
    return (src.unsqueeze(2) - dst.unsqueeze(1)).square_().sum(-1)


@torch.no_grad()
def farthest_point_sample(xyz, num_samples, start=None):
    """(B, N, 3) -> (B, S) indices. Starts at point 0 (deterministic), or at the (B,) indices
    `start`.

    The reference's arithmetic, so its indices, about 7x faster on the CPU: the coordinates are kept
    planar (B, 3, N), so a squared distance is two vector adds instead of a reduction over a size-3
    axis, and the running minimum is a `torch.minimum` into preallocated buffers instead of a
    boolean-mask assignment."""
    B, N, _ = xyz.shape
    planar = xyz.transpose(1, 2).contiguous()                                      # (B, 3, N)
    idx = torch.empty(B, num_samples, dtype=torch.long, device=xyz.device)         # (B, S)
    nearest = torch.full((B, N), 1e10, dtype=xyz.dtype, device=xyz.device)        # (B, N)
    diff = torch.empty_like(planar)                                                # (B, 3, N)
    dist = torch.empty_like(nearest)                                               # (B, N)
    if start is None:
        farthest = torch.zeros(B, dtype=torch.long, device=xyz.device)
    else:
        farthest = start
    for i in range(num_samples):
        idx[:, i] = farthest
        centre = torch.gather(planar, 2, farthest.view(B, 1, 1).expand(B, 3, 1))  # (B, 3, 1)
        torch.sub(planar, centre, out=diff)
        diff.mul_(diff)
        torch.add(diff[:, 0], diff[:, 1], out=dist)  # ((dx^2 + dy^2) + dz^2), the reference's order
        dist.add_(diff[:, 2])
        torch.minimum(nearest, dist, out=nearest)
        farthest = nearest.argmax(-1)  # the first index among equal maxima, as the reference's max
    return idx


@torch.no_grad()
def ball_query(xyz, centres, radius, k, max_elements=None):
    """The first k point indices (by index) within `radius` of each centre, padded with the first
    hit.

    xyz (B, N, 3), centres (B, S, 3) -> (B, S, k) int64. The reference writes N into a (B, S, N)
    int64 index tensor and sorts it (about 6 GB at B=200, S=384, N=10k). Here a boolean mask and its
    running count give each hit its slot directly, a chunk of centres at a time (at most
    `max_elements` = B * chunk * N), so the extra memory is bounded whatever S is. Default chunk: 2M
    entries on the CPU, where the passes over it stay in cache (2.4x faster than 16M at B=16,
    N=10k); 16M on a GPU (fewer launches)."""
    B, N, _ = xyz.shape
    S = centres.shape[1]
    out = torch.empty(B, S, k, dtype=torch.long, device=xyz.device)
    if max_elements is None:
        max_elements = 2**21 if xyz.device.type == "cpu" else 2**24
    chunk = max(8, max_elements // max(1, B * N))  # >= 8 centres: MKL keeps its FMA kernel
    for s0 in range(0, S, chunk):
        block = slice(s0, s0 + chunk)
        _ball_query_block(xyz, centres[:, block], radius, k, out[:, block])
    return out


def _ball_query_block(xyz, centres, radius, k, out):
    """ball_query for a block of c centres, written into `out` (B, c, k)."""
    inside = square_distance(centres, xyz) <= radius**2                     # (B, c, N)
    rank = torch.cumsum(inside, -1, dtype=torch.int32)                      # (B, c, N) hit's slot
    b, s, n = torch.nonzero(inside & (rank <= k), as_tuple=True)           # hits that get a slot
    block = torch.full(out.shape, -1, dtype=torch.long, device=xyz.device)  # (B, c, k)
    block[b, s, rank[b, s, n].long() - 1] = n
    # a centre is itself a point of the cloud, so slot 0 holds a hit: the first one pads the free
    # slots
    out.copy_(torch.where(block < 0, block[..., :1], block))


def run_eagerly_under_compile():
    """Have torch.compile run FPS (a loop of S steps, which tracing would unroll) and the ball query
    (data-dependent shapes) eagerly. Whatever compiles the model calls this first (train_stage2.py
    --compile, tools/gpu_check.py); it is not a decorator because torch.compiler.disable imports
    torch._dynamo, which would add about 2 s to the start of every command."""
    global farthest_point_sample, ball_query
    if not hasattr(farthest_point_sample, "_torchdynamo_disable"):
        farthest_point_sample = torch.compiler.disable(farthest_point_sample)
        ball_query = torch.compiler.disable(ball_query)


def index_points(points, idx):
    """points (B, N, C), idx (B, ...) -> (B, ..., C)."""
    B = points.shape[0]
    flat = idx.reshape(B, -1)                                                  # (B, M)
    out = torch.gather(points, 1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))  # (B, M, C)
    return out.view(*idx.shape, points.shape[-1])


def group(xyz, feats, num_patches, radius, k, random_start=False, backend="auto"):
    """FPS + ball query + gather: (B, N, 3), (B, N, C) -> centres (B, S, 3) and their neighbours
    (B, S, k, 3 + C) as [xyz_j - centre, feats_j].

    backend "torch": the functions above; "triton": kernels.py, one launch each and no host sync
    (CUDA, or CPU tensors under TRITON_INTERPRET=1); "auto": Triton for fp32 CUDA tensors when it
    imports."""
    if backend == "auto":
        fp32_cuda = xyz.is_cuda and xyz.dtype == torch.float32
        backend = "triton" if fp32_cuda and triton_available() else "torch"
    B, N, _ = xyz.shape
    start = torch.randint(0, N, (B,), device=xyz.device) if random_start else None
    if backend == "triton":
        import kernels

        centre_idx = kernels.farthest_point_sample(xyz, num_patches, start)   # (B, S)
        centres = index_points(xyz, centre_idx)                                 # (B, S, 3)
        neighbours = kernels.ball_query(xyz, centres, radius, k)                # (B, S, k)
        grouped = kernels.group(xyz, feats, centres, neighbours)                # (B, S, k, 3 + C)
        return centres, grouped
    centre_idx = farthest_point_sample(xyz, num_patches, start)                 # (B, S)
    centres = index_points(xyz, centre_idx)                                     # (B, S, 3)
    neighbours = ball_query(xyz, centres, radius, k)                            # (B, S, k)
    relative = index_points(xyz, neighbours) - centres.unsqueeze(2)             # (B, S, k, 3)
    grouped = torch.cat([relative, index_points(feats, neighbours)], -1)        # (B, S, k, 3 + C)
    return centres, grouped


_TRITON = {}


def triton_available():
    """Whether kernels.py's Triton path can run; says so once when it cannot (PyTorch's path then
    runs)."""
    if "available" not in _TRITON:
        import kernels

        _TRITON["available"] = kernels.AVAILABLE
        if not kernels.AVAILABLE:
            print("note: Triton is not importable; grouping runs the PyTorch path "
                  "(~5,000 launches per forward)")
    return _TRITON["available"]
