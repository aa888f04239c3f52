"""Shared parts of the digits LazyConfigs: the data, schedule and R18 students of the yaml
configs (Base-Digits.yaml, *_R18_FPN_student.yaml), written on detectron2's model-zoo models.
tests/test_lazy_configs.py checks that they build the same models and train the same way."""
import torch
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from d2_taskdistill.engine import FileNamingMapper, dataset_evaluator
from d2_taskdistill.modeling.fcos import FCOS
from d2_taskdistill.zoo import resize_zoo_detector

# 128 px images of digits on photos, 10 classes, trained from scratch on CPU.
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names=["digits_det_train"], filter_empty=True),
    mapper=L(FileNamingMapper)(
        is_train=True,
        # No flip: a mirrored digit is not a digit.
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=(128,), max_size=128, sample_style="choice")],
        image_format="BGR",
    ),
    total_batch_size=8,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names=["digits_det_val"], filter_empty=False),
    mapper=L(FileNamingMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128, sample_style="choice")],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=0,
)
dataloader.evaluator = L(dataset_evaluator)(dataset_name="digits_det_val", output_dir=None)

# From scratch on CPU, AdamW converges in far fewer iterations than SGD here.
optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(base_lr="${..lr}", weight_decay="${..weight_decay}", weight_decay_norm=0.0),
    lr=0.001,
    weight_decay=0.05,
)
# 200 iterations, lr x0.1 at 160 and 190, linear warm-up over 50 (fractions of train.max_iter).
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[160, 190], num_updates=200),
    warmup_length=50 / 200,
    warmup_factor=0.001,
)

train = get_config("common/train.py").train
train.max_iter = 200
train.eval_period = 0
train.checkpointer = dict(period=1000, max_to_keep=100)
train.seed = -1
train.device = "cuda"  # the CPU where there is no GPU, as MODEL.DEVICE in the yaml configs


def teacher_schedule(optimizer, lr_multiplier, train):
    """The teachers' schedule (*_R34_FPN_teacher.yaml): longer than the students', at half their lr."""
    optimizer.lr = 0.0005
    train.max_iter = 900
    lr_multiplier.scheduler.milestones = [700, 850]
    lr_multiplier.scheduler.num_updates = 900
    lr_multiplier.warmup_length = 100 / 900


# The yaml models: ResNets with BatchNorm (from scratch: FrozenBN would be an identity), FPN on
# res3-res5, heads of 2 convs, 10 classes; RetinaNet's anchors half of detectron2's COCO sizes.
def digits_model(model, depth, width, **resize):
    resize_zoo_detector(model, depth=depth, width=width, num_classes=10, norm="BN", head_convs=2, **resize)
    model.pixel_mean = [103.530, 116.280, 123.675]
    model.pixel_std = [1.0, 1.0, 1.0]
    return model


def digits_retinanet(depth, width):
    model = digits_model(get_config("common/models/retinanet.py").model, depth, width)
    model.anchor_generator.sizes = [
        [16, 20.16, 25.4], [32, 40.32, 50.8], [64, 80.63, 101.59], [128, 161.27, 203.19], [256, 322.54, 406.37]]
    model.smooth_l1_beta = 0.1  # the yacs default (MODEL.RETINANET.SMOOTH_L1_LOSS_BETA)
    return model


def digits_faster_rcnn(depth, width, box_head_fc, masks=False):
    """faster_rcnn_R18_FPN_student.yaml's model: the zoo's FPN R-CNN, the RPN's anchors half of
    detectron2's COCO sizes, 128 sampled proposals per image; without its mask branch unless
    ``masks`` (mask_rcnn_R18_FPN_student.yaml: 4 convs at the FPN's width)."""
    model = get_config("common/models/mask_rcnn_fpn.py").model
    if not masks:
        for key in ("mask_in_features", "mask_pooler", "mask_head"):
            del model.roi_heads[key]
    digits_model(model, depth, width, box_head_fc=box_head_fc)
    model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
    model.roi_heads.batch_size_per_image = 128
    return model


def with_instance_masks(dataloader):
    """The training data with the digits' masks (COCO RLE, read as bitmasks: INPUT.MASK_FORMAT)."""
    dataloader.train.mapper.use_instance_mask = True
    dataloader.train.mapper.instance_mask_format = "bitmask"


# The R18 students (*_R18_FPN_student.yaml): 64 FPN channels.
retinanet_student = digits_retinanet(depth=18, width=64)

fcos_student = digits_model(get_config("common/models/fcos.py").model, depth=18, width=64)
# The project's FCOS: detectron2's, with v0.6's images-without-boxes fault guarded.
fcos_student._target_ = FCOS

faster_rcnn_student = digits_faster_rcnn(depth=18, width=64, box_head_fc=256)

mask_rcnn_student = digits_faster_rcnn(depth=18, width=64, box_head_fc=256, masks=True)
