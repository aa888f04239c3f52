"""The R18 Faster R-CNN student trained alone: the LazyConfig twin of faster_rcnn_R18_FPN_student.yaml."""
from .lazy_common import dataloader, faster_rcnn_student, lr_multiplier, optimizer, train

model = faster_rcnn_student
train.output_dir = "output/digits/faster_rcnn_R18_FPN_student"
