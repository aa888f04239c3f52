"""Distil the R34 Faster R-CNN teacher into the R18 student with the feature losses: the
LazyConfig twin of Base-Distill-faster_rcnn_R34-R18.yaml. Each faster_rcnn_R34-R18_<method>.py
sets model.losses and train.output_dir.
Train the teacher first: python train_net.py --config-file configs/digits/faster_rcnn_R34_FPN_teacher.yaml"""
from detectron2.config import LazyCall as L

from d2_taskdistill.modeling import TaskDistillDetector, load_teacher

from .lazy_common import dataloader, faster_rcnn_student, lr_multiplier, optimizer, train

model = L(TaskDistillDetector)(
    student=faster_rcnn_student,
    teacher=L(load_teacher)(
        config_file="configs/digits/faster_rcnn_R34_FPN_teacher.yaml",
        weights="output/digits/faster_rcnn_R34_FPN_teacher/model_final.pth",
    ),
    losses={},
)
train.teacher_eval_at_start = True
