"""The R18 Mask R-CNN student trained alone: the LazyConfig twin of mask_rcnn_R18_FPN_student.yaml."""
from .lazy_common import dataloader, lr_multiplier, mask_rcnn_student, optimizer, train, with_instance_masks

model = mask_rcnn_student
with_instance_masks(dataloader)
train.output_dir = "output/digits/mask_rcnn_R18_FPN_student"
