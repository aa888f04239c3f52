"""FitNet-style feature imitation on every location (a baseline)."""
import torch

from detectron2.config import configurable

from .adapters import FeatureAdapter, fpn_channels
from .normalizers import global_mean
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss


def masked_feature_loss(student_features, teacher_features, masks=None):
    """Mean over levels of sum(mask * ||F_T - F_S||^2 / C) / (N * H * W).

    Per-level normalisation keeps the large P3 map from dominating; dividing by
    the channel count C keeps loss weights comparable across FPN widths. N * H * W is
    averaged over processes (losses/normalizers.py).
    masks: L x (N, H, W), or None for all ones.
    """
    sums = []
    for level, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        sq = (fs - ft).pow(2).mean(dim=1)  # (N, H, W)
        if masks is not None:
            sq = sq * masks[level]
        sums.append(sq.sum())
    counts = global_mean([f[:, 0].numel() for f in student_features], device=student_features[0].device)
    return (torch.stack(sums) / counts).mean()


def masked_sum_loss(student_features, teacher_features, masks):
    """sum(M * ||F_T - F_S||^2 / C) over levels and positions, divided by max(sum(M), 1),
    the mask sum averaged over processes (losses/normalizers.py)."""
    total = 0.0
    mask_sum = 0.0
    for fs, ft, m in zip(student_features, teacher_features, masks):
        total = total + ((fs - ft).pow(2).mean(dim=1) * m).sum()
        mask_sum = mask_sum + m.sum()
    return total / global_mean(mask_sum, device=student_features[0].device)


@DISTILL_LOSS_REGISTRY.register()
class FITNET(DistillLoss):
    config_node = "FITNET"

    @configurable
    def __init__(self, *, student_shapes, teacher_shapes, weight=1.0):
        super().__init__()
        self.weight = weight
        self.adapter = FeatureAdapter(fpn_channels(student_shapes), fpn_channels(teacher_shapes))

    def forward(self, student, teacher):
        adapted = self.adapter(student.features)
        return {"loss_distill_fitnet": self.weight * masked_feature_loss(adapted, teacher.features)}
