from detectron2.config import LazyCall as L

from d2_taskdistill.losses import ROI_KD

from .distill_faster_rcnn_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

# The teacher's box head on the student's sampled proposals (see the yaml twin).
model.losses = {"ROI_KD": L(ROI_KD)()}
train.output_dir = "output/digits/faster_rcnn_R34-R18_roi_kd"
