"""FCOS built from yaml configs (``MODEL.META_ARCHITECTURE: "FCOS"``).

detectron2 has FCOS only as a LazyConfig model; this subclass of it adds a ``from_config`` for
the yaml keys ``MODEL.FCOS.*`` and is registered as detectron2's RetinaNet is. Its state dict is
the one stock detectron2's FCOS loads.
"""
import torch

from detectron2.config import configurable
from detectron2.structures import Boxes

from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead

from ..compat import fcos_labels_images_without_boxes, group_norm_factory

_PARENT_LABELS_EMPTY_IMAGES = fcos_labels_images_without_boxes()


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape):
    """ResNet-FPN whose P6 is computed from P5, as in detectron2's FCOS LazyConfig."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=build_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@META_ARCH_REGISTRY.register()
class FCOS(_D2FCOS):
    """detectron2's FCOS with a yaml builder and, on v0.6, a guard for images without boxes."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        # Built in this order (backbone, head): the random init, and so every committed
        # result, depends on it.
        backbone = build_backbone(cfg)
        in_features = cfg.MODEL.FCOS.IN_FEATURES
        feature_shapes = [backbone.output_shape()[f] for f in in_features]
        norm = cfg.MODEL.FCOS.NORM
        head = FCOSHead(
            input_shape=feature_shapes,
            conv_dims=[feature_shapes[0].channels] * cfg.MODEL.FCOS.NUM_CONVS,
            num_classes=cfg.MODEL.FCOS.NUM_CLASSES,
            norm=group_norm_factory if norm == "GN" else norm,
            prior_prob=cfg.MODEL.FCOS.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "center_sampling_radius": cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA,
            "test_score_thresh": cfg.MODEL.FCOS.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.FCOS.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @torch.no_grad()
    def label_anchors(self, anchors, gt_instances):
        # Fault (v0.6 only): it reduces and indexes over an empty GT dimension on images
        # without boxes; label those images background here instead, as upstream does.
        empty = [len(g) == 0 for g in gt_instances]
        if _PARENT_LABELS_EMPTY_IMAGES or not any(empty):
            return super().label_anchors(anchors, gt_instances)
        non_empty = [g for g, e in zip(gt_instances, empty) if not e]
        labels, boxes = super().label_anchors(anchors, non_empty) if non_empty else ([], [])
        labels, boxes = iter(labels), iter(boxes)
        num_anchors = sum(len(a) for a in anchors)
        background = torch.full((num_anchors,), self.num_classes, dtype=torch.long, device=self.device)
        no_box = Boxes(torch.zeros(num_anchors, 4, device=self.device))
        return (
            [background if e else next(labels) for e in empty],
            [no_box if e else next(boxes) for e in empty],
        )
