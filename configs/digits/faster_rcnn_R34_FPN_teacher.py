"""The R34 Faster R-CNN teacher as a LazyConfig: the twin of faster_rcnn_R34_FPN_teacher.yaml."""
from .lazy_common import dataloader, digits_faster_rcnn, lr_multiplier, optimizer, train

model = digits_faster_rcnn(depth=34, width=128, box_head_fc=512)
# Trained longer than the students, at half their lr (see the yaml).
optimizer.lr = 0.0005
train.max_iter = 900
lr_multiplier.scheduler.milestones = [700, 850]
lr_multiplier.scheduler.num_updates = 900
lr_multiplier.warmup_length = 100 / 900
train.output_dir = "output/digits/faster_rcnn_R34_FPN_teacher"
