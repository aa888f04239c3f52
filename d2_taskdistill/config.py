"""Config keys of d2_taskdistill, in the style of detectron2 projects
(``add_*_config`` functions that extend a default CfgNode)."""
import contextlib
import difflib
import os
import re

import yaml

from detectron2.config import CfgNode as CN

# The yacs keys that errors name (d2_taskdistill.settings): what a yaml user sets.
YACS_SETTING_NAMES = {
    "teacher.run": "DISTILL.TEACHER.RUN",
    "teacher.config_file": "DISTILL.TEACHER.CONFIG_FILE",
    "teacher.weights": "DISTILL.TEACHER.WEIGHTS",
    "teacher.overrides": "DISTILL.TEACHER.OPTS",
    "teacher.sha256": "DISTILL.TEACHER.SHA256",
    "teacher.allow_change": "DISTILL.TEACHER.ALLOW_CHANGE",
    "teacher.allow_other_class_names": "DISTILL.TEACHER.ALLOW_OTHER_CLASS_NAMES",
    "losses": "DISTILL.LOSSES",
    "student.num_classes": "MODEL.RETINANET.NUM_CLASSES / MODEL.FCOS.NUM_CLASSES",
    "student.rcnn_num_classes": "MODEL.ROI_HEADS.NUM_CLASSES",
    "student.input_format": "INPUT.FORMAT",
    "teacher.input_format": "the teacher config's INPUT.FORMAT",
    "anchor_layout": "MODEL.ANCHOR_GENERATOR / MODEL.FPN settings of DISTILL.TEACHER.CONFIG_FILE and the student",
    "fpn_channels": "MODEL.FPN.OUT_CHANNELS",
    "student_init": "DISTILL.STUDENT_INIT",
    "loss_argument": "DISTILL.{node}.{key}={value!r}",
    "epochs": "SOLVER.EPOCHS",
    "norm": "MODEL.RESNETS.NORM / MODEL.FPN.NORM",
    "coco_datasets": "DATASETS.COCO",
    "voc_datasets": "DATASETS.VOC",
    "check_images": "DATASETS.CHECK_IMAGES",
    "input_size": "INPUT.MIN_SIZE_TRAIN and INPUT.MIN_SIZE_TEST, with MAX_SIZE_* at least as large",
    "student_alone_run": "DISTILL.STUDENT_ALONE_RUN",
    "ims_per_batch": "SOLVER.IMS_PER_BATCH",
    "train_datasets": "DATASETS.TRAIN",
    "filter_empty": "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
}


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


def add_distill_config(cfg):
    """Keys of the teacher-student meta-architecture ``TaskDistillDetector``."""
    cfg.DISTILL = CN()
    # Meta-architecture of the student, built from the usual MODEL.* keys.
    cfg.DISTILL.STUDENT_ARCHITECTURE = "RetinaNet"
    # Names from DISTILL_LOSS_REGISTRY, e.g. ["TID"] or ["BCKD", "TID"].
    cfg.DISTILL.LOSSES = []
    # Start the student's "neck" (FPN), "head" or "neck+head" from the teacher where names and
    # shapes match; "none" keeps the student's own init. Once, at a fresh start; not on --resume.
    cfg.DISTILL.STUDENT_INIT = "none"
    # FCOS samples by location, not IoU: (thr_neg, thr_pos) for IoU-based scores.
    cfg.DISTILL.FCOS_IOU_THRESHOLDS = [0.4, 0.5]

    cfg.DISTILL.TEACHER = CN()
    # The OUTPUT_DIR of the teacher's own train_net.py run: its config.yaml builds the teacher and
    # its last checkpoint (last_checkpoint, else model_final.pth) loads. Set, it replaces
    # CONFIG_FILE and WEIGHTS, so the teacher's classes and datasets are the ones it trained on.
    cfg.DISTILL.TEACHER.RUN = ""
    # A detectron2 model-zoo config name or a path to a yaml or LazyConfig .py file.
    cfg.DISTILL.TEACHER.CONFIG_FILE = ""
    # .pth (detectron2/fvcore checkpoint) or model-zoo .pkl; every key must load.
    cfg.DISTILL.TEACHER.WEIGHTS = ""
    # The weights file's expected sha256 (`sha256sum` prints it; its first 8+ hex digits do): another
    # file is an error before it is unpickled (unpickling a .pkl can run code). Empty: any file.
    cfg.DISTILL.TEACHER.SHA256 = ""
    # KEY VALUE overrides merged into the teacher config, e.g. ["MODEL.RETINANET.NUM_CLASSES", 20].
    cfg.DISTILL.TEACHER.OPTS = []
    # Evaluate the teacher on DATASETS.TEST once before training and log its AP.
    cfg.DISTILL.TEACHER.EVAL_AT_START = False
    # Run the teacher under autocast: float16 on CUDA, bfloat16 on CPU.
    cfg.DISTILL.TEACHER.AMP = False
    # Checkpoints record the teacher's weights file and sha256; --resume with another teacher
    # is an error unless this is True.
    cfg.DISTILL.TEACHER.ALLOW_CHANGE = False
    # The teacher's training set names its classes otherwise (same count and order): compare
    # them anyway, with a warning, instead of the error.
    cfg.DISTILL.TEACHER.ALLOW_OTHER_CLASS_NAMES = False
    # The OUTPUT_DIR of the student trained alone (its own config): the teacher is then evaluated
    # at the start and a warning says so when it is not better than that student.
    cfg.DISTILL.STUDENT_ALONE_RUN = ""

    cfg.DISTILL.FITNET = CN()
    cfg.DISTILL.FITNET.WEIGHT = 1.0

    cfg.DISTILL.FGFI = CN()
    cfg.DISTILL.FGFI.WEIGHT = 1.0
    cfg.DISTILL.FGFI.THRESH_RATIO = 0.5  # psi of the FGFI paper

    add_tid_config(cfg)
    add_bckd_config(cfg)
    add_roi_kd_config(cfg)
    add_tbd_config(cfg)
    add_fgd_config(cfg)
    add_pkd_config(cfg)
    add_cwd_config(cfg)


def add_tid_config(cfg):
    """TID (Su, Jian, Yu 2024); paper constants as defaults, open choices documented."""
    c = cfg.DISTILL.TID = CN()
    c.WEIGHT = 1.0
    # Dual-task importance. Paper: Score_r 2 / 1.5 / 0.4, Score_c 1.5 / 1 on the top 2.5%.
    c.REG_SCORES = [2.0, 1.5, 0.4]
    c.CLS_SCORES = [1.5, 1.0]
    c.CLS_TOP_FRACTION = 0.025
    # Ablations: "both" | "cls" | "reg" importance; "threshold" (paper) | "iou" (IoU_max as Score_r).
    c.IMPORTANCE = "both"
    c.REG_SCORE_MODE = "threshold"
    # Learning dynamics. Open in the paper: the area fractions, the NMS window, Score_key outside.
    c.AREAS = "both"  # "both" | "key" | "weak"
    c.KEY_FRACTION = 0.05
    # Score_key outside the key area: the lowest Score (1 x 0.4), so that being in
    # the key area never lowers a location's value.
    c.KEY_OUTSIDE = 0.4
    c.WEAK_FRACTION = 0.05
    c.WEAK_SCORE = 1.5  # paper
    c.NMS_WINDOW = 3
    # Selective feature decoupling. Paper: tier bounds 1 / 0.01, factors 1 / 0.7 / 0.05.
    c.BAND_RATIO = 0.5  # band width / sqrt(GT box area); open in the paper
    c.TIER_BOUNDS = [1.0, 0.01]
    c.TIER_FACTORS = [1.0, 0.7, 0.05]
    c.NORMALIZER = "mask_sum"  # "mask_sum" | "per_level"


def add_taskdistill_config(cfg):
    """Add every key this project reads; idempotent."""
    if not hasattr(cfg.SOLVER, "OPTIMIZER"):
        cfg.SOLVER.OPTIMIZER = "SGD"  # "SGD" (detectron2's) | "ADAMW"
    if not hasattr(cfg.SOLVER, "EPOCHS"):
        # Passes over DATASETS.TRAIN; > 0 sets MAX_ITER, STEPS, warmup, checkpoint and evaluation
        # periods from the training set's size and IMS_PER_BATCH (d2_taskdistill/schedule.py).
        cfg.SOLVER.EPOCHS = 0
    if not hasattr(cfg.SOLVER, "CHECKPOINT_MAX_TO_KEEP"):
        # Periodic checkpoints kept (the oldest deleted; model_final.pth always stays); 0: all, as
        # detectron2. A LazyConfig's train.checkpointer.max_to_keep.
        cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0
    if not hasattr(cfg.SOLVER, "WATCHDOG_SECONDS"):
        # A training step that runs longer than this and 20 median steps (a deadlock, a stuck
        # filesystem) stops the process with every thread's Python stack in the log, exit code 124,
        # which torchrun restarts. 0: off. A LazyConfig's train.watchdog_seconds.
        cfg.SOLVER.WATCHDOG_SECONDS = 600
    if not hasattr(cfg.MODEL, "FCOS"):
        add_fcos_config(cfg)
    if not hasattr(cfg, "DISTILL"):
        add_distill_config(cfg)
    if not hasattr(cfg.DATASETS, "COCO"):
        add_dataset_config(cfg)


def add_dataset_config(cfg):
    """Datasets declared in the config, registered by :func:`load_config` with
    detectron2's register_coco_instances / register_pascal_voc."""
    # [[name, json_file, image_root], ...]: COCO-format json (evaluator "coco").
    cfg.DATASETS.COCO = []
    # [[name, dirname, split, year, [class names]], ...]: Pascal VOC layout (evaluator "pascal_voc").
    cfg.DATASETS.VOC = []
    # Images of the datasets declared above that are decoded before training: "sample" (32 spread
    # over each dataset: cheap), "all" (every image: a truncated file anywhere is found), "none".
    # An image that fails later in the data loader is named in the error either way.
    cfg.DATASETS.CHECK_IMAGES = "sample"


def load_config(config_file, opts=()):
    """A detectron2 CfgNode with this project's keys, merged from a file and KEY VALUE opts;
    the datasets it declares (DATASETS.COCO / DATASETS.VOC) are registered."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_taskdistill_config(cfg)
    with unknown_keys_named(cfg, f"config file {config_file!r}"):
        try:
            # detectron2 falls back to yaml.unsafe_load, which runs what a !!python tag names.
            cfg.merge_from_file(config_file, allow_unsafe=False)
        except yaml.constructor.ConstructorError as e:
            if not is_detectron2_file(getattr(e.problem_mark, "name", "")):
                raise ValueError(f"config file {config_file!r} (or a _BASE_ of it) holds a Python tag, which this "
                                 f"project does not run: a yacs config is plain yaml ({e.problem}, "
                                 f"{str(e.problem_mark).strip()})") from None
            # detectron2's own model-zoo yaml (Base-RetinaNet.yaml's anchor sizes) is installed code; the
            # files before it in the _BASE_ chain have been read safely already.
            cfg.merge_from_file(config_file, allow_unsafe=True)
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"The overrides {opts} are not KEY VALUE pairs (an odd count): a value is missing, or "
                         "a flag such as --resume was written after them (flags go before the overrides)")
    with unknown_keys_named(cfg, "the overrides"):
        cfg.merge_from_list(opts)
    from .data.config_datasets import register_datasets_from_config

    register_datasets_from_config(cfg)
    return cfg


@contextlib.contextmanager
def unknown_keys_named(cfg, where):
    """yacs' "Non-existent key" errors, with the file or overrides and the closest existing keys."""
    try:
        yield
    except (KeyError, AssertionError) as e:
        match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(e))
        if match is None:
            raise
        key = match.group(1)
        close = difflib.get_close_matches(key, flat_keys(cfg), n=2, cutoff=0.85)
        hint = f"; did you mean {' or '.join(close)}?" if close else ": see d2_taskdistill/config.py and detectron2's defaults"
        raise KeyError(f"{where}: {key} is not a config key{hint}") from None


def flat_keys(node, prefix=""):
    """Every setting of a CfgNode, dotted (MODEL.RETINANET.NUM_CLASSES, ...): the leaves."""
    keys = []
    for name, value in node.items():
        keys += flat_keys(value, f"{prefix}{name}.") if isinstance(value, CN) else [prefix + name]
    return keys


def add_bckd_config(cfg):
    """BCKD (Yang et al., ICCV 2023); weights default to the authors' GFL configs."""
    c = cfg.DISTILL.BCKD = CN()
    c.CLS_WEIGHT = 1.0
    c.LOC_WEIGHT = 4.0
    c.BETA = 1.0  # exponent of |p_T - p_S| in the binary term
    c.CENTERNESS_WEIGHT = 1.0  # FCOS only: binary distillation of centerness


def add_roi_kd_config(cfg):
    """ROI_KD: an R-CNN's box head on the student's proposals (losses/roi_kd.py; ours)."""
    c = cfg.DISTILL.ROI_KD = CN()
    c.CLS_WEIGHT = 1.0  # T^2 KL of the K + 1 class distributions
    c.TEMPERATURE = 1.0
    c.BOX_WEIGHT = 1.0  # 1 - GIoU of the class-specific boxes, on proposals matched to an object
    c.MASK_WEIGHT = 0.0  # Mask R-CNNs: BCE of the mask logits on the foreground proposals; 0: off


def add_tbd_config(cfg):
    """TBD (Tang et al.): a reconstruction from the abstract; see d2_taskdistill/losses/tbd.py."""
    c = cfg.DISTILL.TBD = CN()
    # Defaults chosen on the tune split (benchmarks/tbd_choices.md, RetinaNet, one seed, AP):
    # both 5.9 > tfd 5.5 > hd 4.3; teacher box 5.9 > gt box 5.5; learned 6.0 ~ equal 5.9
    # (within one seed's noise: equal kept, it adds no parameters). Student alone: 3.2.
    c.COMPONENTS = "both"  # "both" | "hd" | "tfd"
    c.HD_CLS_WEIGHT = 1.0
    c.HD_BOX_WEIGHT = 1.0
    c.QFL_BETA = 2.0  # exponent of |HS_T - p_S| in the quality-focal term
    c.BOX_TARGET = "teacher"  # "teacher" | "gt"
    c.TFD_WEIGHT = 1.0
    c.BALANCE = "equal"  # "equal" | "learned"
    c.HARMONY_THRESH = 0.5  # a prediction is harmonious when HS >= this (diagnostic)
    # Log the diagnostic every N iterations (detectron2's writer period): it matches every
    # predicted box of both models to the GT, which nothing else needs for the student.
    c.LOG_PERIOD = 20


def add_fgd_config(cfg):
    """FGD (Yang et al., CVPR 2022); defaults from the authors' RetinaNet configs
    (github.com/yzd-v/FGD, configs/distillers/fgd/fgd_retina_*.py). See losses/fgd.py."""
    c = cfg.DISTILL.FGD = CN()
    c.TEMPERATURE = 0.5  # T of the attention maps (FCOS config: 0.8)
    c.FG_WEIGHT = 0.001  # alpha (FCOS config: 0.0016)
    c.BG_WEIGHT = 0.0005  # beta (FCOS config: 0.0008)
    c.ATTENTION_WEIGHT = 0.0005  # gamma; the authors' loss class defaults to 0.001 (FCOS config: 0.0008)
    c.GLOBAL_WEIGHT = 0.000005  # lambda (FCOS config: 0.000008)
    # The GcBlock global relation term and its learned blocks; False: focal terms only (ours).
    c.GLOBAL = True
    # Distil the finest NUM_LEVELS FPN levels; 0 (or more than there are): all. The public
    # configs distil all five.
    c.NUM_LEVELS = 0


def add_pkd_config(cfg):
    """PKD (Cao et al., NeurIPS 2022); defaults from mmrazor's RetinaNet-student configs
    (configs/distill/mmdet/pkd/pkd_fpn_retina_x101_retina_r50_2x_coco.py). See losses/pkd.py."""
    c = cfg.DISTILL.PKD = CN()
    c.WEIGHT = 10.0  # mmrazor's RetinaNet and FCOS teachers; 6 for its Faster R-CNN and Swin ones
    # Standardise each channel over "batch_hw" (N, H, W: the public code) or "hw" (each
    # sample on its own: ours, the paper leaves the axes open).
    c.NORMALIZE_OVER = "batch_hw"
    # The finest NUM_LEVELS levels; 0: all. mmrazor's configs distil fpn0..fpn3 (P3-P6).
    c.NUM_LEVELS = 4


def add_cwd_config(cfg):
    """CWD (Shu et al., ICCV 2021); defaults from the authors' RetinaNet config
    (github.com/pppppM/mmdetection-distiller, configs/distillers/cwd/
    cwd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py). See losses/cwd.py."""
    c = cfg.DISTILL.CWD = CN()
    c.WEIGHT = 5.0  # authors' config; mmrazor's RetinaNet config: 10 on five levels
    c.TAU = 1.0  # both public configs
    # "channel": softmax over positions per channel (the paper's method); "spatial": softmax
    # over channels per position (the paper's point of comparison; ours as an option).
    c.NORMALIZE = "channel"
    # The finest NUM_LEVELS levels; 0: all. The authors' config distils P3-P6.
    c.NUM_LEVELS = 4


def is_detectron2_file(path):
    """Whether ``path`` is a file of the installed detectron2 package (its model-zoo configs)."""
    import detectron2

    package = os.path.dirname(os.path.realpath(detectron2.__file__))
    return bool(path) and os.path.realpath(path).startswith(package + os.sep)


def is_lazy_config_file(path):
    """A LazyConfig: a .py file, or a yaml one that LazyConfig.save wrote (a run's config.yaml
    of a .py config: lower-case ``model`` and ``train`` nodes, not yacs keys)."""
    if path.endswith(".py"):
        return True
    if not path.endswith((".yaml", ".yml")) or not os.path.isfile(path):
        return False

    class TagsIgnored(yaml.SafeLoader):
        """Reads the keys, builds no Python object a tag names (a file may come from anyone)."""

    TagsIgnored.add_multi_constructor("", lambda loader, suffix, node: None)
    with open(path) as f:
        try:
            top = yaml.load(f, Loader=TagsIgnored)
        except yaml.YAMLError:
            return False
    return isinstance(top, dict) and "model" in top and "train" in top
