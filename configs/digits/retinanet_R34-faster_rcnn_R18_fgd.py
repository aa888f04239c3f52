"""The RetinaNet teacher (P3-P7) into the Faster R-CNN student (P2-P6) with FGD on P3-P6: the
LazyConfig twin of retinanet_R34-faster_rcnn_R18_fgd.yaml."""
from detectron2.config import LazyCall as L

from d2_taskdistill.losses import FGD

from .distill_faster_rcnn_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

model.teacher.config_file = "configs/digits/retinanet_R34_FPN_teacher.yaml"
model.teacher.weights = "output/digits/retinanet_R34_FPN_teacher/model_final.pth"
model.losses = {"FGD": L(FGD)()}
train.output_dir = "output/digits/retinanet_R34-faster_rcnn_R18_fgd"
