from detectron2.config import LazyCall as L

from d2_taskdistill.losses import FGD, ROI_KD

from .distill_mask_rcnn_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

# FGD on the features and ROI_KD on the box and mask heads of two Mask R-CNNs (see the yaml twin).
model.losses = {"FGD": L(FGD)(), "ROI_KD": L(ROI_KD)(mask_weight=1.0)}
train.output_dir = "output/digits/mask_rcnn_R34-R18_fgd_roi_kd"
