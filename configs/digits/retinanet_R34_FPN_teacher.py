"""The R34 RetinaNet teacher of the digits distillations as a LazyConfig: the twin of
retinanet_R34_FPN_teacher.yaml (same model and schedule), trained with
python train_net.py --config-file configs/digits/retinanet_R34_FPN_teacher.py"""
from .lazy_common import dataloader, digits_retinanet, lr_multiplier, optimizer, teacher_schedule, train

model = digits_retinanet(depth=34, width=128)
teacher_schedule(optimizer, lr_multiplier, train)
train.output_dir = "output/digits/retinanet_R34_FPN_teacher"
