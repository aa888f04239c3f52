"""Turn a detectron2 model-zoo LazyConfig detector into a smaller one to train: a student, or a
teacher that fits a CPU.

    from detectron2.model_zoo import get_config
    from d2_taskdistill.zoo import resize_zoo_detector

    student = resize_zoo_detector(get_config("COCO-Detection/fcos_R_50_FPN_1x.py").model,
                                  depth=18, width=64, num_classes=3)

The zoo's RetinaNet, FCOS and R-CNNs (``common/models/retinanet.py``, ``fcos.py``,
``mask_rcnn_fpn.py`` and the ``*.py`` configs built on them) are written for a pretrained
ResNet-50 at 256 FPN channels.
What changes with depth, width and norm, each of which the zoo's config leaves to the user:

- depth < 50 builds BasicBlocks, which take no ``stride_in_1x1``: the key is removed; their res5
  has 512 channels, which RetinaNet's P6 (from res5) must be told;
- the FPN's width is also the head's: its ``input_shape`` and ``conv_dims`` follow (an R-CNN's
  RPN head, and its box and mask heads' inputs);
- from scratch, FrozenBN is an identity: ``norm`` (default "BN") replaces it in the stem and the
  stages, and no stage is frozen (``freeze_at=0``).

FCOS keeps its GroupNorm head ("GN"; on v0.6 it builds with ``d2_taskdistill`` imported).
"""
from detectron2.layers import ShapeSpec

RES5_CHANNELS = {18: 512, 34: 512, 50: 2048, 101: 2048, 152: 2048}


def resize_zoo_detector(model, *, depth, width, num_classes, norm="BN", head_convs=None, box_head_fc=None):
    """``model`` (a zoo RetinaNet, FCOS or FPN R-CNN LazyConfig node, changed in place and returned)
    with a ResNet-``depth`` backbone in ``norm``, an FPN and head ``width`` channels wide with
    ``head_convs`` convolutions (dense heads; default: as many as the zoo's), an R-CNN's box head
    of fully connected layers ``box_head_fc`` wide (default: the zoo's), and ``num_classes`` classes."""
    if depth not in RES5_CHANNELS:
        raise ValueError(f"depth={depth}: detectron2's ResNet has depths {sorted(RES5_CHANNELS)}")
    resnet = model.backbone.bottom_up
    if "stages" not in resnet or "stem" not in resnet:
        raise ValueError("resize_zoo_detector takes the zoo's RetinaNet, FCOS or FPN R-CNN, whose backbone.bottom_up is "
                         "L(ResNet)(stem=L(BasicStem)(...), stages=L(ResNet.make_default_stages)(...))")
    resnet.stages.depth = depth
    if depth < 50 and "stride_in_1x1" in resnet.stages:
        del resnet.stages.stride_in_1x1  # a BasicBlock has no 1x1 conv
    resnet.stem.norm = norm
    resnet.stages.norm = norm
    if norm != "FrozenBN":
        resnet.freeze_at = 0
    model.backbone.out_channels = width
    if "roi_heads" in model:
        return _resize_rcnn_heads(model, width, num_classes, box_head_fc)
    top_block = model.backbone.top_block
    # P6 from res5 (RetinaNet) or from P5 (FCOS)
    top_block.in_channels = width if top_block.get("in_feature", "res5") == "p5" else RES5_CHANNELS[depth]
    head = model.head
    head.input_shape = [ShapeSpec(channels=width)] * len(head.input_shape)
    head.conv_dims = [width] * (head_convs if head_convs is not None else len(head.conv_dims))
    model.num_classes = num_classes
    return model


def _resize_rcnn_heads(model, width, num_classes, box_head_fc):
    """An R-CNN's RPN and ROI heads on an FPN ``width`` channels wide (its P6 is a max-pool)."""
    model.proposal_generator.head.in_channels = width
    roi_heads = model.roi_heads
    box_head = roi_heads.box_head
    box_head.input_shape = ShapeSpec(channels=width, height=box_head.input_shape.height,
                                     width=box_head.input_shape.width)
    if box_head_fc is not None:
        box_head.fc_dims = [box_head_fc] * len(box_head.fc_dims)
    roi_heads.box_predictor.input_shape = ShapeSpec(channels=box_head.fc_dims[-1])
    if roi_heads.get("mask_head") is not None:
        mask_head = roi_heads.mask_head
        mask_head.input_shape = ShapeSpec(channels=width, height=mask_head.input_shape.height,
                                          width=mask_head.input_shape.width)
        mask_head.conv_dims = [width] * len(mask_head.conv_dims)
    roi_heads.num_classes = num_classes
    return model
