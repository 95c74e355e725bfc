"""The point encoder: sizes, and grouping index for index against the PointNet++ reference
(tools/reference.py)."""
import pytest
import torch

import grouping
import model
from tools.reference import release_ball_query, release_fps, release_index_points


def unit_cloud(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(B, N, 3, generator=g)
    xyz = xyz / xyz.norm(dim=-1).max()
    return torch.cat([xyz, torch.rand(B, N, 3, generator=g)], -1)


# ---- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", [1, 2, 3, 4, 5, 6, "tiny"])
def test_output_shape_every_size(scaling):
    cfg = model.CONFIGS[scaling]
    enc = model.PointBert(cfg).eval()
    with torch.no_grad():
        out = enc(unit_cloud(2, max(1024, cfg.num_patches * 2)))
    assert out.shape == (2, cfg.dim)
    assert torch.isfinite(out).all()


def test_parameter_count_scaling4_is_exact():
    enc = model.PointBert(model.CONFIGS[4])
    assert sum(p.numel() for p in enc.parameters()) == 31_669_440


@pytest.mark.parametrize("scaling,millions",
                         [(1, 4.77), (2, 12.69), (3, 25.30), (5, 71.09), (6, 170.28)])
def test_parameter_counts_match_table(scaling, millions):
    n = sum(p.numel() for p in model.PointBert(model.CONFIGS[scaling]).parameters())
    assert round(n / 1e6, 2) == millions


# ---- grouping ------------------------------------------------------------------------------------

def test_fps_matches_reference_loop():
    xyz = unit_cloud(3, 2000, seed=1)[..., :3]
    assert torch.equal(grouping.farthest_point_sample(xyz, 128), release_fps(xyz, 128))


def test_fps_starts_at_zero_and_random_start_is_opt_in():
    xyz = unit_cloud(4, 500, seed=2)[..., :3]
    assert (grouping.farthest_point_sample(xyz, 8)[:, 0] == 0).all()
    start = torch.tensor([3, 499, 0, 7])
    assert torch.equal(grouping.farthest_point_sample(xyz, 8, start)[:, 0], start)
    torch.manual_seed(0)
    centres, _ = grouping.group(xyz, xyz, 8, 0.3, 4, random_start=True, backend="torch")
    torch.manual_seed(0)
    # the same draw: the first centre of cloud b is its point drawn[b]
    drawn = torch.randint(0, 500, (4,))
    assert (drawn != 0).any() and torch.equal(centres[:, 0], xyz[torch.arange(4), drawn])


@pytest.mark.parametrize("radius,k,max_elements",
                         [(0.2, 64, 2 ** 24), (0.35, 16, 5000), (0.05, 8, 2 ** 24)])
def test_ball_query_matches_sort_reference(radius, k, max_elements):
    xyz = unit_cloud(2, 3000, seed=3)[..., :3]
    centres = grouping.index_points(xyz, grouping.farthest_point_sample(xyz, 100))
    ours = grouping.ball_query(xyz, centres, radius, k, max_elements=max_elements)
    assert torch.equal(ours, release_ball_query(radius, k, xyz, centres))


def test_reference_index_points_matches_gather():
    pts = torch.randn(2, 50, 6)
    idx = torch.randint(0, 50, (2, 7, 5))
    assert torch.equal(release_index_points(pts, idx), grouping.index_points(pts, idx))


def test_ball_query_takes_first_k_by_index_not_nearest():
    # Documented behaviour (OpenShape shuffles points in training because of it): the output depends
    # on point order. Points 0..9 lie at distance 0.09, points 10..19 at 0.01 from the centre.
    far = torch.tensor([[0.09, 0.0, 0.0]]).repeat(10, 1)
    near = torch.tensor([[0.01, 0.0, 0.0]]).repeat(10, 1)
    xyz = torch.cat([far, near, torch.tensor([[5.0, 5.0, 5.0]])]).unsqueeze(0)
    idx = grouping.ball_query(xyz, torch.zeros(1, 1, 3), radius=0.1, k=4)
    assert idx.tolist() == [[[0, 1, 2, 3]]]
    # fewer hits than k: the free slots repeat the first hit
    idx = grouping.ball_query(xyz, torch.tensor([[[0.0, 0.0, 0.0]]]), radius=0.1, k=25)
    assert idx[0, 0, :20].tolist() == list(range(20)) and idx[0, 0, 20:].tolist() == [0] * 5


def test_ball_query_pads_with_the_first_hit_by_index():
    """Fewer hits than k: the free slots repeat the centre's first hit by index, which here is
    neither point 0 nor the nearest point nor the last hit."""
    xyz = torch.tensor([[5.0, 5.0, 5.0], [-5.0, 5.0, 5.0], [5.0, -5.0, 5.0],   # 0-2: far away
                        [0.08, 0.0, 0.0], [0.01, 0.0, 0.0], [0.0, 0.05, 0.0],  # 3-6: in the ball
                        [0.0, 0.0, 0.03],                                      # of the origin
                        [2.0, 2.0, 2.0], [2.05, 2.0, 2.0], [1.98, 2.0, 2.0]])  # 7-9: another
    centres = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]])
    idx = grouping.ball_query(xyz[None], centres, radius=0.1, k=8)
    assert idx.tolist() == [[[3, 4, 5, 6, 3, 3, 3, 3], [7, 8, 9, 7, 7, 7, 7, 7]]]
    assert torch.equal(idx, release_ball_query(0.1, 8, xyz[None], centres))


def _ball_cloud(n, seed):
    """(1, n, 6): xyz uniform in the unit ball, rgb uniform."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(1, n, 3, generator=g)
    xyz = xyz / xyz.norm(dim=-1, keepdim=True) * torch.rand(1, n, 1, generator=g) ** (1 / 3)
    return torch.cat([xyz, torch.rand(1, n, 3, generator=g)], -1)


def _balls(xyz, cfg):
    """Points within the radius of each FPS centre: (B, S) counts."""
    centres = grouping.index_points(xyz, grouping.farthest_point_sample(xyz, cfg.num_patches))
    return (grouping.exact_square_distance(centres, xyz) <= cfg.radius ** 2).sum(-1)


def _perm_keeping_point_0(n, seed):
    perm = torch.cat([torch.zeros(1, dtype=torch.long),
                      1 + torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))])
    assert not torch.equal(perm, torch.arange(n))
    return perm


def test_point_order_matters_only_through_point_0_and_overflowing_balls():
    """FPS starts at point 0, and a ball query keeps the first k hits by index padded with the first
    hit, which max pooling ignores. So when no ball overflows k, any permutation that keeps point 0
    first gives the same output; where balls overflow, which k points a patch keeps depends on the
    order (the first k by index, not the nearest), so a permutation changes the output."""
    cfg = model.CONFIGS["tiny"]
    torch.manual_seed(0)
    enc = model.PointBert(cfg).eval()
    # sparse: 128 points in the unit ball; a ball of radius 0.3 holds far fewer than k = 32
    sparse = _ball_cloud(128, seed=4)
    assert _balls(sparse[..., :3], cfg).max() < cfg.k
    perm = _perm_keeping_point_0(128, seed=1)
    with torch.no_grad():
        out = enc(sparse)
        assert torch.allclose(enc(sparse[:, perm]), out, atol=1e-5)
        # moving point 0 moves FPS's start: other centres, another output
        moved = torch.roll(torch.arange(128), 1)
        assert not torch.allclose(enc(sparse[:, moved]), out, atol=1e-3)
    # dense: 4096 points, most balls hold more than k; the same kind of permutation changes it
    dense = _ball_cloud(4096, seed=5)
    assert (_balls(dense[..., :3], cfg) > cfg.k).float().mean() > 0.5
    perm = _perm_keeping_point_0(4096, seed=1)
    with torch.no_grad():
        assert not torch.allclose(enc(dense[:, perm]), enc(dense), atol=1e-3)


def test_grouping_stays_fp32_under_autocast():
    enc = model.PointBert(model.CONFIGS["tiny"]).eval()
    pts = unit_cloud(2, 512)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(pts)
    assert out.shape == (2, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize("heads", ["dual", "openshape"])
def test_heads_run_in_fp32_under_autocast(heads):
    """bf16 inference rounds the encoder only: the heads see the encoder feature in fp32 and give
    the fp32 result of their own weights (the same as running them alone on that feature)."""
    torch.manual_seed(0)
    m = model.TAMM(model.CONFIGS["tiny"], clip_dim=64, head_type=heads).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(unit_cloud(2, 512))
    assert out["backbone"].dtype == torch.bfloat16
    assert out["image"].dtype == out["text"].dtype == torch.float32
    with torch.no_grad():
        alone = (m.adapters(out["backbone"].float()) if heads == "dual"
                 else (m.proj(out["backbone"].float()),) * 2)
    assert torch.equal(alone[0], out["image"]) and torch.equal(alone[1], out["text"])
