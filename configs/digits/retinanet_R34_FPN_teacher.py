"""The R34 RetinaNet teacher of the digits distillations as a LazyConfig: the twin of
retinanet_R34_FPN_teacher.yaml (same model and schedule), trained with
python train_net.py --config-file configs/digits/retinanet_R34_FPN_teacher.py"""
from .lazy_common import dataloader, digits_retinanet, lr_multiplier, optimizer, train

model = digits_retinanet(depth=34, width=128)
# Trained longer than the students, at half their lr (see the yaml).
optimizer.lr = 0.0005
train.max_iter = 900
lr_multiplier.scheduler.milestones = [700, 850]
lr_multiplier.scheduler.num_updates = 900
lr_multiplier.warmup_length = 100 / 900
train.output_dir = "output/digits/retinanet_R34_FPN_teacher"
