"""Distillation of an R-CNN's box head on the student's own proposals (two-stage detectors only).

The proposals the student's ROI heads sampled for their loss are pooled from the teacher's
features and run through the teacher's box head, so that both heads score the same regions
(Chen et al., NeurIPS 2017, "Learning Efficient Object Detection Models with Knowledge
Distillation", share the student's proposals the same way).

- Classification: T^2 KL(softmax(z_T / T) || softmax(z_S / T)) over the K + 1 classes,
  averaged over the sampled proposals (Chen et al.: a class-weighted cross-entropy with the
  teacher's soft labels; ours: the plain Hinton form).
- Box: on the proposals matched to an object, 1 - GIoU between the boxes the student's and the
  teacher's class-specific regressions give for the object's class, both decoded at the
  proposal with the student's box coder (ours, as BCKD's localisation term; Chen et al. bound
  the student's L2 error to the ground truth by the teacher's instead).
- Mask (Mask R-CNNs, MASK_WEIGHT > 0; ours): on the foreground proposals the student's mask head
  trains on, BCE(z_S, sigmoid(z_T)) of both heads' mask logits for the object's class, averaged
  over the pixels and the proposals.
- Normalisers are averaged over processes (losses/normalizers.py).
"""
import torch
import torch.nn.functional as F

from detectron2.config import configurable

from .box_ops import giou_loss
from .normalizers import global_mean
from ..modeling.rcnn_outputs import distillable_mask_head
from ..settings import loss_setting
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss, check_positive

# What the loss reads of each R-CNN's ROI heads (detectron2's StandardROIHeads).
BOX_HEAD_ATTRIBUTES = ("box_in_features", "box_pooler", "box_head", "box_predictor", "label_and_sample_proposals")


def class_specific_deltas(deltas, classes, num_classes):
    """(M, 4) deltas of each proposal's class from the predictor's (M, 4 K) (or class-agnostic (M, 4))."""
    if deltas.shape[1] == 4:
        return deltas
    index = classes.clamp(max=num_classes - 1)  # background proposals: any class, weighted 0 below
    return deltas.view(deltas.shape[0], num_classes, 4).gather(1, index.view(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)


@DISTILL_LOSS_REGISTRY.register()
class ROI_KD(DistillLoss):
    config_node = "ROI_KD"
    two_stage_only = True

    @configurable
    def __init__(self, *, student_shapes, teacher_shapes, cls_weight=1.0, temperature=1.0, box_weight=1.0,
                 mask_weight=0.0):
        super().__init__()
        check_positive("ROI_KD", temperature=temperature)
        self.cls_weight = cls_weight
        self.temperature = temperature
        self.box_weight = box_weight
        self.mask_weight = mask_weight

    def check_detectors(self, student, teacher):
        for role, detector in (("student", student), ("teacher", teacher)):
            missing = [a for a in BOX_HEAD_ATTRIBUTES if not hasattr(detector.roi_heads, a)]
            if missing:
                raise TypeError(
                    f"ROI_KD: the {role}'s ROI heads ({type(detector.roi_heads).__name__}) lack {missing}: it "
                    "distils detectron2's StandardROIHeads (one box head, as Faster and Mask R-CNN have).")
            if self.mask_weight > 0 and distillable_mask_head(detector) is None:
                raise ValueError(
                    f"{loss_setting('ROI_KD', 'mask_weight', self.mask_weight)} distils mask logits, but the {role} "
                    "has no mask head of detectron2's kind (MaskRCNNConvUpsampleHead): use Mask R-CNNs for both "
                    "(MODEL.MASK_ON), or set it to 0.")

    def forward(self, student, teacher):
        proposals = student.roi_samples
        student_scores, student_deltas = student.roi_predictions
        with torch.no_grad():
            teacher_scores, teacher_deltas = teacher.box_predictions_on(proposals)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student_scores / t, dim=1), F.log_softmax(teacher_scores.float() / t, dim=1),
                      log_target=True, reduction="sum")
        loss_cls = kl * t * t / global_mean(student_scores.shape[0], device=kl.device)

        num_classes = student_scores.shape[1] - 1
        classes = torch.cat([p.gt_classes for p in proposals])
        foreground = (classes < num_classes).to(student_scores.dtype)
        boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
        decode = student.rcnn.roi_heads.box_predictor.box2box_transform.apply_deltas
        student_boxes = decode(class_specific_deltas(student_deltas, classes, num_classes), boxes)
        teacher_boxes = decode(class_specific_deltas(teacher_deltas.float(), classes, num_classes), boxes)
        loss_box = (giou_loss(student_boxes, teacher_boxes) * foreground).sum() / global_mean(
            foreground.sum(), device=foreground.device)
        losses = {"loss_distill_roi_cls": self.cls_weight * loss_cls,
                  "loss_distill_roi_box": self.box_weight * loss_box}
        if self.mask_weight > 0:
            losses["loss_distill_roi_mask"] = self.mask_weight * self.mask_loss(student, teacher)
        return losses

    def mask_loss(self, student, teacher):
        proposals = student.mask_samples
        with torch.no_grad():
            teacher_logits = teacher.mask_logits_on(proposals).float()
        classes = torch.cat([p.gt_classes for p in proposals])
        bce = F.binary_cross_entropy_with_logits(class_channel(student.mask_logits, classes),
                                                 class_channel(teacher_logits, classes).sigmoid(), reduction="none")
        return bce.mean(dim=(1, 2)).sum() / global_mean(len(classes), device=bce.device)


def class_channel(mask_logits, classes):
    """(M, H, W): each proposal's mask logits for its class (a class-agnostic head has one)."""
    if mask_logits.shape[1] == 1:
        return mask_logits[:, 0]
    index = classes.view(-1, 1, 1, 1).expand(-1, 1, *mask_logits.shape[2:])
    return mask_logits.gather(1, index).squeeze(1)
