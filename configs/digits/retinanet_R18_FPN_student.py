"""The R18 RetinaNet student trained alone, the baseline a distillation must beat: the
LazyConfig twin of retinanet_R18_FPN_student.yaml."""
from .lazy_common import dataloader, lr_multiplier, optimizer, retinanet_student, train

model = retinanet_student
train.output_dir = "output/digits/retinanet_R18_FPN_student"
