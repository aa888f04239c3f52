"""Distil the R34 RetinaNet teacher into the R18 student on the embedded digits dataset: the
LazyConfig twin of Base-Distill-retinanet_R34-R18.yaml. Each retinanet_R34-R18_<method>.py
sets model.losses and train.output_dir.
Train the teacher first: python train_net.py --config-file configs/digits/retinanet_R34_FPN_teacher.yaml"""
from detectron2.config import LazyCall as L

from d2_taskdistill.modeling import TaskDistillDetector, load_teacher

from .lazy_common import dataloader, lr_multiplier, optimizer, retinanet_student, train

model = L(TaskDistillDetector)(
    student=retinanet_student,
    teacher=L(load_teacher)(
        config_file="configs/digits/retinanet_R34_FPN_teacher.yaml",
        weights="output/digits/retinanet_R34_FPN_teacher/model_final.pth",
    ),
    losses={},
)
train.teacher_eval_at_start = True
