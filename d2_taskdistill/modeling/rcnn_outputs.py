"""One batch of a two-stage detector (detectron2's GeneralizedRCNN: Faster and Mask R-CNN), run
for the feature losses: the FPN levels its RPN reads, with the RPN's anchors, and, for the
student, its own RPN and ROI-head losses."""
from functools import cached_property

from detectron2.modeling import GeneralizedRCNN

from .dense_outputs import LevelLayout

# What running a GeneralizedRCNN for distillation reads of it.
RCNN_DETECTOR_ATTRIBUTES = ("preprocess_image", "backbone", "proposal_generator", "roi_heads")


def is_rcnn(detector):
    return isinstance(detector, GeneralizedRCNN)


def rcnn_levels(detector):
    """The FPN levels the RPN reads (P2-P6 in detectron2's R-CNN FPN configs)."""
    return list(detector.proposal_generator.in_features)


def run_rcnn_detector(detector, batched_inputs, gt_instances=None, image_sizes=None, with_losses=True):
    """Run ``detector``'s backbone and, ``with_losses``, its RPN and ROI heads in training mode,
    as GeneralizedRCNN.forward does (within an EventStorage: both heads log to it)."""
    images = detector.preprocess_image(batched_inputs)
    features = detector.backbone(images.tensor)
    losses = {}
    if with_losses:
        proposals, proposal_losses = detector.proposal_generator(images, features, gt_instances)
        _, roi_losses = detector.roi_heads(images, features, proposals, gt_instances)
        losses = {**proposal_losses, **roi_losses}
    levels = rcnn_levels(detector)
    return RCNNOutputs(detector, images, [features[f] for f in levels], losses, gt_instances, image_sizes)


class RCNNOutputs(LevelLayout):
    def __init__(self, detector, images, features, losses, gt_instances, image_sizes=None):
        self.detector = detector
        self.images = images
        self.image_sizes = image_sizes
        self.features = features  # L x (N, C, H, W): the RPN's levels
        self.gt_instances = gt_instances
        self._losses = losses

    @property
    def feature_strides(self):
        shapes = self.detector.backbone.output_shape()
        return [shapes[f].stride for f in rcnn_levels(self.detector)]

    @cached_property
    def anchors(self):
        """L x Boxes: the RPN's anchors (FGFI's region on a two-stage student)."""
        return self.detector.proposal_generator.anchor_generator(self.features)

    def to_float32(self):
        self.features = [f.float() for f in self.features]
        self._losses = {k: v.float() for k, v in self._losses.items()}
        return self

    def detector_losses(self):
        """The RPN's and the ROI heads' own training losses."""
        return self._losses
