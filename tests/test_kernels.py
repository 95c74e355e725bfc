"""The Triton grouping kernels (kernels.py) against model.py's PyTorch reference, on a machine
without a GPU.

Index checks: Triton's CPU interpreter runs the kernels on CPU tensors, but TRITON_INTERPRET=1 must
be set before kernels.py is imported, so they run in a subprocess
(`TRITON_INTERPRET=1 python tests/test_kernels.py interpret`).
CUDA path: every launch of every encoder size is compiled for sm_80, sm_90 and sm_100 (ptxas ships
with triton) and its SASS is read for FMAs.

Exactness of the ball query. grouping.square_distance takes c.p from torch.matmul. MKL's sgemm
computes it as fma(cz, pz, fma(cy, py, cx * px)) (checked value by value), the kernel does the same,
so in the sgemm regime (>= 4 centres and S * N * 3 >= ~400) the squared distances, hence the
indices, are bitwise equal: asserted, including radii put exactly on a reference distance where
plain float32 arithmetic would differ. With fewer than 4 centres (or tiny S * N) torch/MKL take a
loop without FMA, and only points within a few ulps of the radius can differ: there we assert
equality except on rows holding such a point, and that those are rare.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(mode, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1" if mode == "interpret" else "0",
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import kernels; "
            "assert kernels.AVAILABLE is False")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_kernels_equal_reference_in_interpreter(tmp_path):
    rc, out = _run("interpret", tmp_path)
    assert rc == 0 and "ALL OK" in out, out


def test_cuda_builds_for_every_size_and_gpu_have_fma_only_where_the_blas_has_them(tmp_path):
    rc, out = _run("compile", tmp_path)  # the torch CUDA wheels' triton ships ptxas and cuobjdump
    assert rc == 0 and "ALL OK" in out, out


# ---- run in the subprocess -----------------------------------------------------------------------

def _cloud(g, B, N):
    """(B, N, 3) points uniform in the unit ball."""
    import torch
    x = torch.randn(B, N, 3, generator=g)
    return x / x.norm(dim=-1, keepdim=True) * torch.rand(B, N, 1, generator=g) ** (1 / 3)


def _duplicated(g, B, distinct, copies):
    """(B, distinct * copies, 3): `distinct` points, each repeated `copies` times, shuffled (FPS
    ties)."""
    import torch
    x = _cloud(g, B, distinct).repeat(1, copies, 1)
    return x[:, torch.randperm(x.shape[1], generator=g)].contiguous()


def check_interpret():
    import torch
    sys.path.insert(0, str(ROOT))
    import grouping
    import kernels
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    # ---- farthest point sampling: random clouds, exact duplicates, a lattice (equal distances),
    # and as many centres as points
    lattice = torch.stack(torch.meshgrid(*[torch.arange(8.0) / 8] * 3, indexing="ij"),
                          -1).view(1, 512, 3)
    fps_cases = [(_cloud(g, 2, 2000), 64), (_cloud(g, 2, 1000), 48),
                 (_duplicated(g, 2, 50, 12), 64),
                 (_duplicated(g, 1, 40, 125), 48),  # N = 5000: two blocks of 4096, ties across them
                 (lattice, 100), (_cloud(g, 1, 100), 100), (_cloud(g, 1, 100), 99),
                 (_cloud(g, 1, 1), 1)]
    # ties made by rounding: (a, b, c) and (b, a, c) are exactly as far from the origin in the
    # reference's ((x^2 + y^2) + z^2), not with an FMA or the sums in another order; the first index
    # must win
    far = _cloud(g, 16, 1)
    far = far / far.norm(dim=-1, keepdim=True)
    fps_cases.append((torch.cat([torch.zeros(16, 1, 3), far, far[..., [1, 0, 2]],
                                 _cloud(g, 16, 61) / 2], 1), 8))
    for xyz, S in fps_cases:
        assert torch.equal(kernels.farthest_point_sample(xyz, S),
                           grouping.farthest_point_sample(xyz, S)), xyz.shape
    # random start indices, as model.group draws them for --fps-random-start
    for xyz, S in fps_cases[1:3]:
        start = torch.randint(0, xyz.shape[1], (2,), generator=g)
        assert torch.equal(kernels.farthest_point_sample(xyz, S, start),
                           grouping.farthest_point_sample(xyz, S, start))
    # model.group with backend="triton" is the CUDA path of PatchEmbed: the same centres and
    # neighbours
    xyz = _cloud(g, 2, 1500)
    feats = torch.cat([xyz, torch.rand(2, 1500, 3, generator=g)], -1)
    for random_start in (False, True):
        torch.manual_seed(1)
        ref = grouping.group(xyz, feats, 64, 0.2, 32, random_start, backend="torch")
        torch.manual_seed(1)
        ours = grouping.group(xyz, feats, 64, 0.2, 32, random_start, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    print("fps ok")

    # ---- ball query
    def same(xyz, centres, radius, k):
        ours, ref = (kernels.ball_query(xyz, centres, radius, k),
                     grouping.ball_query(xyz, centres, radius, k))
        assert ours.dtype == torch.long and torch.equal(ours, ref), (
            xyz.shape, centres.shape, radius, k)
        return ref

    for xyz, S in fps_cases[:3]:
        centres = grouping.index_points(xyz, grouping.farthest_point_sample(xyz, 32))
        same(xyz, centres, 0.2, 32)
        same(xyz, centres, 0.3, 64)
    xyz = _cloud(g, 2, 3000)  # several blocks of 1024: early stop (k small, r large) and full scans
    same(xyz, xyz[:, :16], 1.0, 16)
    same(xyz, xyz[:, :16], 0.2, 64)
    small = _cloud(g, 2, 40)  # N < k: every point, then padding with the first hit
    same(small, small[:, :8], 0.5, 64)
    assert (same(small, small[:, :8], 2.0, 64)[:, :, :40] == torch.arange(40)).all()
    same(fps_cases[5][0], fps_cases[5][0], 0.3, 32)  # S = N
    # empty balls: at r = 1e-5 |c|^2 - 2c.c + |c|^2 is not exactly 0, so many centres miss even
    # themselves and the reference pads with -1 (slot 0 holds no hit); centres far from every point
    # also give -1 rows
    xyz = fps_cases[0][0]
    ref = same(xyz, xyz[:, :32], 1e-5, 16)
    alone = (ref == torch.arange(32).view(1, 32, 1)).all(-1)
    print("ball query r=1e-5: %d of %d centres miss themselves"
          % ((ref == -1).all(-1).sum(), alone.numel()))
    assert ((ref == -1).all(-1) | alone).all() and (ref == -1).any()
    assert (same(xyz, torch.full((2, 4, 3), 10.0), 0.3, 16) == -1).all()

    # radii exactly on a reference distance, picked where plain float32 arithmetic (no FMA) gives
    # another value: only the BLAS's arithmetic puts the boundary point on the right side of `<=`
    xyz, centres = _cloud(g, 1, 2000), _cloud(g, 1, 4)
    dist = grouping.square_distance(centres, xyz)
    p, c = xyz[:, None], centres[:, :, None]
    plain = (c[..., 0] * p[..., 0] + c[..., 1] * p[..., 1]) + c[..., 2] * p[..., 2]
    plain = (plain * -2 + (centres ** 2).sum(-1)[..., None]) + (xyz ** 2).sum(-1)[:, None]
    picks = ((dist != plain) & (dist > 0.01) & (dist < 0.09)).nonzero()[::7][:5]
    assert len(picks) == 5
    for _, s, n in picks.tolist():
        # on it, just outside
        for r2 in (dist[0, s, n], torch.nextafter(dist[0, s, n], torch.tensor(0.0))):
            radius = float(r2) ** 0.5
            assert torch.tensor(radius ** 2, dtype=torch.float32) == r2
            ref = same(xyz, centres, radius, 256)
            assert (n in ref[0, s].tolist()) == bool(r2 == dist[0, s, n])
    # fewer than 4 centres: torch's matmul skips FMA there, so points a few ulps from the radius may
    # differ
    xyz, radius = _cloud(g, 4, 2000), 0.2
    centres = xyz[:, :3]
    ours, ref = (kernels.ball_query(xyz, centres, radius, 64),
                 grouping.ball_query(xyz, centres, radius, 64))
    exact = ((centres[:, :, None].double() - xyz[:, None].double()) ** 2).sum(-1)
    # (B, S) rows with a point near the boundary
    near = ((exact - radius ** 2).abs() <= 1e-6).any(-1)
    differ = (ours != ref).any(-1)
    print("ball query, 3 centres: %d rows differ, %d rows have a point within 1e-6"
          % (differ.sum(), near.sum()))
    assert not (differ & ~near).any() and differ.float().mean() <= 0.25, (
        differ.sum(), near.sum())
    print("ball query ok")

    # ---- gather of the grouped neighbours: [xyz[nbr] - centre, feats[nbr]]
    for C in (3, 5):
        xyz = _cloud(g, 2, 500)
        feats = torch.rand(2, 500, C, generator=g)
        centres = grouping.index_points(xyz, grouping.farthest_point_sample(xyz, 16))
        nbr = grouping.ball_query(xyz, centres, 0.3, 32)
        ref = torch.cat([grouping.index_points(xyz, nbr) - centres.unsqueeze(2),
                         grouping.index_points(feats, nbr)], -1)
        assert torch.equal(kernels.group(xyz, feats, centres, nbr), ref)
    print("group ok\nALL OK")


# the point counts that real runs hand to the kernels, and why
POINT_COUNTS = {10_000: "training, ModelNet40 and LVIS", 8_192: "Point-BERT's few-shot folds",
                2_048: "ScanObjectNN", 1_024: "the CPU demo"}
CAPABILITIES = (80, 90, 100)  # A100, H100, B200


def compile_cases():
    """Every (kernel, argument types, constexprs, warps) the wrappers of kernels.py launch for some
    encoder size of model.CONFIGS and some point count of POINT_COUNTS, each once."""
    import kernels
    import model
    f32, i32, i64 = "*fp32", "i32", "*i64"
    cases = {}
    for N in POINT_COUNTS:
        for has_start in (False, True):
            cases[("fps", N > 4096, N, has_start)] = (
                kernels._fps_kernel, [f32, i64, i64, f32, i32, i32], kernels.fps_meta(N, has_start))
        for cfg in model.CONFIGS.values():
            meta = {**kernels.ball_query_meta(N, cfg.k), "EMULATE": False}  # a GPU's own FMA
            cases[("ball_query", *sorted(meta.items()))] = (
                kernels._ball_query_kernel, [f32, f32, i64, i32, i32, "fp32"], meta)
            meta = kernels.group_meta(cfg.k, cfg.in_dim)
            cases[("group", *sorted(meta.items()))] = (
                kernels._group_kernel, [f32, f32, f32, i64, f32, i32, i32, i32], meta)
    unique = {}
    for fn, types, meta in cases.values():  # FPS meta repeats across point counts: dedupe by value
        unique[(fn.__name__, tuple(sorted(meta.items())))] = (fn, types, meta)
    return list(unique.values())


def check_compile():
    """Compile every launch of every encoder size for A100, H100 and B200 (capabilities 80, 90,
    100) and count the FMAs in the SASS: none in FPS (its reference rounds every op), exactly the
    two per point of the dot product in the ball query, none in the gather, no float64 anywhere.
    An FFMA2 (sm_100's paired FMA) counts as two."""
    import re
    from concurrent.futures import ThreadPoolExecutor
    sys.path.insert(0, str(ROOT))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    assert cuobjdump.exists(), f"{cuobjdump}: triton's NVIDIA toolchain is missing"
    cases = compile_cases()

    def build(job):
        n, cap, (fn, types, meta) = job
        const = {k: v for k, v in meta.items() if k != "num_warps"}
        warps = meta["num_warps"]
        signature = {**dict(zip(fn.arg_names, types)), **{k: "constexpr" for k in const}}
        compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=const),
                                  target=GPUTarget("cuda", cap, 32),
                                  options=dict(num_warps=warps, enable_fp_fusion=False))
        cubin = Path(os.environ["TRITON_CACHE_DIR"]) / f"{fn.__name__}-{n}-sm{cap}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True,
                              text=True).stdout
        fmas = len(re.findall(r"\bFFMA\b", sass)) + 2 * len(re.findall(r"\bFFMA2\b", sass))
        expected = 0
        if fn.__name__ == "_ball_query_kernel":  # BLOCK points over 32 * warps threads, 2 FMAs each
            expected = 2 * const["BLOCK"] // (32 * warps)
        float64 = re.search(r"\bD(ADD|MUL|FMA)\b", sass)
        return fn.__name__, cap, const, warps, fmas, expected, float64

    jobs = [(n, cap, case) for cap in CAPABILITIES for n, case in enumerate(cases)]
    with ThreadPoolExecutor(2) as pool:
        for name, cap, const, warps, fmas, expected, float64 in pool.map(build, jobs):
            print(f"sm_{cap} {name} {const} warps={warps} FMA {fmas}")
            assert fmas == expected and not float64, (name, cap, const, fmas, expected)
    print(f"{len(jobs)} builds ({len(cases)} launches x {len(CAPABILITIES)} capabilities)")
    print("ALL OK")


if __name__ == "__main__":
    {"interpret": check_interpret, "compile": check_compile}[sys.argv[1]]()
