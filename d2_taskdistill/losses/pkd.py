"""PKD: feature imitation with the Pearson correlation coefficient (Cao et al., NeurIPS 2022;
a baseline).

Each feature map is standardised channel by channel, z = (F - mean) / (std + 1e-6), and
    loss = WEIGHT * sum over distilled levels of mean_{n,c,h,w} (z_S - z_T)^2 / 2,
which for each standardised vector equals 1 - r, r their Pearson correlation (up to the
unbiased-std factor (n-1)/n). The mean runs over all N * C * H * W entries of a level.

From the public code (github.com/open-mmlab/mmrazor, mmrazor/models/losses/pkd_loss.py and
configs/distill/mmdet/pkd/*.py): the statistics of a channel are taken over the whole batch
and all positions (N, H, W) with the unbiased std plus 1e-6; MSE / 2 summed over levels;
WEIGHT 10 (pkd_fpn_retina_x101_retina_r50_2x_coco.py, RetinaNet and FCOS teachers of a
RetinaNet student; its Faster R-CNN and Swin-teacher configs use 6); the first four FPN
outputs only (fpn0..fpn3: P3-P6 of RetinaNet), as every one of those configs.

Ours (DISTILL.PKD keys in config.py):
- NORMALIZE_OVER "hw" takes each sample's statistics apart (the paper's description leaves
  the axes open; the public code pools the batch: "batch_hw");
- the mean over N * C * H * W takes its count averaged over processes (losses/normalizers.py);
  with NORMALIZE_OVER "batch_hw" the statistics themselves are each process's own batch's,
  as in the public code, so only "hw" gives the same loss however the batch is split;
- a 1x1 adapter on the student when the FPN widths differ (the public configs use equal
  widths); none otherwise;
- the unbiased variance is computed here, divided by max(n - 1, 1) so that a single value
  (a 1x1 level standardised per sample) gives 0 rather than torch.std's 0/0, and clamped at
  1e-12 before its square root so that the root's gradient stays finite at 0. A constant
  channel standardises to exactly 0, as in the public code (std 0 + 1e-6): it adds
  mean(z_other^2) / 2 and no NaN; its own gradient is large (~1 / 2e-6), as there (1 / 1e-6).
"""
from detectron2.config import configurable

from .adapters import width_adapter
from .normalizers import global_mean
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss, check_choices, check_num_levels

STD_EPS = 1e-6
NORMALIZE_DIMS = {"batch_hw": (0, 2, 3), "hw": (2, 3)}


def standardize(features, dims, eps=STD_EPS):
    """(F - mean) / (std + eps) with mean and unbiased std over ``dims`` of (N, C, H, W)."""
    count = 1
    for d in dims:
        count *= features.shape[d]
    centred = features - features.mean(dim=dims, keepdim=True)
    # max(count - 1, 1): a single value (a 1x1 map, one image) has variance 0, not 0/0.
    variance = centred.pow(2).sum(dim=dims, keepdim=True) / max(count - 1, 1)
    std = variance.clamp(min=eps * eps).sqrt()  # the clamp keeps sqrt's gradient finite at 0
    return centred / (std + eps)


def pearson_feature_loss(student, teacher, dims, count=None):
    """sum (z_S - z_T)^2 / 2 of one level's standardised features over ``count`` (default
    their number: the mean)."""
    squared = (standardize(student, dims) - standardize(teacher, dims)).pow(2).sum()
    return squared / (2 * (student.numel() if count is None else count))


@DISTILL_LOSS_REGISTRY.register()
class PKD(DistillLoss):
    config_node = "PKD"

    @configurable
    def __init__(self, *, student_shapes, teacher_shapes, weight=10.0, normalize_over="batch_hw", num_levels=4):
        super().__init__()
        check_choices("PKD", normalize_over=(normalize_over, tuple(NORMALIZE_DIMS)))
        self.weight = weight
        self.dims = NORMALIZE_DIMS[normalize_over]
        self.num_levels = check_num_levels("PKD", num_levels, len(student_shapes))
        self.adapter = width_adapter(student_shapes, teacher_shapes)

    def forward(self, student, teacher):
        levels = slice(0, self.num_levels)
        total = 0.0
        for fs, ft in zip(self.adapter(student.features[levels]), teacher.features[levels]):
            total = total + pearson_feature_loss(fs, ft, self.dims, global_mean(ft.numel(), device=ft.device))
        return {"loss_distill_pkd": self.weight * total}
