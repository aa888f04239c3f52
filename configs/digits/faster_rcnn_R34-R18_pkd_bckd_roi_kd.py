from detectron2.config import LazyCall as L

from d2_taskdistill.losses import BCKD, PKD, ROI_KD

from .distill_faster_rcnn_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

# PKD on the FPN features with head distillation of both stages (see the yaml twin).
model.losses = {"PKD": L(PKD)(), "BCKD": L(BCKD)(), "ROI_KD": L(ROI_KD)()}
train.output_dir = "output/digits/faster_rcnn_R34-R18_pkd_bckd_roi_kd"
