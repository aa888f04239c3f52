from detectron2.config import LazyCall as L

from d2_taskdistill.losses import FGFI, ROI_KD

from .distill_faster_rcnn_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

# FGFI on the FPN features with ROI_KD on the box head (see the yaml twin).
model.losses = {"FGFI": L(FGFI)(), "ROI_KD": L(ROI_KD)()}
train.output_dir = "output/digits/faster_rcnn_R34-R18_fgfi_roi_kd"
