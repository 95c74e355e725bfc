"""CLIP Image Adapter and Dual Adapters: residual behaviour, sizes, key layout, the zero-shot
score."""
import torch
import torch.nn.functional as F

from adapters import ClipImageAdapter, DualAdapters, zero_shot_scores


def test_cia_ratio_zero_is_identity_and_one_is_the_mlp_alone():
    torch.manual_seed(0)
    x = torch.randn(4, 1280)
    cia = ClipImageAdapter(ratio=0.0)
    assert torch.equal(cia(x), x)
    cia.ratio = 1.0
    assert torch.allclose(cia(x), cia.fc(x))
    cia.ratio = 0.2
    assert torch.allclose(cia(x), 0.2 * cia.fc(x) + 0.8 * x, atol=1e-6)


def test_cia_is_bias_free_relu_after_both_layers():
    cia = ClipImageAdapter()
    assert sum(p.numel() for p in cia.parameters()) == 819_200
    assert set(cia.state_dict()) == {"fc.0.weight", "fc.2.weight"}
    assert (cia.fc(torch.randn(8, 1280)) >= 0).all()  # final ReLU


def test_dual_adapters_sizes_dropouts_and_outputs():
    heads = DualAdapters(512, 1280)
    assert sum(p.numel() for p in heads.image.parameters()) == 1_841_920
    assert sum(p.numel() for p in heads.text.parameters()) == 1_841_920
    assert heads.image[3].p == 0.5 and heads.image[7].p == 0.5
    assert heads.text[3].p == 0.2 and heads.text[7].p == 0.2
    image, text = heads.eval()(torch.randn(3, 512))
    assert image.shape == text.shape == (3, 1280)
    assert not torch.allclose(image, text)


def test_zero_shot_score_is_text_plus_half_image_cosine():
    torch.manual_seed(1)
    t, i, c = torch.randn(5, 16), torch.randn(5, 16), torch.randn(3, 16)
    text, image, fused = zero_shot_scores(t, i, c)

    def cos(a):
        return F.cosine_similarity(a[:, None], c[None], dim=-1)

    assert torch.allclose(text, cos(t), atol=1e-6) and torch.allclose(image, cos(i), atol=1e-6)
    assert torch.allclose(fused, cos(t) + 0.5 * cos(i), atol=1e-6)
    assert torch.allclose(zero_shot_scores(t, i, c, alpha=0.0)[2], text)
