from detectron2.config import LazyCall as L

from d2_taskdistill.losses import BCKD, PKD

from .distill_faster_rcnn_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

# PKD on the FPN features and BCKD on the RPN (see the yaml twin).
model.losses = {"PKD": L(PKD)(), "BCKD": L(BCKD)()}
train.output_dir = "output/digits/faster_rcnn_R34-R18_pkd_bckd"
