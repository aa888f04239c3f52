from detectron2.config import LazyCall as L

from d2_taskdistill.losses import BCKD

from .distill_faster_rcnn_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

# BCKD on the RPN (see the yaml twin).
model.losses = {"BCKD": L(BCKD)()}
train.output_dir = "output/digits/faster_rcnn_R34-R18_bckd"
