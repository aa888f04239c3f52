"""Distil the R34 FCOS teacher into the R18 student on the embedded digits dataset: the
LazyConfig twin of Base-Distill-fcos_R34-R18.yaml. Each fcos_R34-R18_<method>.py
sets model.losses and train.output_dir.
Train the teacher first: python train_net.py --config-file configs/digits/fcos_R34_FPN_teacher.yaml"""
from detectron2.config import LazyCall as L

from d2_taskdistill.modeling import TaskDistillDetector, load_teacher

from .lazy_common import dataloader, lr_multiplier, optimizer, fcos_student, train

model = L(TaskDistillDetector)(
    student=fcos_student,
    teacher=L(load_teacher)(
        config_file="configs/digits/fcos_R34_FPN_teacher.yaml",
        weights="output/digits/fcos_R34_FPN_teacher/model_final.pth",
    ),
    losses={},
)
train.teacher_eval_at_start = True
