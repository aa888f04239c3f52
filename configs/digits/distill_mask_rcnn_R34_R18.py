"""Distil the R34 Mask R-CNN teacher into the R18 student: the LazyConfig twin of
mask_rcnn_R34-R18_fgd.yaml without its losses. Each mask_rcnn_R34-R18_<method>.py sets
model.losses and train.output_dir; the student's mask head trains on the ground truth.
Train the teacher first: python train_net.py --config-file configs/digits/mask_rcnn_R34_FPN_teacher.yaml"""
from detectron2.config import LazyCall as L

from d2_taskdistill.modeling import TaskDistillDetector, load_teacher

from .lazy_common import dataloader, lr_multiplier, mask_rcnn_student, optimizer, train, with_instance_masks

model = L(TaskDistillDetector)(
    student=mask_rcnn_student,
    teacher=L(load_teacher)(
        config_file="configs/digits/mask_rcnn_R34_FPN_teacher.yaml",
        weights="output/digits/mask_rcnn_R34_FPN_teacher/model_final.pth",
    ),
    losses={},
)
with_instance_masks(dataloader)
train.teacher_eval_at_start = True
