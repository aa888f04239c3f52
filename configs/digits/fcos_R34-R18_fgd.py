from detectron2.config import LazyCall as L

from d2_taskdistill.losses import FGD

from .distill_fcos_R34_R18 import dataloader, lr_multiplier, model, optimizer, train

# The authors' FCOS config (configs/distillers/fgd/fgd_fcos_r101_distill_fcos_r50_2x_coco.py).
model.losses = {"FGD": L(FGD)(temperature=0.8, fg_weight=0.0016, bg_weight=0.0008, attention_weight=0.0008,
                              global_weight=0.000008)}
train.output_dir = "output/digits/fcos_R34-R18_fgd"
