"""TAMM's three adapters (paper section 3.2 and 3.3) and its zero-shot score.

- CLIP Image Adapter (CIA, stage 1): CLIP features of *rendered* views sit away from the text space, so a small
  residual MLP moves them: CIA(x) = r * A(x) + (1 - r) * x, A = Linear(1280->320, no bias) -> ReLU ->
  Linear(320->1280, no bias) -> ReLU, r = 0.2. Trained alone in train_stage1.py, frozen in stage 2.
- Dual Adapters (stage 2): two heads on the 512-d point feature. The Image Alignment Adapter (IAA) is aligned
  with CIA(image views), the Text Alignment Adapter (TAA) with text. Each head is
  Linear(512->1024) -> BN -> GELU -> Dropout(p) -> Linear(1024->1280) -> BN -> GELU -> Dropout(p),
  p = 0.5 (IAA) / 0.2 (TAA).
- Zero-shot score: cos(TAA(f), T_c) + alpha * cos(IAA(f), T_c), alpha = 0.5.

Key names follow the release: a CIA state_dict is `fc.{0,2}.weight` (the release's `adapter.fc.*` without
the `adapter.` prefix), each head is `{0,1,4,5}.*` (the release's `classifier.{0,1,4,5}.*`).

    python -c "import adapters; print(sum(p.numel() for p in adapters.ClipImageAdapter().parameters()))"
"""
import torch.nn as nn
import torch.nn.functional as F


class ClipImageAdapter(nn.Module):
    """CIA(x) = ratio * A(x) + (1 - ratio) * x on (..., dim) CLIP image features."""

    def __init__(self, dim=1280, reduction=4, ratio=0.2):  # reduction 4 and ratio 0.2: TAMM paper / release
        super().__init__()
        self.ratio = ratio
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.ratio * self.fc(x) + (1 - self.ratio) * x


def alignment_head(in_dim, out_dim, dropout, hidden=1024):
    """One Dual-Adapter head; as an nn.Sequential its keys are 0/1/4/5 like the release's `classifier`."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim), nn.BatchNorm1d(out_dim), nn.GELU(), nn.Dropout(dropout))


class DualAdapters(nn.Module):
    """(B, in_dim) point feature -> (image-aligned (B, out_dim), text-aligned (B, out_dim))."""

    def __init__(self, in_dim=512, out_dim=1280, image_dropout=0.5, text_dropout=0.2):  # dropouts: release
        super().__init__()
        self.image = alignment_head(in_dim, out_dim, image_dropout)
        self.text = alignment_head(in_dim, out_dim, text_dropout)

    def forward(self, f):
        return self.image(f), self.text(f)


def zero_shot_scores(text_branch, image_branch, class_feat, alpha=0.5):
    """TAMM's fused zero-shot logits: cos(TAA(f), T_c) + alpha * cos(IAA(f), T_c).

    text_branch, image_branch: (B, D) adapter outputs; class_feat: (C, D) CLIP text features of class names.
    Returns (text (B, C), image (B, C), fused (B, C)) cosine scores."""
    t = F.normalize(class_feat.float(), dim=-1)
    text = F.normalize(text_branch.float(), dim=-1) @ t.T
    image = F.normalize(image_branch.float(), dim=-1) @ t.T
    return text, image, text + alpha * image

