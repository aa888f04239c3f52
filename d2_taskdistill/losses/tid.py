"""TID: Task Integration Distillation (Su, Jian, Yu 2024), for RetinaNet and FCOS.

Three modules, computed without gradient, give a per-location mask M for a
feature-imitation loss on every FPN level:

1. dual-task importance (teacher and student separately): Score = Score_c * Score_r;
2. learning dynamics: key area (top of the teacher's Score) and weak area (top of
   Score_T - Score_S after spatial NMS), Value_output = Score_key * Score_weak;
3. selective feature decoupling: V = Value_output * V_information, three tiers.

Choices the paper leaves open (each a DISTILL.TID key, see config.py):
- Score_key is Score_T on the key area and KEY_OUTSIDE elsewhere (default 0.4,
  the lowest Score), so that being in the key area never lowers a value;
- key and weak areas are the top KEY_FRACTION / WEAK_FRACTION of an image's
  positions over all levels; ties at the boundary are all included;
- spatial NMS keeps local maxima in an NMS_WINDOW x NMS_WINDOW window;
- V_information falls linearly from 1 at a GT box's edge to 0 at BAND_RATIO *
  sqrt(box area) from it (max over the image's boxes);
- the loss is normalised by the mask sum (NORMALIZER "mask_sum") or per level
  by N * H * W ("per_level"); squared errors are averaged over channels.
Per-anchor scores are reduced to positions with max over anchors.
"""
import torch

from detectron2.config import configurable

from .adapters import FeatureAdapter, fpn_channels
from .feature_losses import masked_feature_loss, masked_sum_loss
from .maps import (
    flatten_levels,
    local_maxima,
    padded_gt_boxes,
    point_box_distance,
    position_centers,
    top_fraction_mask,
    unflatten_levels,
)
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss, check_choices


def regression_score(iou_max, thr_neg, thr_pos, values=(2.0, 1.5, 0.4)):
    """Score_r: values[0] if IoU_max >= thr_pos, values[1] between, values[2] if <= thr_neg."""
    high, mid, low = values
    score = torch.full_like(iou_max, mid)
    score = torch.where(iou_max >= thr_pos, torch.full_like(iou_max, high), score)
    return torch.where(iou_max <= thr_neg, torch.full_like(iou_max, low), score)


def gt_class_score(cls_scores, gt_class_mask):
    """(N, R): per location, the max sigmoid score over the classes in the image's GT
    (-inf where an image has no GT)."""
    masked = cls_scores.masked_fill(~gt_class_mask[:, None, :], float("-inf"))
    return masked.amax(dim=2)


def classification_score(cls_scores, gt_class_mask, top_fraction, values=(1.5, 1.0), valid=None):
    """Score_c: values[0] on the top ``top_fraction`` of an image's locations by GT-class
    score, values[1] elsewhere."""
    score = gt_class_score(cls_scores, gt_class_mask)
    candidates = torch.isfinite(score)
    if valid is not None:
        candidates &= valid
    top = top_fraction_mask(score, top_fraction, candidates)  # of all the image's locations
    return torch.where(top, torch.full_like(score, values[0]), torch.full_like(score, values[1]))


def tier_mask(value, bounds=(1.0, 0.01), factors=(1.0, 0.7, 0.05)):
    """M = factors[0] V where V >= bounds[0]; factors[1] V where bounds[1] <= V < bounds[0];
    factors[2] V below bounds[1]."""
    high, low = bounds
    factor = torch.full_like(value, factors[1])
    factor = torch.where(value >= high, torch.full_like(value, factors[0]), factor)
    factor = torch.where(value < low, torch.full_like(value, factors[2]), factor)
    return factor * value


def information_value(centers, gt_boxes, gt_valid, band_ratio):
    """V_information (N, P): 1 inside a GT box, falling linearly to 0 at distance
    band_ratio * sqrt(box area) outside it; max over the image's boxes."""
    dist = point_box_distance(centers, gt_boxes)  # (N, P, G)
    wh = (gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=0)
    band = band_ratio * torch.sqrt(wh[..., 0] * wh[..., 1])  # (N, G)
    value = 1 - dist / band[:, None, :].clamp(min=1e-6)
    value = torch.where(dist <= 0, torch.ones_like(value), value.clamp(min=0))
    value = value * gt_valid[:, None, :]
    return value.amax(dim=2) if value.shape[2] else value.new_zeros(value.shape[:2])


class TIDMasks:
    """The TID quantities of one batch, kept for losses and visualisation."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


@DISTILL_LOSS_REGISTRY.register()
class TID(DistillLoss):
    """Task Integration Distillation; see the module docstring for the open choices."""

    needs_same_layout = True
    config_node = "TID"

    @configurable
    def __init__(
        self, *, student_shapes, teacher_shapes, weight=1.0, reg_scores=(2.0, 1.5, 0.4),
        cls_scores=(1.5, 1.0), cls_top_fraction=0.025, importance="both", reg_score_mode="threshold",
        areas="both", key_fraction=0.05, key_outside=0.4, weak_fraction=0.05, weak_score=1.5,
        nms_window=3, band_ratio=0.5, tier_bounds=(1.0, 0.01), tier_factors=(1.0, 0.7, 0.05),
        normalizer="mask_sum",
    ):
        super().__init__()
        self.weight = weight
        self.importance = importance
        self.reg_score_mode = reg_score_mode
        self.reg_values = tuple(reg_scores)
        self.cls_values = tuple(cls_scores)
        self.cls_top_fraction = cls_top_fraction
        self.areas = areas
        self.key_fraction = key_fraction
        self.key_outside = key_outside
        self.weak_fraction = weak_fraction
        self.weak_score = weak_score
        self.nms_window = nms_window
        self.band_ratio = band_ratio
        self.tier_bounds = tuple(tier_bounds)
        self.tier_factors = tuple(tier_factors)
        self.normalizer = normalizer
        check_choices(
            "TID",
            importance=(importance, ("both", "cls", "reg")),
            reg_score_mode=(reg_score_mode, ("threshold", "iou")),
            areas=(areas, ("both", "key", "weak")),
            normalizer=(normalizer, ("mask_sum", "per_level")),
        )
        self.adapter = FeatureAdapter(fpn_channels(student_shapes), fpn_channels(teacher_shapes))

    # --- module 1 -------------------------------------------------------------------------
    def importance_score(self, outputs):
        """Score per position, (N, P): Score_c * Score_r per anchor, max over anchors."""
        valid = outputs.valid_mask
        if self.reg_score_mode == "threshold":
            score_r = regression_score(outputs.iou_max, outputs.thr_neg, outputs.thr_pos, self.reg_values)
        else:
            score_r = outputs.iou_max
        score_c = classification_score(
            outputs.scores_flat.detach(), outputs.gt_class_mask, self.cls_top_fraction, self.cls_values, valid
        )
        score = {"both": score_c * score_r, "cls": score_c, "reg": score_r}[self.importance]
        score = score.masked_fill(~valid, 0.0)
        return flatten_levels(outputs.to_maps(score))

    # --- module 2 -------------------------------------------------------------------------
    def output_value(self, score_t, score_s, shapes, valid):
        key_area = top_fraction_mask(score_t, self.key_fraction, valid)
        score_key = torch.where(key_area, score_t, torch.full_like(score_t, self.key_outside))
        gap = score_t - score_s
        peaks = flatten_levels(local_maxima(unflatten_levels(gap, shapes), self.nms_window))
        weak_area = top_fraction_mask(gap, self.weak_fraction, valid & peaks & (gap > 0), population=valid)
        score_weak = torch.where(weak_area, torch.full_like(gap, self.weak_score), torch.ones_like(gap))
        value = {"both": score_key * score_weak, "key": score_key, "weak": score_weak}[self.areas]
        return value, key_area, weak_area

    @torch.no_grad()
    def masks(self, student, teacher):
        shapes = teacher.level_shapes
        valid = flatten_levels(teacher.to_maps(teacher.valid_mask.float())) > 0
        score_t = self.importance_score(teacher)
        score_s = self.importance_score(student)
        value_output, key_area, weak_area = self.output_value(score_t, score_s, shapes, valid)
        gt_boxes, gt_valid = padded_gt_boxes(teacher.gt_instances, score_t.device)
        v_info = information_value(position_centers(teacher), gt_boxes, gt_valid, self.band_ratio)
        value = value_output * v_info * valid
        mask = tier_mask(value, self.tier_bounds, self.tier_factors)
        return TIDMasks(
            score_teacher=score_t, score_student=score_s, key_area=key_area, weak_area=weak_area,
            value_output=value_output, information=v_info, value=value, mask=mask, shapes=shapes,
        )

    # --- module 3 -------------------------------------------------------------------------
    def forward(self, student, teacher):
        masks = self.masks(student, teacher)
        self.last_masks = masks
        level_masks = unflatten_levels(masks.mask, masks.shapes)
        adapted = self.adapter(student.features)
        if self.normalizer == "per_level":
            loss = masked_feature_loss(adapted, teacher.features, level_masks)
        else:
            loss = masked_sum_loss(adapted, teacher.features, level_masks)
        return {"loss_distill_tid": self.weight * loss}

