"""Config keys of d2_taskdistill, in the style of detectron2 projects
(``add_*_config`` functions that extend a default CfgNode)."""
from detectron2.config import CfgNode as CN


def add_fcos_config(cfg):
    """Yaml keys for FCOS, which detectron2 only offers as a LazyConfig.

    Defaults mirror detectron2's ``COCO-Detection/fcos_R_50_FPN_1x.py``.
    """
    cfg.MODEL.FCOS = CN()
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.FCOS.NUM_CONVS = 4
    cfg.MODEL.FCOS.NORM = "GN"
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6


def add_taskdistill_config(cfg):
    """Add every key this project reads; idempotent."""
    if not hasattr(cfg.MODEL, "FCOS"):
        add_fcos_config(cfg)


def load_config(config_file, opts=()):
    """A detectron2 CfgNode with this project's keys, merged from a file and KEY VALUE opts."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_taskdistill_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg
