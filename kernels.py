"""Triton kernels for the encoder's point grouping (CUDA path): farthest point sampling, ball query
and the neighbour gather, index for index the PyTorch reference in model.py, each ONE launch without
host sync.

Exactness. FPS repeats the reference's float32 ops and order, ((dx*dx + dy*dy) + dz*dz), the
running minimum from 1e10 and the first index among equal maxima. The ball query repeats
model.square_distance, whose c.p comes from the BLAS as fma(cz, pz, fma(cy, py, cx * px)) (MKL's
sgemm, checked value by value; torch/MKL use a loop without FMA below 4 centres or
S * N * 3 < ~400), then (dot * -2 + |c|^2) + |p|^2. Launches pass enable_fp_fusion=False, so the
compiler adds no FMA of its own. Triton's CPU interpreter (TRITON_INTERPRET=1, the tests) runs
tl.fma as numpy's a * b + c, rounded twice: there the one rounding is emulated in float64. Under the
interpreter the indices equal model.py's bitwise (tests/test_kernels.py). On a GPU the reference
runs cuBLAS, whose FMA order for K = 3 is undocumented, and one flipped near-tie changes the rest of
an FPS sequence: on CUDA expect >= 99.9% identical indices and encoder outputs equal to about 1e-3,
not bitwise equality.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU-only installs: model.py keeps its PyTorch path
    AVAILABLE = False

# read once, as triton.jit decides at decoration time whether the kernels are interpreted
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

if AVAILABLE:
    @triton.jit
    def _fma(a, b, c, EMULATE: tl.constexpr):
        """a * b + c rounded once, like the BLAS; the interpreter's tl.fma rounds twice, so emulate
        it there."""
        if EMULATE:
            return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
        return tl.fma(a, b, c)

    @triton.jit
    def _fps_kernel(xyz_ptr, start_ptr, idx_ptr, near_ptr, N, S, HAS_START: tl.constexpr,
                    BLOCK: tl.constexpr):
        """One program per cloud: S sequential picks, each one pass over the N points in blocks of
        BLOCK that updates the running minimum squared distance `near` (global scratch, L2-resident)
        and finds its argmax."""
        b = tl.program_id(0).to(tl.int64)
        xyz_ptr += b * N * 3                                     # this cloud's (N, 3) points
        near_ptr += b * N                                        # (N,) running minimum
        idx_ptr += b * S                                         # (S,) output
        for n0 in range(0, N, BLOCK):                            # torch.full((B, N), 1e10)
            offs = n0 + tl.arange(0, BLOCK)
            tl.store(near_ptr + offs, tl.full([BLOCK], 1e10, tl.float32), mask=offs < N)
        far = tl.program_id(0) * 0                               # int32 scalar: point 0 ...
        if HAS_START:
            far = tl.load(start_ptr + b).to(tl.int32)            # ... or the given start index
        for i in range(S):
            tl.store(idx_ptr + i, far.to(tl.int64))
            c = xyz_ptr + far * 3                                # the new centre's (3,) coordinates
            cx, cy, cz = tl.load(c), tl.load(c + 1), tl.load(c + 2)
            # running (max, first argmax) over the blocks
            best, best_idx = -1.0, far
            for n0 in range(0, N, BLOCK):
                offs = n0 + tl.arange(0, BLOCK)                  # (BLOCK,)
                valid = offs < N
                dx = tl.load(xyz_ptr + offs * 3, mask=valid, other=0.0) - cx
                dy = tl.load(xyz_ptr + offs * 3 + 1, mask=valid, other=0.0) - cy
                dz = tl.load(xyz_ptr + offs * 3 + 2, mask=valid, other=0.0) - cz
                near = tl.minimum(tl.load(near_ptr + offs, mask=valid, other=0.0),
                                  (dx * dx + dy * dy) + dz * dz)
                # same layout: each thread re-reads its own
                tl.store(near_ptr + offs, near, mask=valid)
                near = tl.where(valid, near, -1.0)
                # a: first index among equal maxima, as torch
                m, a = tl.max(near, axis=0, return_indices=True)
                # strict >: an earlier block wins ties
                best_idx = tl.where(m > best, n0 + a, best_idx)
                best = tl.maximum(m, best)
            far = best_idx
            # this pass's stores before the next loads
            tl.debug_barrier()

    @triton.jit
    def _ball_query_kernel(xyz_ptr, ctr_ptr, out_ptr, N, S, r2, K: tl.constexpr,
                           BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
        """One program per centre: scan the points in index order, BLOCK at a time; each hit's slot
        is the running hit count (cumsum); stop once K hits are found; pad the free slots with the
        first hit (-1 if none)."""
        pid = tl.program_id(0).to(tl.int64)                      # pid = b * S + s
        xyz_ptr += (pid // S) * N * 3                            # this centre's cloud, (N, 3)
        out_ptr += pid * K                                       # (K,) output row
        c = ctr_ptr + pid * 3                                    # this centre's (3,) coordinates
        cx, cy, cz = tl.load(c), tl.load(c + 1), tl.load(c + 2)
        cc = (cx * cx + cy * cy) + cz * cz                       # torch.sum(src ** 2, -1)
        # int32 scalars: hits so far, scan position
        count = tl.program_id(0) * 0
        n0 = count
        first = count + N                                        # smallest hit index, N = none yet
        while (n0 < N) & (count < K):
            offs = n0 + tl.arange(0, BLOCK)                      # (BLOCK,)
            valid = offs < N
            px = tl.load(xyz_ptr + offs * 3, mask=valid, other=0.0)
            py = tl.load(xyz_ptr + offs * 3 + 1, mask=valid, other=0.0)
            pz = tl.load(xyz_ptr + offs * 3 + 2, mask=valid, other=0.0)
            dot = _fma(cz, pz, _fma(cy, py, cx * px, EMULATE), EMULATE)  # the sgemm's c.p
            # model.square_distance's order
            d = (dot * -2.0 + cc) + ((px * px + py * py) + pz * pz)
            hit = (d <= r2) & valid
            slot = count + tl.cumsum(hit.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + slot, offs.to(tl.int64), mask=hit & (slot < K))
            first = tl.minimum(first, tl.min(tl.where(hit, offs, N), axis=0))
            count += tl.sum(hit.to(tl.int32), axis=0)
            n0 += BLOCK
        pad = tl.where(first < N, first, -1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        tl.store(out_ptr + ks, tl.zeros([BLOCK_K], tl.int64) + pad, mask=(ks >= count) & (ks < K))

    @triton.jit
    def _group_kernel(xyz_ptr, feat_ptr, ctr_ptr, nbr_ptr, out_ptr, N, S, C, K: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):
        """One program per centre: row j of its (K, 3 + C) tile is [xyz[nbr_j] - centre,
        feats[nbr_j]]."""
        pid = tl.program_id(0).to(tl.int64)                      # pid = b * S + s
        rows = tl.arange(0, BLOCK_K)[:, None]                    # (BLOCK_K, 1) neighbour slot
        cols = tl.arange(0, BLOCK_W)[None, :]                    # (1, BLOCK_W) output channel
        nbr = tl.load(nbr_ptr + pid * K + rows, mask=rows < K, other=-1)
        point = (pid // S) * N + nbr                             # row of the (B * N, .) inputs
        ok = (rows < K) & (nbr >= 0)                             # -1 (no hit at all) gives zeros
        rel = tl.load(xyz_ptr + point * 3 + cols, mask=ok & (cols < 3), other=0.0) \
            - tl.load(ctr_ptr + pid * 3 + cols, mask=ok & (cols < 3), other=0.0)
        feat = tl.load(feat_ptr + point * C + cols - 3, mask=ok & (cols >= 3) & (cols < 3 + C),
                       other=0.0)
        tl.store(out_ptr + (pid * K + rows) * (3 + C) + cols, tl.where(cols < 3, rel, feat),
                 mask=(rows < K) & (cols < 3 + C))


def _f32(t):
    """The kernels read raw float32 memory: check the dtype, make the layout contiguous."""
    if t.dtype != torch.float32:
        raise TypeError(f"kernels: expected float32, got {t.dtype} "
                        "(grouping runs outside autocast)")
    return t.contiguous()


def _warps(block):
    """Warps for a (block,) vector: about 8 elements per thread."""
    return max(1, min(16, block // 256))


# The compile-time constants and warps of each launch, as functions of the sizes: the launches below
# and the ahead-of-time compile test (tests/test_kernels.py) take them from here.

def fps_meta(N, has_start):
    block = min(4096, triton.next_power_of_2(N))
    return dict(HAS_START=has_start, BLOCK=block, num_warps=_warps(block))


def ball_query_meta(N, k):
    block = min(1024, triton.next_power_of_2(N))
    return dict(K=k, BLOCK=block, BLOCK_K=triton.next_power_of_2(k), EMULATE=_INTERPRET,
                num_warps=_warps(block))


def group_meta(k, C):
    return dict(K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_W=triton.next_power_of_2(3 + C),
                num_warps=4)


def farthest_point_sample(xyz, num_samples, start=None):
    """(B, N, 3) float32 -> (B, S) int64, as model.farthest_point_sample; start: (B,) indices in
    [0, N) or None (= 0), e.g. torch.randint(0, N, (B,)) for the reference's random_start."""
    xyz = _f32(xyz)
    B, N, _ = xyz.shape
    idx = torch.empty(B, num_samples, dtype=torch.long, device=xyz.device)
    # scratch, initialised by the kernel
    near = torch.empty(B, N, dtype=torch.float32, device=xyz.device)
    start_arg = idx if start is None else start.to(device=xyz.device, dtype=torch.long).contiguous()
    _fps_kernel[(B,)](xyz, start_arg, idx, near, N, num_samples, **fps_meta(N, start is not None),
                      enable_fp_fusion=False)
    return idx


def ball_query(xyz, centres, radius, k):
    """(B, N, 3), (B, S, 3) float32 -> (B, S, k) int64, as model.ball_query: the first k indices
    within radius."""
    xyz, centres = _f32(xyz), _f32(centres)
    (B, N, _), S = xyz.shape, centres.shape[1]
    out = torch.empty(B, S, k, dtype=torch.long, device=xyz.device)
    # rounded as in the reference's `<= radius ** 2`
    r2 = torch.tensor(radius ** 2, dtype=torch.float32).item()
    _ball_query_kernel[(B * S,)](xyz, centres, out, N, S, r2, **ball_query_meta(N, k),
                                 enable_fp_fusion=False)
    return out


def group(xyz, feats, centres, nbr):
    """(B, N, 3), (B, N, C), (B, S, 3), (B, S, k) -> (B, S, k, 3 + C) float32:
    cat([xyz[nbr] - centre, feats[nbr]], -1), what PatchEmbed feeds its PointNet. No autograd:
    inputs must not require grad."""
    xyz, feats, centres, nbr = _f32(xyz), _f32(feats), _f32(centres), nbr.contiguous()
    (B, N, C), (S, k) = feats.shape, nbr.shape[1:]
    out = torch.empty(B, S, k, 3 + C, dtype=torch.float32, device=xyz.device)
    _group_kernel[(B * S,)](xyz, feats, centres, nbr, out, N, S, C, **group_meta(k, C))
    return out
