"""TAMM's three adapters (paper sections 3.2 and 3.3) and its zero-shot score.

- CLIP Image Adapter (CIA, stage 1): CLIP features of *rendered* views sit away from the text
  space, so a small residual MLP moves them: CIA(x) = r * A(x) + (1 - r) * x with r = 0.2 and
  A = Linear(1280 -> 320, no bias) -> ReLU -> Linear(320 -> 1280, no bias) -> ReLU.
  It is trained alone in train_stage1.py and frozen in stage 2.
- Dual Adapters (stage 2): two heads on the 512-d point feature. The Image Alignment Adapter (IAA)
  is aligned with CIA(image views), the Text Alignment Adapter (TAA) with the text. Each head is
  Linear(512 -> 1024) -> BN -> GELU -> Dropout(p) -> Linear(1024 -> 1280) -> BN -> GELU ->
  Dropout(p) with p = 0.5 for the IAA and 0.2 for the TAA.
- Zero-shot score of class c: cos(TAA(f), T_c) + alpha * cos(IAA(f), T_c) with alpha = 0.5 (the
  paper's zero-shot inference).

Key names follow the release: a CIA state_dict is `fc.{0,2}.weight` (the release's `adapter.fc.*`
without the `adapter.` prefix); each head is `{0,1,4,5}.*` (the release's `classifier.{0,1,4,5}.*`).

    python -c "import adapters; print(sum(p.numel() for p in adapters.DualAdapters().parameters()))"
"""
import torch.nn as nn
import torch.nn.functional as F

# Each number once, with its source (TAMM models/clip_adapter.py,
# configs/Pre-Training/pointbert.yaml, trainers/tamm_trainer.py); the rest of the project imports
# them from here.
CLIP_DIM = 1280     # feature width of OpenCLIP ViT-bigG-14, the frozen teacher (OpenShape, TAMM)
CIA_RATIO = 0.2     # r, the CIA's residual ratio (paper section 3.2; clip_adapter.py)
CIA_REDUCTION = 4   # the CIA's bottleneck: CLIP_DIM / 4 = 320 wide (clip_adapter.py)
HEAD_HIDDEN = 1024  # hidden width of each head (pointbert.yaml, image/text_branch_hidden)
IAA_DROPOUT = 0.5   # dropout of the image head (pointbert.yaml, image_branch_dropout)
TAA_DROPOUT = 0.2   # dropout of the text head (pointbert.yaml, text_branch_dropout)
FUSION_ALPHA = 0.5  # weight of the image branch in the zero-shot score (tamm_trainer.py, alpha)


class ClipImageAdapter(nn.Module):
    """CIA(x) = ratio * A(x) + (1 - ratio) * x on (..., dim) CLIP image features."""

    def __init__(self, dim=CLIP_DIM, reduction=CIA_REDUCTION, ratio=CIA_RATIO):
        super().__init__()
        self.ratio = ratio
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.ratio * self.fc(x) + (1 - self.ratio) * x


def alignment_head(in_dim, out_dim, dropout, hidden=HEAD_HIDDEN):
    """One Dual-Adapter head. As an nn.Sequential its keys are 0/1/4/5, like the release's
    `classifier` (TAMM trainers/mlp.py)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
        nn.BatchNorm1d(out_dim),
        nn.GELU(),
        nn.Dropout(dropout),
    )


class DualAdapters(nn.Module):
    """(B, in_dim) point feature -> (image-aligned (B, out_dim), text-aligned (B, out_dim))."""

    def __init__(self, in_dim=512, out_dim=CLIP_DIM, image_dropout=IAA_DROPOUT,
                 text_dropout=TAA_DROPOUT):
        super().__init__()
        self.image = alignment_head(in_dim, out_dim, image_dropout)  # IAA
        self.text = alignment_head(in_dim, out_dim, text_dropout)    # TAA

    def forward(self, f):
        return self.image(f), self.text(f)


def zero_shot_scores(text_branch, image_branch, class_feat, alpha=FUSION_ALPHA):
    """TAMM's fused zero-shot logits: cos(TAA(f), T_c) + alpha * cos(IAA(f), T_c).

    text_branch, image_branch: (B, D) adapter outputs; class_feat: (C, D) CLIP text features of the
    class names. Returns the (B, C) cosine scores (text, image, fused)."""
    classes = F.normalize(class_feat.float(), dim=-1)                  # (C, D)
    text = F.normalize(text_branch.float(), dim=-1) @ classes.T       # (B, C)
    image = F.normalize(image_branch.float(), dim=-1) @ classes.T     # (B, C)
    return text, image, text + alpha * image
