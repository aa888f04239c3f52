"""Training loop pieces: a DefaultTrainer that picks evaluators by dataset type
and evaluates the teacher before distillation starts."""
import json
import logging
import os

import torch
from torch.nn.parallel import DistributedDataParallel

import detectron2.utils.comm as comm
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from . import compat
from .checkpoint import SafeCheckpointer, TeacherIdentity
from .data.config_datasets import check_datasets, check_registered
from .modeling.inherit import inherit_from_teacher, parts_of
from .modeling.meta_arch import TaskDistillDetector
from .modeling.teacher import build_teacher, build_teacher_config

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
        "d2_taskdistill evaluates 'coco' or 'pascal_voc' datasets. Declare it in DATASETS.COCO "
        "or DATASETS.VOC (which set evaluator_type), or set "
        f"MetadataCatalog.get('{dataset_name}').evaluator_type to 'coco' or 'pascal_voc' where you register it."
    )


def setup_project_logger(cfg):
    """This project's log lines in log.txt and on the console (rank 0), in detectron2's
    format; detectron2's default_setup configures only its own and fvcore's loggers."""
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_taskdistill", abbrev_name="d2td")


def resolve_device(cfg):
    """Run on the CPU when the config asks for CUDA on a machine without it."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


# detectron2 v0.6's DefaultTrainer checkpoints no optimizer state (fixed upstream
# by DefaultTrainer.state_dict); DistillTrainer adds it where it is missing.
_D2_SAVES_OPTIMIZER = "state_dict" in DefaultTrainer.__dict__


# detectron2's DefaultTrainer writes metrics every 20 iterations (its PeriodicWriter).
WRITER_PERIOD = 20


class GradScalerMonitor(HookBase):
    """Logs the AMP grad scaler: its scale and the optimizer steps it skipped.

    detectron2's AMPTrainer skips a step silently when float16 gradients overflow; the scaler
    then lowers its scale (by its backoff factor), which is how a skipped step is seen here.
    The comparison runs on the device every step; the host reads the count every ``period``
    iterations and at the last one (reading the scale each step would stall the GPU).
    """

    def __init__(self, grad_scaler, period=WRITER_PERIOD):
        self.grad_scaler = grad_scaler
        self.period = period
        self.skipped_steps = 0
        self._skipped_on_device = 0
        self._scale_before = None
        self._first_iter_of_period = 0

    def _scale(self):
        # The scale tensor itself (GradScaler.get_scale() reads it to the host); None until
        # the scaler's first scale() call, when it is still its initial value.
        scale = self.grad_scaler._get_scale_async()
        return self.grad_scaler.get_scale() if scale is None else scale.detach().clone()

    def before_step(self):
        self._scale_before = self._scale()

    def after_step(self):
        scale = self._scale()
        self._skipped_on_device = self._skipped_on_device + (torch.as_tensor(scale) < self._scale_before).long()
        storage = get_event_storage()
        it = storage.iter
        trainer = getattr(self, "trainer", None)  # None when used outside a trainer
        last = trainer is not None and it + 1 == trainer.max_iter
        if (it + 1) % self.period and not last:
            return
        skipped = int(self._skipped_on_device)  # the host reads, once per period
        scale = float(scale)
        if skipped > self.skipped_steps:
            logger.warning(
                "Iterations %d-%d: float16 gradients overflowed; the grad scaler skipped %d optimizer "
                "step(s) and lowered its scale to %g (%d steps skipped in this run).",
                self._first_iter_of_period, it, skipped - self.skipped_steps, scale, skipped)
        self.skipped_steps = skipped
        self._first_iter_of_period = it + 1
        storage.put_scalar("amp/grad_scale", scale, smoothing_hint=False)
        storage.put_scalar("amp/skipped_steps", skipped, smoothing_hint=False)


class FileNamingMapper(DatasetMapper):
    """detectron2's DatasetMapper; an image it cannot read or map is named in the error (PIL's
    'image file is truncated' names none)."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except Exception as e:
            message = (f"{e} [image {dataset_dict.get('file_name')}: fix or remove it; DATASETS.CHECK_IMAGES "
                       "'all' decodes every image of DATASETS.COCO/VOC before training]")
            try:
                named = type(e)(message)
            except Exception:  # an exception type whose constructor takes other arguments
                named = RuntimeError(message)
            raise named from e


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class DistillTrainer(DefaultTrainer):
    """DefaultTrainer for plain and distilled detectors of this project."""

    def __init__(self, cfg):
        if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
            raise ValueError(
                f"SOLVER.AMP.ENABLED=True with MODEL.DEVICE={cfg.MODEL.DEVICE}: detectron2's AMPTrainer "
                "trains in float16 on CUDA only. Set SOLVER.AMP.ENABLED False to train on the CPU.")
        super().__init__(cfg)

    def build_hooks(self):
        # Called by DefaultTrainer.__init__ before anything saves or loads: the checkpointer
        # becomes an atomic one, and records the teacher (its PeriodicCheckpointer uses it).
        old = self.checkpointer
        self.checkpointer = SafeCheckpointer(old.model, old.save_dir, **old.checkpointables)
        model = unwrap(self.model)
        if isinstance(model, TaskDistillDetector):
            self.checkpointer.add_checkpointable(
                "teacher", TeacherIdentity(model.teacher_cfg.weights, self.cfg.DISTILL.TEACHER.ALLOW_CHANGE))
        hooks = super().build_hooks()
        if self.cfg.SOLVER.AMP.ENABLED:
            # Early in the list: after_step must run before the writers put out the values.
            hooks.insert(1, GradScalerMonitor(self._trainer.grad_scaler))
        return hooks

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=FileNamingMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        plain_bn = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
        if plain_bn and comm.get_world_size() > 1:
            logger.warning(
                "%d BatchNorm layers (NORM 'BN') with %d processes: each process keeps its own running "
                "statistics (DDP does not broadcast buffers here), checkpoints hold rank 0's and the "
                "evaluation at the end of training uses each rank's own. Set MODEL.RESNETS.NORM / "
                "MODEL.FPN.NORM to 'SyncBN' for one set of statistics.", plain_bn, comm.get_world_size())
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader, with every dataset checked before training starts."""
        check_registered(cfg.DATASETS.TRAIN)
        # Loads (and checks) the training sets.
        loader = build_detection_train_loader(cfg, mapper=FileNamingMapper(cfg, is_train=True))
        teacher_cfg = None
        if cfg.MODEL.META_ARCHITECTURE == "TaskDistillDetector":
            teacher_cfg = build_teacher_config(cfg)
        check_datasets(cfg, teacher_cfg)
        return loader

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

    def resume_or_load(self, resume=True):
        """detectron2's resume_or_load; then, on a fresh start only, DISTILL.STUDENT_INIT.

        A plain detector (no distillation) with DISTILL.STUDENT_INIT also starts from the
        teacher of DISTILL.TEACHER: the baseline that inheritance alone gives.
        """
        super().resume_or_load(resume=resume)
        if self.start_iter != 0 or parts_of(self.cfg.DISTILL.STUDENT_INIT) == []:
            return
        model = unwrap(self.model)
        if isinstance(model, TaskDistillDetector):
            inherit_from_teacher(model.student, model.teacher, self.cfg.DISTILL.STUDENT_INIT)
        else:
            teacher, _ = build_teacher(self.cfg)
            inherit_from_teacher(model, teacher, self.cfg.DISTILL.STUDENT_INIT)

    @property
    def last_eval_results(self):
        """The evaluation DefaultTrainer's EvalHook ran at the end of training."""
        return self._last_eval_results

    def train(self):
        model = unwrap(self.model)
        if (
            isinstance(model, TaskDistillDetector)
            and self.cfg.DISTILL.TEACHER.EVAL_AT_START
            and self.start_iter == 0
        ):
            self.evaluate_teacher(model.teacher)
        return super().train()

    def evaluate_teacher(self, teacher):
        """Evaluate the teacher on DATASETS.TEST; log and save its metrics."""
        results = self.test(self.cfg, teacher)
        if len(self.cfg.DATASETS.TEST) == 1:  # DefaultTrainer.test unwraps a single dataset
            results = {self.cfg.DATASETS.TEST[0]: results}
        self.teacher_results = results
        if comm.is_main_process():
            for dataset, metrics in results.items():
                bbox = metrics.get("bbox", metrics)
                logger.info("Teacher on %s: %s", dataset, ", ".join(f"{k}={v:.2f}" for k, v in bbox.items()))
            os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)
            with open(os.path.join(self.cfg.OUTPUT_DIR, "teacher_eval.json"), "w") as f:
                json.dump(results, f, indent=1)
        return results
