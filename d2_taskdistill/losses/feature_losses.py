"""Feature-imitation losses shared by several distillation methods (FitNet, FGFI, TID, TBD):
squared student-teacher feature differences under masks, with their normalisation."""
import torch

from .normalizers import global_mean


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
