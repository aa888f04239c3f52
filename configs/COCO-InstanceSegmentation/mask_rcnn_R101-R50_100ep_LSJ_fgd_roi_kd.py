"""Mask R-CNN R101 (detectron2's new baselines, 400 epochs LSJ) into R50 on COCO with the new
baselines' own 100-epoch LSJ recipe (SyncBN, batch 64, AMP): FGD on P2-P6, and ROI_KD on the box
and mask heads (docs/two_stage.md). Built in the tests; not trained.

    python train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R101-R50_100ep_LSJ_fgd_roi_kd.py \
        --num-gpus 8
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from d2_taskdistill.losses import FGD, ROI_KD
from d2_taskdistill.modeling import TaskDistillDetector, load_teacher

_recipe = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader, optimizer, lr_multiplier, train = _recipe.dataloader, _recipe.optimizer, _recipe.lr_multiplier, _recipe.train

model = L(TaskDistillDetector)(
    student=_recipe.model,
    teacher=L(load_teacher)(
        config_file="new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py",
        weights="detectron2://new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ/42073830/model_final_f96b26.pkl",
    ),
    losses={"FGD": L(FGD)(), "ROI_KD": L(ROI_KD)(mask_weight=1.0)},
)
train.teacher_eval_at_start = True
train.output_dir = "output/coco/mask_rcnn_R101-R50_100ep_LSJ_fgd_roi_kd"
