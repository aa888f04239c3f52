"""One batch's outputs of a dense detector (RetinaNet or FCOS), computed once and
shared by every distillation loss.

Notation: N images, L FPN levels, A anchors per
location (1 for FCOS), K classes, R = sum over levels of H_l * W_l * A
locations per image. Flattened tensors follow detectron2's order
(level, y, x, anchor), the order of ``Boxes.cat(anchors)``.
"""
import functools
from functools import cached_property

import torch

from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, pairwise_iou


# What running a detector up to its head outputs, and its own losses, reads of it.
DENSE_DETECTOR_ATTRIBUTES = ("preprocess_image", "backbone", "head", "head_in_features", "anchor_generator",
                             "num_classes", "box2box_transform", "label_anchors", "losses")


def run_dense_detector(detector, batched_inputs, gt_instances=None, thresholds_fcos=(0.4, 0.5), image_sizes=None):
    """Run ``detector`` (RetinaNet or FCOS) up to its head outputs.

    Each detector preprocesses the batch its own way (pixel mean/std, padding).
    image_sizes: the batch's (N, 2) heights and widths already on the device, shared by
    teacher and student so that they are copied there once (default: from the ImageList).
    """
    images = detector.preprocess_image(batched_inputs)
    features = detector.backbone(images.tensor)
    features = [features[f] for f in detector.head_in_features]
    predictions = detector.head(features)
    return DenseOutputs(detector, images, features, predictions, gt_instances, thresholds_fcos, image_sizes)


def sample_thresholds(detector, thresholds_fcos):
    """(thr_neg, thr_pos): the IoU thresholds the detector itself samples with."""
    matcher = getattr(detector, "anchor_matcher", None)  # RetinaNet's, an R-CNN's RPN's
    if matcher is not None:
        # Matcher thresholds are [-inf, neg, pos, inf].
        return float(matcher.thresholds[1]), float(matcher.thresholds[2])
    thr_neg, thr_pos = thresholds_fcos
    return float(thr_neg), float(thr_pos)


def is_fcos(detector):
    return isinstance(detector, _D2FCOS)


def _cached_with_grad(fn):
    """A cached property computed with autograd enabled whatever the caller's mode, so
    that a loss computing masks under no_grad cannot strip the gradient another loss needs.
    (On the teacher nothing requires grad, so no graph is built there.)"""

    @functools.wraps(fn)
    def compute(self):
        with torch.enable_grad():
            return fn(self)

    return cached_property(compute)


class LevelLayout:
    """What a loss reads of the FPN levels it compares, for any detector: ``features`` (L x
    (N, C, H, W)), ``feature_strides``, ``anchors`` (L x Boxes: the detector's anchors on those
    levels, for FGFI's region) and the batch (``images``, ``image_sizes``, ``gt_instances``)."""

    @cached_property
    def anchors_flat(self):
        return Boxes.cat(self.anchors)

    @property
    def num_anchors(self):
        """A, anchors per location."""
        height, width = self.level_shapes[0]
        return len(self.anchors[0]) // (height * width)

    @property
    def level_shapes(self):
        return [tuple(f.shape[-2:]) for f in self.features]

    @property
    def num_images(self):
        return self.features[0].shape[0]

    @cached_property
    def valid_mask(self):
        """(N, R) bool: the location's anchor centre lies inside the image, not in padding."""
        centers = self.anchors_flat.get_centers()  # (R, 2)
        sizes = self.images.image_sizes if self.image_sizes is None else self.image_sizes
        sizes = torch.as_tensor(sizes, device=centers.device, dtype=centers.dtype)
        return (centers[None, :, 0] < sizes[:, None, 1]) & (centers[None, :, 1] < sizes[:, None, 0])

    def split_levels(self, flat):
        """(N, R, ...) -> L x (N, H, W, A, ...) in this detector's layout."""
        sizes = [h * w * self.num_anchors for h, w in self.level_shapes]
        parts = torch.split(flat, sizes, dim=1)
        return [
            p.reshape(p.shape[0], h, w, self.num_anchors, *p.shape[2:])
            for p, (h, w) in zip(parts, self.level_shapes)
        ]

    def to_maps(self, flat):
        """(N, R) -> L x (N, H, W): per-location values, max over the A anchors."""
        return [p.amax(dim=3) for p in self.split_levels(flat)]


class DenseOutputs(LevelLayout):
    """Head outputs and lazily computed, cached derived quantities."""

    def __init__(self, detector, images, features, predictions, gt_instances, thresholds_fcos, image_sizes=None):
        self.detector = detector
        self.images = images
        self.image_sizes = image_sizes
        self.features = features  # L x (N, C, H, W)
        self.cls_logits = predictions[0]  # L x (N, A*K, H, W)
        self.box_reg = predictions[1]  # L x (N, A*4, H, W)
        self.centerness = predictions[2] if len(predictions) > 2 else None  # FCOS: L x (N, 1, H, W)
        self.gt_instances = gt_instances
        self.num_classes = detector.num_classes
        self.thr_neg, self.thr_pos = sample_thresholds(detector, thresholds_fcos)

    def to_float32(self):
        """Cast the head outputs to float32 (after a mixed-precision forward); returns self."""
        self.features = [f.float() for f in self.features]
        self.cls_logits = [x.float() for x in self.cls_logits]
        self.box_reg = [x.float() for x in self.box_reg]
        if self.centerness is not None:
            self.centerness = [x.float() for x in self.centerness]
        return self

    # --- layout --------------------------------------------------------------------------
    @cached_property
    def anchors(self):
        """L x Boxes (H*W*A, 4): anchors (RetinaNet) or stride-sized point boxes (FCOS)."""
        return self.detector.anchor_generator(self.features)

    @property
    def feature_strides(self):
        return list(self.detector.anchor_generator.strides)

    @property
    def num_anchors(self):
        """A, anchors per location (from the head, without building the anchors)."""
        return self.cls_logits[0].shape[1] // self.num_classes


    # --- flattened predictions (N, R, .) ---------------------------------------------------
    @_cached_with_grad
    def logits_flat(self):
        return torch.cat([permute_to_N_HWA_K(x, self.num_classes) for x in self.cls_logits], dim=1)

    @_cached_with_grad
    def box_reg_flat(self):
        return torch.cat([permute_to_N_HWA_K(x, 4) for x in self.box_reg], dim=1)

    @_cached_with_grad
    def centerness_flat(self):
        if self.centerness is None:
            return None
        return torch.cat([permute_to_N_HWA_K(x, 1) for x in self.centerness], dim=1).squeeze(2)

    @_cached_with_grad
    def scores_flat(self):
        """Sigmoid class scores, (N, R, K)."""
        return self.logits_flat.sigmoid()

    @_cached_with_grad
    def pred_boxes(self):
        """Decoded boxes in input-image coordinates, (N, R, 4), with gradient."""
        anchors = self.anchors_flat.tensor
        deltas = self.box_reg_flat
        boxes = self.detector.box2box_transform.apply_deltas(deltas.reshape(-1, 4), anchors.repeat(deltas.shape[0], 1))
        return boxes.view(deltas.shape)

    # --- ground-truth matching -------------------------------------------------------------
    @cached_property
    def anchor_targets(self):
        """The detector's own training targets: (gt_labels, gt_boxes), lists over images."""
        self._require_gt()
        return self.detector.label_anchors(self.anchors, self.gt_instances)

    @cached_property
    def assigned_labels(self):
        """(N, R): the class the detector assigns each location (num_classes: background)."""
        return torch.stack(self.anchor_targets[0])

    @cached_property
    def assigned_boxes(self):
        """(N, R, 4): the GT box the detector assigns each location."""
        # RetinaNet returns tensors; FCOS Boxes on v0.6, tensors upstream.
        return torch.stack([b.tensor if isinstance(b, Boxes) else b for b in self.anchor_targets[1]])

    @cached_property
    def positive_mask(self):
        """(N, R) bool: the detector's own positive samples."""
        labels = self.assigned_labels
        return (labels >= 0) & (labels != self.num_classes)

    @cached_property
    def iou_matching(self):
        """(iou_max, matched_gt) of the *predicted* boxes against the image's GT boxes.

        iou_max: (N, R), 0 where an image has no GT; matched_gt: (N, R) index, -1 there.
        """
        self._require_gt()
        boxes = self.pred_boxes.detach()
        iou_max = boxes.new_zeros(boxes.shape[:2])
        matched = torch.full(boxes.shape[:2], -1, dtype=torch.long, device=boxes.device)
        for i, gt in enumerate(self.gt_instances):  # loop over images, not locations
            if len(gt) == 0:
                continue
            iou = pairwise_iou(Boxes(boxes[i]), gt.gt_boxes)  # (R, G)
            iou_max[i], matched[i] = iou.max(dim=1)
        return iou_max, matched

    @property
    def iou_max(self):
        return self.iou_matching[0]

    @property
    def matched_gt(self):
        return self.iou_matching[1]

    @cached_property
    def gt_class_mask(self):
        """(N, K) bool: classes present in each image's GT."""
        self._require_gt()
        mask = torch.zeros(self.num_images, self.num_classes, dtype=torch.bool, device=self.features[0].device)
        for i, gt in enumerate(self.gt_instances):
            mask[i, gt.gt_classes] = True
        return mask

    # --- helpers -----------------------------------------------------------------------------
    def detector_losses(self):
        """The detector's own training losses, from the targets computed here."""
        labels, gt_boxes = self.anchor_targets
        logits = [permute_to_N_HWA_K(x, self.num_classes) for x in self.cls_logits]
        deltas = [permute_to_N_HWA_K(x, 4) for x in self.box_reg]
        if is_fcos(self.detector):
            ctr = [permute_to_N_HWA_K(x, 1) for x in self.centerness]
            return self.detector.losses(self.anchors, logits, labels, deltas, gt_boxes, ctr)
        return self.detector.losses(self.anchors, logits, labels, deltas, gt_boxes)

    def _require_gt(self):
        if self.gt_instances is None:
            raise RuntimeError("this quantity needs ground truth: pass gt_instances")
