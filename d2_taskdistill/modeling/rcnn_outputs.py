"""One batch of a two-stage detector (detectron2's GeneralizedRCNN: Faster and Mask R-CNN), run
for distillation: the FPN levels its RPN reads and, for the student, its own RPN and ROI-head
losses. The RPN is a dense one-class detector: its objectness and box deltas are the head
outputs (``cls_logits``, ``box_reg``) of DenseOutputs, so that BCKD distils it as it does a
RetinaNet's head."""
import contextlib

import torch

from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, pairwise_iou

from .dense_outputs import DenseOutputs

# What running a GeneralizedRCNN for distillation reads of it.
RCNN_DETECTOR_ATTRIBUTES = ("preprocess_image", "backbone", "proposal_generator", "roi_heads")


def is_rcnn(detector):
    return isinstance(detector, GeneralizedRCNN)


def trains_masks(detector):
    """An R-CNN with a mask head on (detectron2's ROI heads' ``mask_on``)."""
    return is_rcnn(detector) and getattr(detector.roi_heads, "mask_on", False)


def distillable_mask_head(detector):
    """The mask head whose logits distillation reads: detectron2's MaskRCNNConvUpsampleHead kind
    (a ``predictor`` layer), else None."""
    head = detector.roi_heads.mask_head if trains_masks(detector) else None
    return head if hasattr(head, "predictor") else None


def rcnn_levels(detector):
    """The FPN levels the RPN reads (P2-P6 in detectron2's R-CNN FPN configs)."""
    return list(detector.proposal_generator.in_features)


class RPNAsDenseHead:
    """An RPN as a one-class dense detector: its anchors, box coder and matcher. Labels are
    DenseOutputs': 0 the object class, 1 background, -1 ignored (the RPN's 1, 0, -1), matched as
    the RPN matches, before it samples anchors for its own loss (the sample is random)."""

    num_classes = 1

    def __init__(self, rpn):
        self.rpn = rpn
        self.anchor_generator = rpn.anchor_generator
        self.box2box_transform = rpn.box2box_transform
        self.anchor_matcher = rpn.anchor_matcher

    @torch.no_grad()
    def label_anchors(self, anchors, gt_instances):
        anchors = Boxes.cat(anchors)
        labels, matched_boxes = [], []
        for gt in gt_instances:  # one matching per image
            matched, rpn_labels = self.anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))
            rpn_labels = rpn_labels.to(anchors.device)
            if self.rpn.anchor_boundary_thresh >= 0:  # off in detectron2's configs, as the RPN
                rpn_labels[~anchors.inside_box(gt.image_size, self.rpn.anchor_boundary_thresh)] = -1
            labels.append(torch.where(rpn_labels == 1, 0, torch.where(rpn_labels == 0, 1, -1)))
            matched_boxes.append(gt.gt_boxes.tensor[matched] if len(gt) else torch.zeros_like(anchors.tensor))
        return labels, matched_boxes


@contextlib.contextmanager
def capturing_training_outputs(detector):
    """{"rpn_head": the RPN head's (objectness, deltas), "roi_samples": the proposals the ROI heads
    sampled (with their gt_classes), "roi_predictions": the box predictor's (scores, deltas) on
    them, and with a mask head "mask_samples": the foreground proposals it trains on,
    "mask_logits": its (M, K, 28, 28) logits}, as one training forward of ``detector`` computes them
    for its own losses."""
    captured = {}
    roi_heads = detector.roi_heads
    label_and_sample = roi_heads.label_and_sample_proposals

    def sample_and_keep(proposals, targets):
        captured["roi_samples"] = label_and_sample(proposals, targets)
        return captured["roi_samples"]

    def keep(name, position=None):
        # A hook that returns None leaves the module's inputs and outputs as they are.
        def hook(module, inputs, outputs=None):
            captured.setdefault(name, outputs if position is None else inputs[position])
        return hook

    hooks = [detector.proposal_generator.rpn_head.register_forward_hook(keep("rpn_head")),
             roi_heads.box_predictor.register_forward_hook(keep("roi_predictions"))]
    mask_head = distillable_mask_head(detector)
    if mask_head is not None:
        hooks += [mask_head.register_forward_pre_hook(keep("mask_samples", position=1)),
                  mask_head.predictor.register_forward_hook(keep("mask_logits"))]
    roi_heads.label_and_sample_proposals = sample_and_keep  # this instance, for this forward
    try:
        yield captured
    finally:
        del roi_heads.label_and_sample_proposals
        for hook in hooks:
            hook.remove()


def run_rcnn_detector(detector, batched_inputs, gt_instances=None, image_sizes=None, with_losses=True,
                      with_rpn_head=True):
    """Run ``detector``'s backbone and its RPN head (``with_rpn_head``) and, ``with_losses``, its
    RPN and ROI heads in training mode as GeneralizedRCNN.forward does (within an EventStorage:
    both heads log to it); the RPN head's and the box predictor's outputs are then those the
    R-CNN's own losses used."""
    images = detector.preprocess_image(batched_inputs)
    features = detector.backbone(images.tensor)
    levels = rcnn_levels(detector)
    rpn = detector.proposal_generator
    losses, captured = {}, {}
    if with_losses:
        with capturing_training_outputs(detector) as captured:
            proposals, proposal_losses = rpn(images, features, gt_instances)
            _, roi_losses = detector.roi_heads(images, features, proposals, gt_instances)
        losses = {**proposal_losses, **roi_losses}
    elif with_rpn_head:
        captured["rpn_head"] = rpn.rpn_head([features[f] for f in levels])
    outputs = RCNNOutputs(detector, images, features, captured.get("rpn_head"), losses, gt_instances, image_sizes)
    for name in ("roi_samples", "roi_predictions", "mask_samples", "mask_logits"):
        setattr(outputs, name, captured.get(name))
    return outputs


class RCNNOutputs(DenseOutputs):
    """DenseOutputs of the RPN (``detector`` is the RPNAsDenseHead; ``rcnn`` the GeneralizedRCNN),
    on the levels it reads; ``detector_losses`` are the R-CNN's RPN and ROI-head losses."""

    def __init__(self, rcnn, images, all_features, rpn_head_outputs, losses, gt_instances, image_sizes=None):
        rpn = RPNAsDenseHead(rcnn.proposal_generator)
        # Without the RPN head's outputs (a teacher for the feature losses only), only the features are read.
        predictions = rpn_head_outputs if rpn_head_outputs is not None else ([], [])
        features = [all_features[f] for f in rcnn_levels(rcnn)]
        super().__init__(rpn, images, features, predictions, gt_instances, thresholds_fcos=None,
                         image_sizes=image_sizes)
        self.rcnn = rcnn
        self.all_features = all_features  # every FPN level by name, for the ROI heads
        self._losses = losses
        # The student's, from its training forward (capturing_training_outputs).
        self.roi_samples = self.roi_predictions = self.mask_samples = self.mask_logits = None

    def box_predictions_on(self, proposals):
        """This R-CNN's box head on ``proposals`` (another detector's samples): (scores, deltas)."""
        heads = self.rcnn.roi_heads
        pooled = heads.box_pooler([self.all_features[f] for f in heads.box_in_features],
                                  [p.proposal_boxes for p in proposals])
        return heads.box_predictor(heads.box_head(pooled))

    def mask_logits_on(self, proposals):
        """This R-CNN's mask head on ``proposals``: (M, K, 28, 28) logits."""
        heads = self.rcnn.roi_heads
        pooled = heads.mask_pooler([self.all_features[f] for f in heads.mask_in_features],
                                   [p.proposal_boxes for p in proposals])
        return heads.mask_head.layers(pooled)

    @property
    def feature_strides(self):
        shapes = self.rcnn.backbone.output_shape()
        return [shapes[f].stride for f in rcnn_levels(self.rcnn)]

    @property
    def num_anchors(self):
        """A, anchors per location (without the RPN head's outputs too)."""
        return self.detector.anchor_generator.num_cell_anchors[0]

    def to_float32(self):
        super().to_float32()
        self._losses = {k: v.float() for k, v in self._losses.items()}
        if self.roi_predictions is not None:
            self.roi_predictions = tuple(x.float() for x in self.roi_predictions)
        if self.mask_logits is not None:
            self.mask_logits = self.mask_logits.float()
        return self

    def detector_losses(self):
        """The RPN's and the ROI heads' own training losses."""
        return self._losses
