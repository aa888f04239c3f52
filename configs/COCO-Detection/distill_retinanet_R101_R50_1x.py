"""RetinaNet R101 (detectron2 model zoo, 3x, 40.4 AP) -> R50 on COCO, 1x: the LazyConfig twin of
Base-Distill-retinanet_R101-R50_1x.yaml. Data, schedule, optimizer and student are the zoo's
COCO-Detection/retinanet_R_50_FPN_1x.py; each retinanet_R101-R50_1x_<method>.py sets the losses."""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from d2_taskdistill.modeling import TaskDistillDetector, load_teacher

_zoo = get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader, optimizer, lr_multiplier, train = _zoo.dataloader, _zoo.optimizer, _zoo.lr_multiplier, _zoo.train

model = L(TaskDistillDetector)(
    student=_zoo.model,
    teacher=L(load_teacher)(
        config_file="COCO-Detection/retinanet_R_101_FPN_3x.yaml",
        weights="detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl",
    ),
    losses={},
)
train.teacher_eval_at_start = True
