"""The point encoder: sizes, grouping against the PointNet++ reference, and parity with the release layout."""
import math

import pytest
import torch
import torch.nn.functional as F

import model
from adapters import alignment_head
from utils import BadInput


# ---- plain reference implementations, written as the PointNet++ utilities used by OpenShape/TAMM ----------

def ref_fps(xyz, npoint):
    B, N, _ = xyz.shape
    centroids = torch.zeros(B, npoint, dtype=torch.long)
    distance = torch.ones(B, N) * 1e10
    farthest = torch.zeros(B, dtype=torch.long)
    batch = torch.arange(B)
    for i in range(npoint):
        centroids[:, i] = farthest
        centroid = xyz[batch, farthest, :].view(B, 1, 3)
        dist = torch.sum((xyz - centroid) ** 2, -1)
        mask = dist < distance
        distance[mask] = dist[mask]
        farthest = torch.max(distance, -1)[1]
    return centroids


def ref_ball_query(radius, nsample, xyz, new_xyz):
    B, N, _ = xyz.shape
    S = new_xyz.shape[1]
    group_idx = torch.arange(N, dtype=torch.long).view(1, 1, N).repeat([B, S, 1])
    sqrdists = -2 * torch.matmul(new_xyz, xyz.permute(0, 2, 1))
    sqrdists += torch.sum(new_xyz ** 2, -1).view(B, S, 1)
    sqrdists += torch.sum(xyz ** 2, -1).view(B, 1, N)
    group_idx[sqrdists > radius ** 2] = N
    group_idx = group_idx.sort(dim=-1)[0][:, :, :nsample]
    group_first = group_idx[:, :, 0].view(B, S, 1).repeat([1, 1, nsample])
    mask = group_idx == N
    group_idx[mask] = group_first[mask]
    return group_idx


def unit_cloud(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(B, N, 3, generator=g)
    xyz = xyz / xyz.norm(dim=-1).max()
    return torch.cat([xyz, torch.rand(B, N, 3, generator=g)], -1)


# ---- sizes ---------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("scaling,millions", [(1, 4.77), (2, 12.69), (3, 25.30), (5, 71.09), (6, 170.28)])
def test_parameter_counts_match_table(scaling, millions):
    n = sum(p.numel() for p in model.PointBert(model.CONFIGS[scaling]).parameters())
    assert round(n / 1e6, 2) == millions


# ---- grouping --------------------------------------------------------------------------------------------

def test_fps_matches_reference_loop():
    xyz = unit_cloud(3, 2000, seed=1)[..., :3]
    assert torch.equal(model.farthest_point_sample(xyz, 128), ref_fps(xyz, 128))


def test_fps_starts_at_zero_and_random_start_is_opt_in():
    xyz = unit_cloud(4, 500, seed=2)[..., :3]
    assert (model.farthest_point_sample(xyz, 8)[:, 0] == 0).all()
    torch.manual_seed(0)
    starts = model.farthest_point_sample(xyz, 8, random_start=True)[:, 0]
    assert (starts != 0).any()


@pytest.mark.parametrize("radius,k,max_elements", [(0.2, 64, 2 ** 24), (0.35, 16, 5000), (0.05, 8, 2 ** 24)])
def test_ball_query_matches_sort_reference(radius, k, max_elements):
    xyz = unit_cloud(2, 3000, seed=3)[..., :3]
    centres = model.index_points(xyz, model.farthest_point_sample(xyz, 100))
    ours = model.ball_query(xyz, centres, radius, k, max_elements=max_elements)
    assert torch.equal(ours, ref_ball_query(radius, k, xyz, centres))


def test_ball_query_takes_first_k_by_index_not_nearest():
    # Documented behaviour (OpenShape shuffles points in training because of it): the output depends on
    # point order. Points 0..9 lie at distance 0.09, points 10..19 at 0.01 from the centre.
    far = torch.tensor([[0.09, 0.0, 0.0]]).repeat(10, 1)
    near = torch.tensor([[0.01, 0.0, 0.0]]).repeat(10, 1)
    xyz = torch.cat([far, near, torch.tensor([[5.0, 5.0, 5.0]])]).unsqueeze(0)
    idx = model.ball_query(xyz, torch.zeros(1, 1, 3), radius=0.1, k=4)
    assert idx.tolist() == [[[0, 1, 2, 3]]]
    # fewer hits than k: the free slots repeat the first hit
    idx = model.ball_query(xyz, torch.tensor([[[0.0, 0.0, 0.0]]]), radius=0.1, k=25)
    assert idx[0, 0, :20].tolist() == list(range(20)) and idx[0, 0, 20:].tolist() == [0] * 5


def test_shuffled_points_change_output_only_through_grouping():
    torch.manual_seed(0)
    enc = model.PointBert(model.CONFIGS["tiny"]).eval()
    pts = unit_cloud(1, 1024, seed=4)
    perm = torch.randperm(1024)
    with torch.no_grad():
        a, b = enc(pts), enc(pts[:, perm])
    assert not torch.allclose(a, b, atol=1e-4)  # index-order ball query + FPS start: not permutation invariant
    with torch.no_grad():  # ...but keeping point 0 first and the rest in order is the identity permutation
        assert torch.allclose(a, enc(pts.clone()), atol=0)


def test_grouping_stays_fp32_under_autocast():
    enc = model.PointBert(model.CONFIGS["tiny"]).eval()
    pts = unit_cloud(2, 512)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(pts)
    assert out.shape == (2, 128) and torch.isfinite(out).all()


# ---- release layout and parity ---------------------------------------------------------------------------

def release_checkpoint(cfg, heads="dual", seed=0):
    """A checkpoint with the key layout of tamm-facts.md section 3, random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    sd = {"module.ppat.cls_token": r(cfg.dim)}
    widths = [3 + cfg.in_dim, 64, 64, cfg.sa_dim]
    for i in range(3):
        sd[f"module.ppat.sa.mlp_convs.{i}.weight"] = r(widths[i + 1], widths[i], 1, 1)
        sd[f"module.ppat.sa.mlp_convs.{i}.bias"] = r(widths[i + 1])
        sd.update(bn_keys(f"module.ppat.sa.mlp_bns.{i}.", widths[i + 1], r))
    sd["module.ppat.lift.0.weight"] = r(cfg.dim, cfg.sa_dim + 3, 1)
    sd["module.ppat.lift.0.bias"] = r(cfg.dim)
    sd["module.ppat.lift.2.weight"] = 1 + r(cfg.dim)
    sd["module.ppat.lift.2.bias"] = r(cfg.dim)
    inner = cfg.heads * 64
    for i in range(cfg.depth):
        p = f"module.ppat.transformer.layers.{i}."
        sd.update({p + "0.norm.weight": 1 + r(cfg.dim), p + "0.norm.bias": r(cfg.dim),
                   p + "0.fn.to_qkv.weight": r(3 * inner, cfg.dim),
                   p + "0.fn.to_out.0.weight": r(cfg.dim, inner), p + "0.fn.to_out.0.bias": r(cfg.dim),
                   p + "1.norm.weight": 1 + r(cfg.dim), p + "1.norm.bias": r(cfg.dim),
                   p + "1.fn.net.0.weight": r(cfg.mlp_dim, cfg.dim), p + "1.fn.net.0.bias": r(cfg.mlp_dim),
                   p + "1.fn.net.3.weight": r(cfg.dim, cfg.mlp_dim), p + "1.fn.net.3.bias": r(cfg.dim)})
    if heads == "openshape":
        sd["module.proj.weight"], sd["module.proj.bias"] = r(1280, cfg.dim), r(1280)
        return {"state_dict": sd}
    ckpt = {"state_dict": sd, "logit_scale": {"module.logit_scale": torch.tensor(math.log(20.0))},
            "optimizer": None, "scheduler": None, "epoch": 3, "step": 10}
    for part in ("image_alignment_adapter", "text_alignment_adapter"):
        head = {"module.classifier.0.weight": r(1024, cfg.dim), "module.classifier.0.bias": r(1024),
                "module.classifier.4.weight": r(1280, 1024), "module.classifier.4.bias": r(1280)}
        head.update(bn_keys("module.classifier.1.", 1024, r))
        head.update(bn_keys("module.classifier.5.", 1280, r))
        ckpt[part] = head
    return ckpt


def bn_keys(prefix, n, r):
    return {prefix + "weight": 1 + r(n), prefix + "bias": r(n), prefix + "running_mean": r(n),
            prefix + "running_var": 1 + r(n).abs(), prefix + "num_batches_tracked": torch.tensor(7)}


def ref_forward(sd, cfg, pts):
    """The release's forward written out functionally over its own key names (eval mode)."""
    w = {k.removeprefix("module.ppat."): v for k, v in sd.items()}
    B = pts.shape[0]
    xyz = pts[..., :3]
    centres = model.index_points(xyz, ref_fps(xyz, cfg.num_patches))
    idx = ref_ball_query(cfg.radius, cfg.k, xyz, centres)
    x = torch.cat([model.index_points(xyz, idx) - centres.unsqueeze(2), model.index_points(pts, idx)], -1)
    x = x.permute(0, 3, 2, 1)
    for i in range(3):
        x = F.conv2d(x, w[f"sa.mlp_convs.{i}.weight"], w[f"sa.mlp_convs.{i}.bias"])
        bn = f"sa.mlp_bns.{i}."
        x = F.relu(F.batch_norm(x, w[bn + "running_mean"], w[bn + "running_var"], w[bn + "weight"], w[bn + "bias"]))
    x = torch.max(x, 2)[0]
    x = F.conv1d(torch.cat([centres.permute(0, 2, 1), x], 1), w["lift.0.weight"], w["lift.0.bias"])
    x = F.layer_norm(x.permute(0, 2, 1), (cfg.dim,), w["lift.2.weight"], w["lift.2.bias"])
    x = torch.cat([w["cls_token"].view(1, 1, -1).expand(B, 1, -1), x], 1)
    for i in range(cfg.depth):
        p = f"transformer.layers.{i}."
        h = F.layer_norm(x, (cfg.dim,), w[p + "0.norm.weight"], w[p + "0.norm.bias"])
        q, k, v = (t.view(B, -1, cfg.heads, 64).transpose(1, 2) for t in (h @ w[p + "0.fn.to_qkv.weight"].T).chunk(3, -1))
        attn = torch.softmax(q @ k.transpose(-1, -2) * 64 ** -0.5, -1) @ v
        x = x + attn.transpose(1, 2).reshape(B, -1, cfg.heads * 64) @ w[p + "0.fn.to_out.0.weight"].T + w[p + "0.fn.to_out.0.bias"]
        h = F.layer_norm(x, (cfg.dim,), w[p + "1.norm.weight"], w[p + "1.norm.bias"])
        h = F.gelu(h @ w[p + "1.fn.net.0.weight"].T + w[p + "1.fn.net.0.bias"])
        x = x + h @ w[p + "1.fn.net.3.weight"].T + w[p + "1.fn.net.3.bias"]
    return x[:, 0]


def ref_head(head, f):
    h = {k.removeprefix("module.classifier."): v for k, v in head.items()}
    for lin, bn in (("0", "1"), ("4", "5")):
        f = f @ h[lin + ".weight"].T + h[lin + ".bias"]
        f = F.gelu(F.batch_norm(f, h[bn + ".running_mean"], h[bn + ".running_var"], h[bn + ".weight"], h[bn + ".bias"]))
    return f


def test_release_checkpoint_scaling4_loads_every_key(tmp_path):
    ckpt = release_checkpoint(model.CONFIGS[4])
    path = tmp_path / "tamm_pointbert_ensemble.pt"
    torch.save(ckpt, path)
    m = model.load_pretrained(path, scaling=4)
    assert m.heads == "dual" and not m.training
    assert torch.equal(m.encoder.blocks[11].attn.qkv.weight, ckpt["state_dict"]["module.ppat.transformer.layers.11.0.fn.to_qkv.weight"])
    assert torch.equal(m.adapters.text[5].running_var, ckpt["text_alignment_adapter"]["module.classifier.5.running_var"])
    assert math.isclose(m.scale().item(), 20.0, rel_tol=1e-6)


def test_release_parity_tiny():
    cfg = model.CONFIGS["tiny"]
    ckpt = release_checkpoint(cfg, seed=1)
    m = model.load_pretrained(ckpt, scaling="tiny")
    pts = unit_cloud(2, 1024, seed=5)
    with torch.no_grad():
        out = m(pts)
        f = ref_forward(ckpt["state_dict"], cfg, pts)
    assert torch.allclose(out["backbone"], f, atol=1e-5)
    assert torch.allclose(out["image"], ref_head(ckpt["image_alignment_adapter"], f), atol=1e-5)
    assert torch.allclose(out["text"], ref_head(ckpt["text_alignment_adapter"], f), atol=1e-5)


def test_openshape_checkpoint_is_one_branch():
    cfg = model.CONFIGS["tiny"]
    ckpt = release_checkpoint(cfg, heads="openshape", seed=2)
    m = model.load_pretrained(ckpt, scaling="tiny")
    pts = unit_cloud(1, 512)
    with torch.no_grad():
        out = m(pts)
        f = ref_forward(ckpt["state_dict"], cfg, pts)
    assert m.heads == "openshape" and torch.equal(out["image"], out["text"])
    assert torch.allclose(out["text"], f @ ckpt["state_dict"]["module.proj.weight"].T + ckpt["state_dict"]["module.proj.bias"], atol=1e-5)


def test_key_errors_name_the_key():
    ckpt = release_checkpoint(model.CONFIGS["tiny"])
    del ckpt["state_dict"]["module.ppat.lift.2.bias"]
    with pytest.raises(BadInput, match="encoder.lift_norm.bias"):
        model.load_pretrained(ckpt, scaling="tiny")
    ckpt = release_checkpoint(model.CONFIGS["tiny"])
    ckpt["state_dict"]["module.ppat.extra.weight"] = torch.zeros(1)
    with pytest.raises(BadInput, match="ppat.extra.weight"):
        model.load_pretrained(ckpt, scaling="tiny")
    with pytest.raises(BadInput, match="wrong model size"):  # a tiny (depth 2) file read as scaling 1
        model.load_pretrained(release_checkpoint(model.CONFIGS["tiny"]), scaling=1)
    with pytest.raises(BadInput, match="has shape"):  # same depth, other widths
        model.load_pretrained(release_checkpoint(model.CONFIGS[2]), scaling=1)


def test_our_checkpoint_rebuilds_from_config(tmp_path):
    m = model.TAMM(model.CONFIGS["tiny"]).eval()
    torch.save({"model": m.state_dict(), "config": m.config()}, tmp_path / "c.pt")
    m2 = model.load_pretrained(tmp_path / "c.pt")
    pts = unit_cloud(2, 512)
    with torch.no_grad():
        assert torch.equal(m(pts)["text"], m2(pts)["text"])


def test_corrupt_checkpoint_is_bad_input(tmp_path):
    path = tmp_path / "broken.pt"
    m = model.TAMM(model.CONFIGS["tiny"])
    torch.save({"model": m.state_dict(), "config": m.config()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BadInput, match="broken.pt"):
        model.load_pretrained(path)
    with pytest.raises(BadInput, match="not found"):
        model.load_pretrained(tmp_path / "missing.pt")


def test_adapter_head_keys_match_release_classifier():
    assert set(alignment_head(512, 1280, 0.5).state_dict()) == {
        f"{i}.{n}" for i in (0, 4) for n in ("weight", "bias")} | {
        f"{i}.{n}" for i in (1, 5) for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
