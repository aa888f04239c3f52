"""Training loop pieces: a DefaultTrainer that picks evaluators by dataset type."""
import logging
import os

import torch

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

from . import compat

logger = logging.getLogger(__name__)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """COCO or Pascal VOC evaluator, chosen by the dataset's ``evaluator_type``."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if evaluator_type == "coco":
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder,
                             use_fast_impl=bool(compat.HAS_CPP_OPS))
    if evaluator_type == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    raise ValueError(
        f"Dataset '{dataset_name}' (DATASETS.TEST) has evaluator_type={evaluator_type!r}; "
        "d2_taskdistill evaluates 'coco' or 'pascal_voc' datasets. Register the dataset "
        "with one of them (e.g. register_coco_instances or register_pascal_voc)."
    )


def resolve_device(cfg):
    """Run on the CPU when the config asks for CUDA on a machine without it."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


class DistillTrainer(DefaultTrainer):
    """DefaultTrainer for plain and distilled detectors of this project."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)
