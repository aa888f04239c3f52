"""TBD: Task-Balanced Distillation (Tang et al., 2022; Pattern Recognition 2023).

RECONSTRUCTION FROM THE ABSTRACT. Only the paper's abstract and no code are
public; what is fixed there is a Harmony Score (HS) of classification and
localization quality, the teacher's HS as prior knowledge that makes the
student's predictions harmonious (HD), and task-decoupled feature distillation
(TFD) whose regions come from the teacher's outputs, with a flexible balance
between classification and regression. Every concrete formula below is ours:

- HS = 2 s u / (s + u), the harmonic mean of the classification score s (for the
  matched GT class) and the IoU u of the predicted box with that GT: high only
  when both are high, 0 when either is 0, equal to s when s = u.
- HD, on the student's positive locations (its own assignment), with HS_T the
  teacher's HS there for the assigned GT: a quality-focal term
  HS_T * BCE(z_S, HS_T) * |HS_T - p_S|^2 on the assigned class, plus
  HS_T * (1 - GIoU(student box, target box)), the target being the teacher's box
  (BOX_TARGET "teacher") or the GT box ("gt"); both divided by the positives.
- TFD: a classification mask (the teacher's max class score per position) and a
  regression mask (the IoU of the teacher's predicted box with its best GT), each
  with its own adapter and normalised by its mask sum, balanced per batch by a
  rule ("equal": 1/2 each) or learned (uncertainty weighting, Kendall et al. 2018:
  exp(-s_c) L_c + exp(-s_r) L_r + s_c + s_r with learnable s).

The defaults (both components, teacher box, equal balance) were compared with the
alternatives on the digits tune split: benchmarks/tbd_choices.md.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.utils.events import get_event_storage

from .adapters import FeatureAdapter, fpn_channels
from .box_ops import aligned_iou, giou_loss
from .feature_losses import masked_sum_loss
from .normalizers import global_mean
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss, check_choices


def harmony_score(s, u, eps=1e-12):
    """HS = 2su / (s + u), elementwise; 0 where s + u = 0."""
    return 2 * s * u / torch.clamp(s + u, min=eps)


def assigned_quality(outputs, gt_labels, gt_boxes):
    """For every location, (s, u): the score for the assigned class and the IoU of the
    predicted box with the assigned GT box. gt_labels (N, R), gt_boxes (N, R, 4)."""
    classes = gt_labels.clamp(max=outputs.num_classes - 1).clamp(min=0)
    s = outputs.scores_flat.gather(2, classes[..., None])[..., 0]
    boxes = outputs.pred_boxes.detach()
    u = aligned_iou(boxes, gt_boxes)
    return s, u


def dense_harmony_score(outputs):
    """HS of a DenseOutputs at every location against its best-IoU GT: (hs, s, u), each (N, R).

    s is the score of the matched GT's class, u the IoU_max of the predicted box.
    Locations of images without GT get 0.
    """
    matched = outputs.matched_gt
    classes = torch.zeros_like(matched)
    for i, gt in enumerate(outputs.gt_instances):  # loop over images
        if len(gt):
            classes[i] = gt.gt_classes[matched[i].clamp(min=0)]
    s = outputs.scores_flat.detach().gather(2, classes[..., None])[..., 0] * (matched >= 0)
    u = outputs.iou_max
    return harmony_score(s, u), s, u


def harmonious_share(hs, positive_mask, threshold=0.5):
    """Share of the positive locations whose HS reaches ``threshold`` (nan without positives)."""
    # One host read (0 / 0 is nan); called at TBD.LOG_PERIOD only.
    return (((hs >= threshold) & positive_mask).sum() / positive_mask.sum()).item()


@DISTILL_LOSS_REGISTRY.register()
class TBD(DistillLoss):
    """Harmonious distillation (HD) + task-decoupled feature distillation (TFD); a
    reconstruction from the paper's abstract (see the module docstring)."""

    needs_same_layout = True
    config_node = "TBD"

    @configurable
    def __init__(
        self, *, student_shapes, teacher_shapes, components="both", hd_cls_weight=1.0, hd_box_weight=1.0,
        qfl_beta=2.0, box_target="teacher", tfd_weight=1.0, balance="equal", harmony_thresh=0.5,
        log_period=20,
    ):
        super().__init__()
        check_choices(
            "TBD",
            components=(components, ("both", "hd", "tfd")),
            balance=(balance, ("equal", "learned")),
            box_target=(box_target, ("teacher", "gt")),
        )
        self.components = components
        self.hd_cls_weight = hd_cls_weight
        self.hd_box_weight = hd_box_weight
        self.qfl_beta = qfl_beta
        self.box_target = box_target
        self.tfd_weight = tfd_weight
        self.balance = balance
        self.harmony_threshold = harmony_thresh
        self.log_period = log_period
        if self.components != "hd":
            s_ch, t_ch = fpn_channels(student_shapes), fpn_channels(teacher_shapes)
            self.cls_adapter = FeatureAdapter(s_ch, t_ch)
            self.reg_adapter = FeatureAdapter(s_ch, t_ch)
            if self.balance == "learned":
                self.log_vars = nn.Parameter(torch.zeros(2))

    # --- HD -------------------------------------------------------------------------------
    def harmonious_distillation(self, student, teacher):
        labels, gt_boxes = student.assigned_labels, student.assigned_boxes
        positive = student.positive_mask
        normalizer = global_mean(positive.sum())
        with torch.no_grad():
            s_t, u_t = assigned_quality(teacher, labels, gt_boxes)
            hs_t = harmony_score(s_t, u_t) * positive
        classes = labels.clamp(min=0, max=student.num_classes - 1)[..., None]
        z = student.logits_flat.gather(2, classes)[..., 0]
        qfl = F.binary_cross_entropy_with_logits(z, hs_t, reduction="none")
        qfl = qfl * (hs_t - z.sigmoid()).abs().pow(self.qfl_beta)
        loss_cls = (hs_t * qfl * positive).sum() / normalizer
        target = teacher.pred_boxes.detach() if self.box_target == "teacher" else gt_boxes
        giou = giou_loss(student.pred_boxes, target)
        loss_box = (hs_t * giou * positive).sum() / normalizer
        self.log_harmony(student, teacher, positive)
        return {
            "loss_distill_tbd_hd_cls": self.hd_cls_weight * loss_cls,
            "loss_distill_tbd_hd_box": self.hd_box_weight * loss_box,
        }

    @torch.no_grad()
    def log_harmony(self, student, teacher, positive):
        """Diagnostic: share of harmonious predictions of each model on the student's positives."""
        try:
            storage = get_event_storage()
        except AssertionError:
            return
        if (storage.iter + 1) % self.log_period:
            return
        for name, outputs in (("teacher", teacher), ("student", student)):
            share = harmonious_share(dense_harmony_score(outputs)[0], positive, self.harmony_threshold)
            storage.put_scalar(f"tbd/harmonious_share_{name}", share)

    # --- TFD ------------------------------------------------------------------------------
    @torch.no_grad()
    def tfd_masks(self, teacher):
        """(classification mask, regression mask), each L x (N, H, W), from the teacher."""
        valid = teacher.valid_mask
        cls_mask = teacher.scores_flat.amax(dim=2) * valid
        reg_mask = teacher.iou_max * valid
        return teacher.to_maps(cls_mask), teacher.to_maps(reg_mask)

    def balance_terms(self, loss_cls, loss_reg):
        if self.balance == "equal":
            return 0.5 * loss_cls, 0.5 * loss_reg
        s_c, s_r = self.log_vars[0], self.log_vars[1]
        return torch.exp(-s_c) * loss_cls + s_c, torch.exp(-s_r) * loss_reg + s_r

    def task_decoupled_features(self, student, teacher):
        cls_mask, reg_mask = self.tfd_masks(teacher)
        loss_cls = masked_sum_loss(self.cls_adapter(student.features), teacher.features, cls_mask)
        loss_reg = masked_sum_loss(self.reg_adapter(student.features), teacher.features, reg_mask)
        loss_cls, loss_reg = self.balance_terms(loss_cls, loss_reg)
        return {
            "loss_distill_tbd_tfd_cls": self.tfd_weight * loss_cls,
            "loss_distill_tbd_tfd_reg": self.tfd_weight * loss_reg,
        }

    def forward(self, student, teacher):
        losses = {}
        if self.components in ("both", "hd"):
            losses.update(self.harmonious_distillation(student, teacher))
        if self.components in ("both", "tfd"):
            losses.update(self.task_decoupled_features(student, teacher))
        return losses
