"""checkpoint.py: the released TAMM and OpenShape layouts load key for key and compute what the
release computes (minGPT-style parity against the release's forward written over its own key
names), our checkpoints rebuild, bad files name themselves, and the CIA loads from either
layout."""
import math

import pytest
import torch
import torch.nn.functional as F

import grouping
import model
from adapters import ClipImageAdapter, alignment_head
from checkpoint import load_cia, load_pretrained
from files import BadInput
from test_model import unit_cloud
from tools.reference import release_ball_query, release_fps


def release_checkpoint(cfg, head_type="dual", seed=0):
    """A checkpoint in the released TAMM key layout (DDP `module.` keys of OpenShape ppat.py and
    TAMM trainers/mlp.py), random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

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
                   p + "0.fn.to_out.0.weight": r(cfg.dim, inner),
                   p + "0.fn.to_out.0.bias": r(cfg.dim),
                   p + "1.norm.weight": 1 + r(cfg.dim), p + "1.norm.bias": r(cfg.dim),
                   p + "1.fn.net.0.weight": r(cfg.mlp_dim, cfg.dim),
                   p + "1.fn.net.0.bias": r(cfg.mlp_dim),
                   p + "1.fn.net.3.weight": r(cfg.dim, cfg.mlp_dim),
                   p + "1.fn.net.3.bias": r(cfg.dim)})
    if head_type == "openshape":
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
    centres = grouping.index_points(xyz, release_fps(xyz, cfg.num_patches))
    idx = release_ball_query(cfg.radius, cfg.k, xyz, centres)
    x = torch.cat([grouping.index_points(xyz, idx) - centres.unsqueeze(2),
                   grouping.index_points(pts, idx)], -1)
    x = x.permute(0, 3, 2, 1)
    for i in range(3):
        x = F.conv2d(x, w[f"sa.mlp_convs.{i}.weight"], w[f"sa.mlp_convs.{i}.bias"])
        bn = f"sa.mlp_bns.{i}."
        x = F.relu(F.batch_norm(x, w[bn + "running_mean"], w[bn + "running_var"], w[bn + "weight"],
                                w[bn + "bias"]))
    x = torch.max(x, 2)[0]
    x = F.conv1d(torch.cat([centres.permute(0, 2, 1), x], 1), w["lift.0.weight"], w["lift.0.bias"])
    x = F.layer_norm(x.permute(0, 2, 1), (cfg.dim,), w["lift.2.weight"], w["lift.2.bias"])
    x = torch.cat([w["cls_token"].view(1, 1, -1).expand(B, 1, -1), x], 1)
    for i in range(cfg.depth):
        p = f"transformer.layers.{i}."
        h = F.layer_norm(x, (cfg.dim,), w[p + "0.norm.weight"], w[p + "0.norm.bias"])
        q, k, v = (t.view(B, -1, cfg.heads, 64).transpose(1, 2)
                   for t in (h @ w[p + "0.fn.to_qkv.weight"].T).chunk(3, -1))
        attn = torch.softmax(q @ k.transpose(-1, -2) * 64 ** -0.5, -1) @ v
        x = (x + attn.transpose(1, 2).reshape(B, -1, cfg.heads * 64)
             @ w[p + "0.fn.to_out.0.weight"].T + w[p + "0.fn.to_out.0.bias"])
        h = F.layer_norm(x, (cfg.dim,), w[p + "1.norm.weight"], w[p + "1.norm.bias"])
        h = F.gelu(h @ w[p + "1.fn.net.0.weight"].T + w[p + "1.fn.net.0.bias"])
        x = x + h @ w[p + "1.fn.net.3.weight"].T + w[p + "1.fn.net.3.bias"]
    return x[:, 0]


def ref_head(head, f):
    h = {k.removeprefix("module.classifier."): v for k, v in head.items()}
    for lin, bn in (("0", "1"), ("4", "5")):
        f = f @ h[lin + ".weight"].T + h[lin + ".bias"]
        f = F.gelu(F.batch_norm(f, h[bn + ".running_mean"], h[bn + ".running_var"],
                                h[bn + ".weight"], h[bn + ".bias"]))
    return f


def test_release_checkpoint_scaling4_loads_every_key(tmp_path):
    ckpt = release_checkpoint(model.CONFIGS[4])
    path = tmp_path / "tamm_pointbert_ensemble.pt"
    torch.save(ckpt, path)
    m = load_pretrained(path, scaling=4)
    assert m.head_type == "dual" and not m.training
    assert torch.equal(m.encoder.blocks[11].attn.qkv.weight,
                       ckpt["state_dict"]["module.ppat.transformer.layers.11.0.fn.to_qkv.weight"])
    assert torch.equal(m.adapters.text[5].running_var,
                       ckpt["text_alignment_adapter"]["module.classifier.5.running_var"])
    assert math.isclose(m.scale().item(), 20.0, rel_tol=1e-6)


def test_release_parity_tiny():
    cfg = model.CONFIGS["tiny"]
    ckpt = release_checkpoint(cfg, seed=1)
    m = load_pretrained(ckpt, scaling="tiny")
    pts = unit_cloud(2, 1024, seed=5)
    with torch.no_grad():
        out = m(pts)
        f = ref_forward(ckpt["state_dict"], cfg, pts)
    assert torch.allclose(out["backbone"], f, atol=1e-5)
    assert torch.allclose(out["image"], ref_head(ckpt["image_alignment_adapter"], f), atol=1e-5)
    assert torch.allclose(out["text"], ref_head(ckpt["text_alignment_adapter"], f), atol=1e-5)


def test_openshape_checkpoint_is_one_branch():
    cfg = model.CONFIGS["tiny"]
    ckpt = release_checkpoint(cfg, head_type="openshape", seed=2)
    m = load_pretrained(ckpt, scaling="tiny")
    pts = unit_cloud(1, 512)
    with torch.no_grad():
        out = m(pts)
        f = ref_forward(ckpt["state_dict"], cfg, pts)
    assert m.head_type == "openshape" and torch.equal(out["image"], out["text"])
    assert torch.allclose(out["text"], f @ ckpt["state_dict"]["module.proj.weight"].T
                          + ckpt["state_dict"]["module.proj.bias"], atol=1e-5)


def test_key_errors_name_the_key():
    ckpt = release_checkpoint(model.CONFIGS["tiny"])
    del ckpt["state_dict"]["module.ppat.lift.2.bias"]
    with pytest.raises(BadInput, match="encoder.lift_norm.bias"):
        load_pretrained(ckpt, scaling="tiny")
    ckpt = release_checkpoint(model.CONFIGS["tiny"])
    ckpt["state_dict"]["module.ppat.extra.weight"] = torch.zeros(1)
    with pytest.raises(BadInput, match="ppat.extra.weight"):
        load_pretrained(ckpt, scaling="tiny")
    # a tiny (depth 2) file read as scaling 1
    with pytest.raises(BadInput, match="wrong model size"):
        load_pretrained(release_checkpoint(model.CONFIGS["tiny"]), scaling=1)
    with pytest.raises(BadInput, match="has shape"):  # same depth, other widths
        load_pretrained(release_checkpoint(model.CONFIGS[2]), scaling=1)


def test_our_checkpoint_rebuilds_from_config(tmp_path):
    m = model.TAMM(model.CONFIGS["tiny"]).eval()
    torch.save({"model": m.state_dict(), "config": m.config()}, tmp_path / "c.pt")
    m2 = load_pretrained(tmp_path / "c.pt")
    pts = unit_cloud(2, 512)
    with torch.no_grad():
        assert torch.equal(m(pts)["text"], m2(pts)["text"])


def test_corrupt_checkpoint_is_bad_input(tmp_path):
    path = tmp_path / "broken.pt"
    m = model.TAMM(model.CONFIGS["tiny"])
    torch.save({"model": m.state_dict(), "config": m.config()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BadInput, match="broken.pt"):
        load_pretrained(path)
    with pytest.raises(BadInput, match="not found"):
        load_pretrained(tmp_path / "missing.pt")


def test_adapter_head_keys_match_release_classifier():
    assert set(alignment_head(512, 1280, 0.5).state_dict()) == {
        f"{i}.{n}" for i in (0, 4) for n in ("weight", "bias")} | {
        f"{i}.{n}" for i in (1, 5)
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def test_load_cia_accepts_release_prefixes_and_freezes():
    src = ClipImageAdapter()
    state = {"module.adapter." + k: v for k, v in src.state_dict().items()}
    cia = load_cia(state)
    x = torch.randn(2, 1280)
    assert torch.equal(cia(x), src(x))
    assert not any(p.requires_grad for p in cia.parameters())
