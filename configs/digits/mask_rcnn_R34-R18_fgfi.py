from detectron2.config import LazyCall as L

from d2_taskdistill.losses import FGFI

from .distill_mask_rcnn_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

# FGFI on P2-P6 (see the yaml twin).
model.losses = {"FGFI": L(FGFI)()}
train.output_dir = "output/digits/mask_rcnn_R34-R18_fgfi"
