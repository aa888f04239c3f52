"""BCKD: binary classification and IoU-based localization distillation
(Yang et al., ICCV 2023), brought from the authors' GFL code to detectron2's
RetinaNet and FCOS.

- Classification: at every valid location and class,
  BCE_with_logits(z_S, p_T) * |p_T - p_S|^beta, gradient also through the factor.
- Localization: 1 - GIoU(student box, teacher box) at every valid location, both
  decoded at the same anchors / points by the student's own box coder, weighted by
  max_k |p_T - p_S| (detached).
- Both are summed and divided by the number of the student's positives averaged over
  workers (as the authors do); ours: the floor at 1 applies to the total over workers, not
  to the average, so that the loss does not depend on how the batch is split
  (losses/normalizers.py).

On a two-stage detector, BCKD distils the RPN (ours: the paper distils one-stage heads): the
objectness is a one-class score, the box term compares the proposals both RPNs decode at the
same anchors, and the positives are the anchors the student's RPN matches to an object (before
it samples 256 per image for its own loss).

Our choices: a location is valid when its anchor centre lies in the image (not in
batch padding), anchors that stick out of the image included; FCOS's centerness
is distilled with the same binary term (FCOS ranks detections by
sqrt(score * centerness), so the teacher's ranking depends on both), weighted by
CENTERNESS_WEIGHT.
"""
import torch.nn.functional as F

from detectron2.config import configurable

from .box_ops import giou_loss
from .normalizers import global_mean
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss


def binary_distillation(student_logits, teacher_probs, beta=1.0):
    """Elementwise BCE_with_logits(z_S, p_T) * |p_T - sigmoid(z_S)|^beta."""
    bce = F.binary_cross_entropy_with_logits(student_logits, teacher_probs, reduction="none")
    return bce * (teacher_probs - student_logits.sigmoid()).abs().pow(beta)


@DISTILL_LOSS_REGISTRY.register()
class BCKD(DistillLoss):
    needs_same_layout = True
    distils_rpn = True  # the RPN's objectness is a binary classification
    config_node = "BCKD"

    @configurable
    def __init__(self, *, student_shapes, teacher_shapes, cls_weight=1.0, loc_weight=4.0, beta=1.0,
                 centerness_weight=1.0):
        super().__init__()
        self.cls_weight = cls_weight
        self.loc_weight = loc_weight
        self.centerness_weight = centerness_weight
        self.beta = beta

    def weights(self, student, teacher):
        """Per-location localization weight (N, R): max_k |p_T - p_S|, 0 where invalid."""
        gap = (teacher.scores_flat.detach() - student.scores_flat.detach()).abs().amax(dim=2)
        return gap * student.valid_mask

    def forward(self, student, teacher):
        valid = student.valid_mask.to(student.logits_flat.dtype)  # (N, R)
        normalizer = global_mean(student.positive_mask.sum())

        cls = binary_distillation(student.logits_flat, teacher.scores_flat.detach(), self.beta)
        loss_cls = (cls.sum(dim=2) * valid).sum() / normalizer

        weights = self.weights(student, teacher)
        giou = giou_loss(student.pred_boxes, teacher.pred_boxes.detach())
        loss_loc = (giou * weights).sum() / normalizer

        losses = {
            "loss_distill_bckd_cls": self.cls_weight * loss_cls,
            "loss_distill_bckd_loc": self.loc_weight * loss_loc,
        }
        if student.centerness is not None and self.centerness_weight > 0:
            ctr = binary_distillation(student.centerness_flat, teacher.centerness_flat.detach().sigmoid(), self.beta)
            losses["loss_distill_bckd_ctr"] = self.centerness_weight * (ctr * valid).sum() / normalizer
        return losses
