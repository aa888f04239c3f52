"""FitNet-style feature imitation on every location (a baseline)."""
import torch
import torch.nn as nn

from .adapters import FeatureAdapter, fpn_channels
from .registry import DISTILL_LOSS_REGISTRY


def masked_feature_loss(student_features, teacher_features, masks=None):
    """Mean over levels of sum(mask * ||F_T - F_S||^2 / C) / (N * H * W).

    Per-level normalisation keeps the large P3 map from dominating; dividing by
    the channel count C keeps loss weights comparable across FPN widths.
    masks: L x (N, H, W), or None for all ones.
    """
    total = 0.0
    for level, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        sq = (fs - ft).pow(2).mean(dim=1)  # (N, H, W)
        if masks is not None:
            sq = sq * masks[level]
        total = total + sq.sum() / sq.numel()
    return total / len(student_features)


def masked_sum_loss(student_features, teacher_features, masks):
    """sum(M * ||F_T - F_S||^2 / C) over levels and positions, divided by max(sum(M), 1)."""
    total = 0.0
    mask_sum = 0.0
    for fs, ft, m in zip(student_features, teacher_features, masks):
        total = total + ((fs - ft).pow(2).mean(dim=1) * m).sum()
        mask_sum = mask_sum + m.sum()
    return total / torch.clamp(torch.as_tensor(mask_sum), min=1.0)


@DISTILL_LOSS_REGISTRY.register()
class FITNET(nn.Module):
    needs_same_layout = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__()
        self.weight = cfg.DISTILL.FITNET.WEIGHT
        self.adapter = FeatureAdapter(fpn_channels(student_shapes), fpn_channels(teacher_shapes))

    def forward(self, student, teacher):
        adapted = self.adapter(student.features)
        return {"loss_distill_fitnet": self.weight * masked_feature_loss(adapted, teacher.features)}
