"""FGFI-style feature imitation inside GT-derived regions (Wang et al., CVPR 2019; a baseline).

A position is imitated when one of its anchors has IoU with some GT box above
THRESH_RATIO times the best IoU any anchor reaches with that box. For FCOS the
"anchors" are detectron2's stride-sized point boxes: their IoU peaks at the level whose
stride matches a box, not at the level FCOS assigns it to, so the region misses most of
FCOS's positives (measured by tools/fgfi_regions.py: 9 % on digits).
"""
import logging

import torch

from detectron2.config import configurable
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.structures import pairwise_iou

from .adapters import FeatureAdapter, fpn_channels
from .feature_losses import masked_sum_loss
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss

logger = logging.getLogger(__name__)


def imitation_mask(outputs, thresh_ratio):
    """(N, R) bool over anchors: the FGFI imitation region of each image."""
    anchors = outputs.anchors_flat
    masks = []
    for gt in outputs.gt_instances:  # loop over images
        if len(gt) == 0:
            masks.append(torch.zeros(len(anchors), dtype=torch.bool, device=anchors.device))
            continue
        iou = pairwise_iou(anchors, gt.gt_boxes)  # (R, G)
        best = iou.amax(dim=0, keepdim=True)
        masks.append(((iou > thresh_ratio * best) & (best > 0)).any(dim=1))
    return torch.stack(masks)


@DISTILL_LOSS_REGISTRY.register()
class FGFI(DistillLoss):
    config_node = "FGFI"

    @configurable
    def __init__(self, *, student_shapes, teacher_shapes, weight=1.0, thresh_ratio=0.5):
        super().__init__()
        self.weight = weight
        self.thresh_ratio = thresh_ratio
        self.adapter = FeatureAdapter(fpn_channels(student_shapes), fpn_channels(teacher_shapes))

    def check_detectors(self, student, teacher):
        # The region depends on the student's kind of anchors, known once it is built.
        if isinstance(student, FCOS):
            logger.warning(
                "FGFI on FCOS: its anchor-IoU region misses most of FCOS's positive locations "
                "(tools/fgfi_regions.py); it is a baseline for anchor-based students. TID, TBD "
                "and BCKD use FCOS's own assignment.")

    def forward(self, student, teacher):
        with torch.no_grad():
            # The student's anchors: the feature maps share strides, so positions align.
            mask = imitation_mask(student, self.thresh_ratio) & student.valid_mask
            level_masks = student.to_maps(mask.float())
        loss = masked_sum_loss(self.adapter(student.features), teacher.features, level_masks)
        return {"loss_distill_fgfi": self.weight * loss}
