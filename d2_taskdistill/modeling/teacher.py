"""Build the frozen teacher from its own config file and checkpoint."""
import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from ..config import load_config

logger = logging.getLogger(__name__)

DENSE_ARCHITECTURES = ("RetinaNet", "FCOS")


def resolve_teacher_config_file(name):
    """A yaml path, else a detectron2 model-zoo config name."""
    if not name:
        raise ValueError(
            "DISTILL.TEACHER.CONFIG_FILE is empty: set it to the teacher's yaml config, a path "
            "or a detectron2 model-zoo name such as 'COCO-Detection/retinanet_R_101_FPN_3x.yaml'."
        )
    if os.path.isfile(name):
        return name
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise FileNotFoundError(
            f"DISTILL.TEACHER.CONFIG_FILE={name!r} is neither a file (relative to {os.getcwd()}) "
            "nor a detectron2 model-zoo config name."
        ) from None


def build_teacher_config(cfg):
    teacher_cfg = load_config(
        resolve_teacher_config_file(cfg.DISTILL.TEACHER.CONFIG_FILE), cfg.DISTILL.TEACHER.OPTS
    )
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_cfg.MODEL.WEIGHTS = cfg.DISTILL.TEACHER.WEIGHTS
    arch = teacher_cfg.MODEL.META_ARCHITECTURE
    if arch not in DENSE_ARCHITECTURES:
        raise ValueError(
            f"Teacher config {cfg.DISTILL.TEACHER.CONFIG_FILE!r} has MODEL.META_ARCHITECTURE={arch!r}; "
            f"the teacher must be one of {DENSE_ARCHITECTURES}."
        )
    return teacher_cfg


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps what ``load()`` found incompatible, instead of only
    logging it: the teacher must load completely."""

    incompatible = None

    def _load_model(self, checkpoint):  # fvcore's extension point, called by load()
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_teacher_weights(teacher, weights):
    """Load every key of ``weights`` into ``teacher``; anything that does not load is an error."""
    if not weights:
        raise ValueError(
            "DISTILL.TEACHER.WEIGHTS is empty: a teacher without trained weights has nothing to "
            "teach. Set it to the teacher's checkpoint (.pth or model-zoo .pkl)."
        )
    try:
        local = PathManager.get_local_path(weights)
    except Exception as e:  # download failures surface with the setting named
        raise FileNotFoundError(f"DISTILL.TEACHER.WEIGHTS={weights!r} could not be fetched: {e}") from e
    if not os.path.isfile(local):
        raise FileNotFoundError(
            f"DISTILL.TEACHER.WEIGHTS={weights!r}: no such file. Train the teacher first "
            "(train_net.py with its config) or point to its checkpoint."
        )
    checkpointer = _RecordingCheckpointer(teacher)
    checkpointer.load(local, checkpointables=[])
    incompatible = checkpointer.incompatible
    if incompatible is None:
        raise KeyError(f"DISTILL.TEACHER.WEIGHTS={weights!r} holds no model weights")
    problems = []
    wrong_shape = {k for k, _, _ in incompatible.incorrect_shapes}
    missing = sorted(set(incompatible.missing_keys) - wrong_shape)
    if missing:
        problems.append(f"missing keys: {missing}")
    if incompatible.unexpected_keys:
        problems.append(f"unexpected keys: {sorted(incompatible.unexpected_keys)}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"shape mismatches: {shapes}")
    if problems:
        raise KeyError(
            f"Teacher weights DISTILL.TEACHER.WEIGHTS={weights!r} do not match the teacher built from "
            f"DISTILL.TEACHER.CONFIG_FILE: " + "; ".join(problems)
        )
    num_tensors = len(teacher.state_dict())
    logger.info("Loaded teacher weights from %s (%d tensors)", weights, num_tensors)


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(cfg):
    """The teacher of ``cfg``: built, loaded, frozen and in eval mode, with its config."""
    teacher_cfg = build_teacher_config(cfg)
    teacher = build_model(teacher_cfg)
    load_teacher_weights(teacher, teacher_cfg.MODEL.WEIGHTS)
    return freeze(teacher), teacher_cfg
