"""The R34 Faster R-CNN teacher as a LazyConfig: the twin of faster_rcnn_R34_FPN_teacher.yaml."""
from .lazy_common import dataloader, digits_faster_rcnn, lr_multiplier, optimizer, teacher_schedule, train

model = digits_faster_rcnn(depth=34, width=128, box_head_fc=512)
teacher_schedule(optimizer, lr_multiplier, train)
train.output_dir = "output/digits/faster_rcnn_R34_FPN_teacher"
