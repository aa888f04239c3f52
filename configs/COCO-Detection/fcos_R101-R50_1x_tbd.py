from detectron2.config import LazyCall as L

from d2_taskdistill.losses import TBD

from .distill_fcos_R101_R50_1x import dataloader, lr_multiplier, model, optimizer, train

model.losses = {"TBD": L(TBD)()}
train.output_dir = "output/coco/fcos_R101-R50_tbd"
