"""FCOS R101 -> R50 on COCO, 1x: the LazyConfig twin of Base-Distill-fcos_R101-R50_1x.yaml. Data,
schedule, optimizer and student are the zoo's COCO-Detection/fcos_R_50_FPN_1x.py, its FCOS class
used as it is; each fcos_R101-R50_1x_<method>.py sets the losses. Train the teacher first
(configs/COCO-Detection/fcos_R_101_FPN_1x_teacher.yaml)."""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from d2_taskdistill.modeling import TaskDistillDetector, load_teacher

_zoo = get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
dataloader, optimizer, lr_multiplier, train = _zoo.dataloader, _zoo.optimizer, _zoo.lr_multiplier, _zoo.train

model = L(TaskDistillDetector)(
    student=_zoo.model,
    teacher=L(load_teacher)(
        config_file="configs/COCO-Detection/fcos_R_101_FPN_1x_teacher.yaml",
        weights="output/coco/fcos_R_101_FPN_1x_teacher/model_final.pth",
    ),
    losses={},
)
train.teacher_eval_at_start = True
