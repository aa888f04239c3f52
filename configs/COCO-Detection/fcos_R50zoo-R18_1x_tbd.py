"""detectron2's model-zoo FCOS R50 (COCO-Detection/fcos_R_50_FPN_1x.py) teaching the zoo's FCOS with
an R18 backbone, TBD, COCO 1x: everything but the losses and the depth is the zoo config.
detectron2's zoo publishes no trained FCOS weights: train the teacher with this project's
train_net.py --config-file on that config (its path: detectron2.model_zoo.get_config_file(
"COCO-Detection/fcos_R_50_FPN_1x.py")), or set model.teacher.weights to your checkpoint.
detectron2's zoo has no ImageNet R18 either: convert torchvision's resnet18 with detectron2's
tools/convert-torchvision-to-d2.py into train.init_checkpoint."""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from d2_taskdistill.losses import TBD
from d2_taskdistill.modeling import TaskDistillDetector, load_teacher
from d2_taskdistill.zoo import resize_zoo_detector

_zoo = get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
dataloader, optimizer, lr_multiplier, train = _zoo.dataloader, _zoo.optimizer, _zoo.lr_multiplier, _zoo.train

# Pretrained: FrozenBN, as the zoo's R50.
student = resize_zoo_detector(_zoo.model, depth=18, width=256, num_classes=80, norm="FrozenBN")

model = L(TaskDistillDetector)(
    student=student,
    teacher=L(load_teacher)(
        config_file="COCO-Detection/fcos_R_50_FPN_1x.py",
        weights="output/coco/fcos_R_50_FPN_1x/model_final.pth",
    ),
    losses={"TBD": L(TBD)()},
)
train.init_checkpoint = "output/imagenet/R-18.pkl"
train.output_dir = "output/coco/fcos_R50zoo-R18_tbd"
train.teacher_eval_at_start = True
del student
