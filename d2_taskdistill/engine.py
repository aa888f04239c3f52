"""Training loop pieces: a DefaultTrainer that picks evaluators by dataset type
and evaluates the teacher before distillation starts."""
import logging
import os

import torch

import detectron2.utils.comm as comm
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils.logger import setup_logger
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from . import compat
from .checkpoint import SafeCheckpointer, check_resume_agreement
from .config import YACS_SETTING_NAMES
from .data.config_datasets import (check_datasets, check_declared_datasets_used, check_registered,
                                   no_training_images_named)
from .hooks import (TEACHER_EVAL_FOLDER, DistillFeatures, NonFiniteLossHint, is_distill_model, refuse_amp_off_cuda,
                    unwrap, warn_unsynced_batch_norm)
from .modeling.teacher import build_teacher
from .schedule import apply_epoch_schedule
from .settings import using_setting_names

logger = logging.getLogger(__name__)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """COCO or Pascal VOC evaluator, chosen by the dataset's ``evaluator_type``."""
    return dataset_evaluator(dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))


def dataset_evaluator(dataset_name, output_dir):
    """COCO or Pascal VOC evaluator, chosen by the dataset's ``evaluator_type`` (LazyConfig:
    ``dataloader.evaluator = L(dataset_evaluator)(dataset_name=..., output_dir=...)``)."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if evaluator_type == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_dir,
                             use_fast_impl=bool(compat.HAS_CPP_OPS))
    if evaluator_type == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    raise ValueError(
        f"Dataset '{dataset_name}' (DATASETS.TEST) has evaluator_type={evaluator_type!r}; "
        "d2_taskdistill evaluates 'coco' or 'pascal_voc' datasets. Declare it in DATASETS.COCO "
        "or DATASETS.VOC (which set evaluator_type), or set "
        f"MetadataCatalog.get('{dataset_name}').evaluator_type to 'coco' or 'pascal_voc' where you register it."
    )


def setup_project_logger(output_dir):
    """This project's log lines in log.txt and on the console (rank 0), in detectron2's
    format; detectron2's default_setup configures only its own and fvcore's loggers."""
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="d2_taskdistill", abbrev_name="d2td")


def build_model_for_evaluation(cfg):
    """The model of ``cfg`` for inference: a distilled one without its teacher, so that the
    teacher's checkpoint need not exist where the student is evaluated."""
    from detectron2.modeling import build_model

    from .modeling.meta_arch import TaskDistillDetector

    if cfg.MODEL.META_ARCHITECTURE != "TaskDistillDetector":
        return build_model(cfg)
    model = TaskDistillDetector(cfg, with_teacher=False)
    model.to(torch.device(cfg.MODEL.DEVICE))
    return model


def usable_device(device, setting):
    """``device``, or the CPU when it asks for CUDA on a machine without it (``setting`` names
    the option in the warning)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("%s=%s but CUDA is not available: using cpu", setting, device)
        return "cpu"
    return device


def resolve_device(cfg):
    """Run on the CPU when the config asks for CUDA on a machine without it."""
    cfg.MODEL.DEVICE = usable_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")
    return cfg


# detectron2 v0.6's DefaultTrainer checkpoints no optimizer state (fixed upstream
# by DefaultTrainer.state_dict); DistillTrainer adds it where it is missing.
_D2_SAVES_OPTIMIZER = "state_dict" in DefaultTrainer.__dict__


class FileNamingMapper(DatasetMapper):
    """detectron2's DatasetMapper; an image it cannot read or map is named in the error (PIL's
    'image file is truncated' names none)."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except Exception as e:
            e.add_note(f"[image {dataset_dict.get('file_name')}: fix or remove it; DATASETS.CHECK_IMAGES 'all' "
                       "decodes every image of DATASETS.COCO/VOC before training]")
            raise


class DistillTrainer(NonFiniteLossHint, DefaultTrainer):
    """DefaultTrainer for plain and distilled detectors of this project."""

    non_finite_hint = ("A loss is not finite: lower SOLVER.BASE_LR or the distillation weights (DISTILL.*), or "
                       "set SOLVER.CLIP_GRADIENTS.ENABLED True.")

    def __init__(self, cfg):
        refuse_amp_off_cuda(cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE, "SOLVER.AMP.ENABLED", "MODEL.DEVICE")
        cfg = apply_epoch_schedule(cfg)  # train_net.py has applied it already: then a no-op
        with using_setting_names(YACS_SETTING_NAMES):
            super().__init__(cfg)

    def resume_or_load(self, resume=True):
        with using_setting_names(YACS_SETTING_NAMES):
            super().resume_or_load(resume)
        check_resume_agreement(self.checkpointer, resume, self.start_iter, "OUTPUT_DIR")

    def train(self):
        with using_setting_names(YACS_SETTING_NAMES):
            return super().train()

    @property
    def checkpointer(self):
        return self._checkpointer

    @checkpointer.setter
    def checkpointer(self, checkpointer):
        # DefaultTrainer.__init__ assigns its DetectionCheckpointer: it becomes an atomic one
        # as it is assigned, before build_hooks or anything else uses it.
        if not isinstance(checkpointer, SafeCheckpointer):
            checkpointer = SafeCheckpointer(checkpointer.model, checkpointer.save_dir, **checkpointer.checkpointables)
        self._checkpointer = checkpointer

    def build_hooks(self):
        cfg = self.cfg
        model = unwrap(self.model)
        teacher_origin = model.teacher_origin if is_distill_model(model) else None
        self.features = DistillFeatures(
            model, cfg.OUTPUT_DIR, check_datasets=lambda: check_datasets(cfg, teacher_origin),
            student_init=cfg.DISTILL.STUDENT_INIT, build_teacher=lambda: build_teacher(cfg),
            teacher_eval_at_start=cfg.DISTILL.TEACHER.EVAL_AT_START,
            allow_teacher_change=cfg.DISTILL.TEACHER.ALLOW_CHANGE, student_alone_run=cfg.DISTILL.STUDENT_ALONE_RUN,
            train_dataset=cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None,
            watchdog=(cfg.SOLVER.WATCHDOG_SECONDS, "SOLVER.WATCHDOG_SECONDS"),
            evaluate=lambda m: self.test_by_dataset(cfg, m, os.path.join(cfg.OUTPUT_DIR, TEACHER_EVAL_FOLDER)))
        self.features.add_to_checkpointer(self.checkpointer)
        timer, *rest = super().build_hooks()  # IterationTimer first
        rest = [self.checkpoints_kept(h) if isinstance(h, d2_hooks.PeriodicCheckpointer) else h for h in rest]
        return [*self.features.first_hooks(), timer, *self.features.step_hooks(self._trainer), *rest]

    def checkpoints_kept(self, checkpointer_hook):
        """DefaultTrainer's PeriodicCheckpointer with SOLVER.CHECKPOINT_MAX_TO_KEEP (0: all)."""
        kept = self.cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP
        if not kept:
            return checkpointer_hook
        return d2_hooks.PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=kept)

    @classmethod
    def test_by_dataset(cls, cfg, model, output_folder=None):
        """DefaultTrainer.test as {dataset: metrics}, also for a single test set; the evaluators
        write to ``output_folder`` (default: OUTPUT_DIR/inference)."""
        evaluators = None if output_folder is None else [
            cls.build_evaluator(cfg, name, os.path.join(output_folder, name)) for name in cfg.DATASETS.TEST]
        results = cls.test(cfg, model, evaluators)
        if len(cfg.DATASETS.TEST) == 1:  # DefaultTrainer.test unwraps a single dataset
            results = {cfg.DATASETS.TEST[0]: results}
        return results

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=FileNamingMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        warn_unsynced_batch_norm(model)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader, naming an image that fails to load (the DatasetCheck hook
        checks the datasets before training starts)."""
        check_declared_datasets_used(cfg)  # before the config's own training set is loaded
        check_registered(cfg.DATASETS.TRAIN)
        with no_training_images_named(cfg.DATASETS.TRAIN):
            return build_detection_train_loader(cfg, mapper=FileNamingMapper(cfg, is_train=True))

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD, or AdamW (SOLVER.OPTIMIZER), with the same parameter groups."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            return super().build_optimizer(cfg, model)
        if name != "ADAMW":
            raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}; choose 'SGD' or 'ADAMW'")
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        adamw = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return adamw(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    if not _D2_SAVES_OPTIMIZER:

        def state_dict(self):
            state = super().state_dict()
            state["_trainer"] = self._trainer.state_dict()
            return state

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            self._trainer.load_state_dict(state_dict["_trainer"])

    @property
    def last_eval_results(self):
        """The evaluation DefaultTrainer's EvalHook ran at the end of training."""
        return self._last_eval_results

    @property
    def teacher_results(self):
        """The teacher's {dataset: metrics} evaluated at the start (DISTILL.TEACHER.EVAL_AT_START)."""
        return self.features.teacher_results
