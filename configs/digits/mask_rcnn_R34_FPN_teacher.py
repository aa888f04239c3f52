"""The R34 Mask R-CNN teacher as a LazyConfig: the twin of mask_rcnn_R34_FPN_teacher.yaml."""
from .lazy_common import (dataloader, digits_faster_rcnn, lr_multiplier, optimizer, teacher_schedule, train,
                          with_instance_masks)

model = digits_faster_rcnn(depth=34, width=128, box_head_fc=512, masks=True)
with_instance_masks(dataloader)
teacher_schedule(optimizer, lr_multiplier, train)
train.output_dir = "output/digits/mask_rcnn_R34_FPN_teacher"
