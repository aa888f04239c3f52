"""Distillation from a LazyConfig (.py): what detectron2's tools/lazyconfig_train_net.py does
(``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``, ``train``), with this project's
hooks, atomic checkpoints and teacher identity. ``train_net.py`` runs it for ``.py`` configs.
"""
import copy
import difflib
import inspect
import logging
import os

import detectron2.utils.comm as comm
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.engine import AMPTrainer, SimpleTrainer, defaults, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import compat
from .checkpoint import SafeCheckpointer, check_resume_agreement
from .data.config_datasets import check_dataset_names, register_declared_datasets
from .engine import usable_device
from .hooks import (TEACHER_EVAL_FOLDER, WRITER_PERIOD, DistillFeatures, NonFiniteLossHint, is_distill_model,
                    refuse_amp_off_cuda, unwrap, warn_unsynced_batch_norm)
from .modeling.inherit import parts_of
from .modeling.meta_arch import TaskDistillDetector
from .modeling.rcnn_outputs import is_rcnn, trains_masks
from .schedule import epoch_schedule, kept_images, log_schedule
from .settings import using_setting_names

logger = logging.getLogger(__name__)

REQUIRED_NODES = ("model", "dataloader", "optimizer", "lr_multiplier", "train")
# The config paths that errors name (d2_taskdistill.settings); the teacher's settings keep
# load_teacher's argument names, as it is written in model.teacher or train.student_init_teacher.
LAZY_SETTING_NAMES = {
    "teacher.allow_change": "train.allow_teacher_change",
    "teacher.allow_other_class_names": "train.allow_other_teacher_class_names",
    "losses": "model.losses",
    "student.num_classes": "model.student.num_classes",
    "student.rcnn_num_classes": "model.student.roi_heads.num_classes",
    "student.input_format": "model.input_format",
    "teacher.input_format": "model.teacher_input_format",
    "anchor_layout": "model.student.anchor_generator / the FPN of model.student and of the teacher's config",
    "fpn_channels": "model.student.backbone.out_channels",
    "student_init": "train.student_init",
    "loss_argument": "model.losses.{node}.{name}={value!r}",
    "norm": "the backbone's norm (norm of model.backbone.bottom_up.stem, .stages and model.backbone; under "
            "model.student in a distillation config)",
    "input_size": "the ResizeShortestEdge of dataloader.train.mapper.augmentations and dataloader.test.mapper.augmentations",
    "coco_datasets": "train.coco_datasets",
    "voc_datasets": "train.voc_datasets",
    "check_images": "train.check_images",
    "epochs": "train.epochs",
    "student_alone_run": "train.student_alone_run",
    "ims_per_batch": "dataloader.train.total_batch_size",
    "train_datasets": "dataloader.train.dataset.names",
    "filter_empty": "dataloader.train.dataset.filter_empty",
}
# Keys of ``train`` that this project reads beside lazyconfig_train_net's.
DISTILL_TRAIN_DEFAULTS = {
    "epochs": 0,  # as SOLVER.EPOCHS: > 0 sets the iterations from the training set (schedule.py)
    "student_init": "none",  # as DISTILL.STUDENT_INIT
    # For a model trained alone (the baseline with inheritance): the teacher its student_init
    # copies from, e.g. L(load_teacher)(config_file=..., weights=...). A distillation model's own
    # teacher is used otherwise.
    "student_init_teacher": None,
    "teacher_eval_at_start": False,  # as DISTILL.TEACHER.EVAL_AT_START
    "allow_teacher_change": False,  # as DISTILL.TEACHER.ALLOW_CHANGE
    "allow_other_teacher_class_names": False,  # as DISTILL.TEACHER.ALLOW_OTHER_CLASS_NAMES
    "student_alone_run": "",  # as DISTILL.STUDENT_ALONE_RUN
    # As DATASETS.COCO / VOC / CHECK_IMAGES: registered by load_lazy_config in every process, and
    # kept in the run's config.yaml, so that resume, evaluation, export and load_teacher(run=) find them.
    "coco_datasets": [],  # [[name, json_file, image_root], ...]
    "voc_datasets": [],  # [[name, dirname, split, year, [class names]], ...]
    "check_images": "sample",
    # As SOLVER.WATCHDOG_SECONDS: a step that runs longer than this (and 20 median steps) stops the
    # process with every thread's stack in the log; 0: off.
    "watchdog_seconds": 600,
}


def load_lazy_config(path, overrides=()):
    """The LazyConfig at ``path`` with ``key=value`` overrides, checked: it must have the nodes
    lazyconfig_train_net reads and a distillation model. Errors name the file and the fix."""
    try:
        cfg = LazyConfig.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config-file {path!r}: no such file (relative to {os.getcwd()})") from None
    malformed = [o for o in overrides if "=" not in o]
    if malformed:
        raise ValueError(f"Overrides {malformed} of the LazyConfig {path!r}: each is key=value "
                         "(e.g. train.max_iter=100), not a yaml KEY VALUE pair")
    if "train" in cfg:  # the project's train keys exist before overrides name them
        set_train_defaults(cfg)
    before = {key: OmegaConf.select(cfg, key, default=_MISSING) for key in override_keys(overrides)}
    unknown = {key: close_paths(cfg, key) for key, value in before.items()
               if value is _MISSING and not takes_argument(cfg, key)}
    if unknown:
        raise KeyError(f"Overrides of the LazyConfig {path!r} name keys it does not have: " + "; ".join(
            f"{key}" + (f" (did you mean {' or '.join(close)}?)" if close else "") for key, close in unknown.items())
            + ". Write +key=value to add a key on purpose.")
    lists_for_dicts = [o for o in overrides if o.split("=", 1)[1].lstrip().startswith("[")
                       and isinstance(before.get(o.split("=", 1)[0].strip()), DictConfig)]
    if lists_for_dicts:
        key = lists_for_dicts[0].split("=", 1)[0].strip()
        hint = (" The .py form of yaml's DISTILL.LOSSES [\"BCKD\", \"TID\"] is, in the .py, model.losses = "
                "{\"BCKD\": L(BCKD)(), \"TID\": L(TID)()} (each loss's settings as its keywords; see "
                "configs/digits/*.py); on the command line, one loss's setting: model.losses.TID.weight=2."
                if key.split(".")[-1] == "losses" else "")
        raise ValueError(f"Override {lists_for_dicts[0]!r} of the LazyConfig {path!r}: {key} is a dict "
                         f"(keys {list(before[key])}), which a list cannot replace.{hint}")
    try:
        cfg = LazyConfig.apply_overrides(cfg, [o.lstrip("+") for o in overrides])
    except Exception as e:  # omegaconf's and the override parser's errors name no file
        raise ValueError(f"Overrides {list(overrides)} do not apply to {path!r}: {type(e).__name__}: {e}") from e
    wrong_type = [f"{key}={OmegaConf.select(cfg, key)!r} (it was {old!r})" for key, old in before.items()
                  if isinstance(old, (int, float)) and not isinstance(OmegaConf.select(cfg, key), (int, float, type(None)))]
    if wrong_type:
        raise ValueError(f"Overrides of the LazyConfig {path!r} give numbers another type: {wrong_type}")
    missing = [n for n in REQUIRED_NODES if n not in cfg]
    if missing:
        raise ValueError(f"LazyConfig {path!r} has no {missing}: a training config defines {list(REQUIRED_NODES)}, "
                         "as detectron2's COCO-Detection/*.py do (see configs/digits/*.py)")
    for node in ("train", "test"):
        if node not in cfg.dataloader:
            raise ValueError(f"LazyConfig {path!r}: dataloader.{node} is missing")
    target = cfg.model.get("_target_", None)
    if target is None:
        raise ValueError(f"LazyConfig {path!r}: its `model` has no _target_: write model = L(SomeDetector)(...), "
                         "e.g. L(TaskDistillDetector)(student=..., teacher=L(load_teacher)(...), losses={...}) "
                         "(see configs/digits/*.py) or a detectron2 model-zoo model")
    target = locate(target) if isinstance(target, str) else target
    if not (isinstance(target, type) and issubclass(target, TaskDistillDetector)):
        # A teacher, or the student alone: trained as lazyconfig_train_net would, without distillation.
        logger.info("LazyConfig %s: its model (%s) is trained without a teacher", path, getattr(target, "__name__", target))
    set_train_defaults(cfg)
    with using_setting_names(LAZY_SETTING_NAMES):
        parts_of(cfg.train.student_init)  # a wrong choice fails before anything is built
        register_declared_datasets(*(OmegaConf.to_container(cfg.train[key]) for key in ("coco_datasets", "voc_datasets")),
                                   cfg.train.check_images)
    return cfg


SHAPE_SPEC_FIELDS = ("channels", "height", "width", "stride")


def save_portable(cfg, path):
    """LazyConfig.save of ``cfg`` in a form both detectron2s load (a run's config.yaml, an export):
    detectron2 would write ShapeSpecs as objects (v0.6's namedtuple and upstream's dataclass come
    back on the other version with ``channels=None``) and classes by their shortest import path
    (upstream's ``detectron2.modeling.FCOS`` does not exist in v0.6). Here a ShapeSpec is written
    as the call ``L(ShapeSpec)(channels=...)`` and every ``_target_`` by its defining module."""
    portable = copy.deepcopy(cfg)
    _make_portable(portable)
    LazyConfig.save(portable, path)


def _make_portable(node):
    from detectron2.layers import ShapeSpec

    if isinstance(node, DictConfig):
        keys = list(node.keys())
    elif isinstance(node, ListConfig):
        keys = range(len(node))
    else:
        return
    for key in keys:
        child = node._get_node(key)
        # upstream's dataclass is held as a structured DictConfig, v0.6's namedtuple as an object
        spec = child if isinstance(child, DictConfig) and OmegaConf.get_type(child) is ShapeSpec else child._value()
        if isinstance(spec, ShapeSpec) or spec is child:
            # by name: omegaconf would hold upstream's dataclass type as a structured config
            node[key] = {"_target_": "detectron2.layers.shape_spec.ShapeSpec",
                         **{f: getattr(spec, f) for f in SHAPE_SPEC_FIELDS if getattr(spec, f) is not None}}
        elif key == "_target_" and not isinstance(spec, str):
            node[key] = f"{spec.__module__}.{spec.__qualname__}"
        elif isinstance(child, (DictConfig, ListConfig)):
            _make_portable(child)


_MISSING = object()


def override_keys(overrides):
    """The keys ``key=value`` overrides set, but those added on purpose (``+key=value``)."""
    return [o.split("=", 1)[0].strip() for o in overrides if not o.startswith("+")]


def target_parameters(cfg, parent):
    """The arguments the ``_target_`` of node ``parent`` takes (None: no target; "*": any)."""
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    target = node.get("_target_", None) if OmegaConf.is_dict(node) else None
    target = locate(target) if isinstance(target, str) else target
    if target is None:
        return None
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let it decide
        return "*"
    return "*" if any(p.kind is p.VAR_KEYWORD for p in parameters.values()) else list(parameters)


def takes_argument(cfg, key):
    """Whether ``key`` names an argument that its node's ``_target_`` takes without the config
    listing it (e.g. ``model.test_score_thresh`` of detectron2's RetinaNet)."""
    parent, _, name = key.rpartition(".")
    parameters = target_parameters(cfg, parent)
    return parameters == "*" or name in (parameters or [])


def config_paths(node, prefix=""):
    """Every dotted path of a LazyConfig's nodes and values."""
    paths = []
    for key in node:
        path = f"{prefix}{key}"
        paths.append(path)
        child = node[key] if not OmegaConf.is_missing(node, key) else None
        if OmegaConf.is_dict(child):
            paths += config_paths(child, path + ".")
    return paths


def close_paths(cfg, key):
    """The existing paths nearest to ``key``: the same last name first, then by spelling."""
    parent = key.rpartition(".")[0]
    arguments = target_parameters(cfg, parent)
    paths = config_paths(cfg)
    if isinstance(arguments, list):
        paths += [f"{parent}.{a}" for a in arguments if a != "self"]
    same_name = [p for p in paths if p.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    return (same_name or difflib.get_close_matches(key, paths, n=2, cutoff=0.8))[:2]


def set_train_defaults(cfg):
    """The project's ``train`` keys (DISTILL_TRAIN_DEFAULTS) where the config does not set them."""
    for key, value in DISTILL_TRAIN_DEFAULTS.items():
        cfg.train.setdefault(key, value)


def train_short_side(cfg):
    """The largest short side dataloader.train's ResizeShortestEdge resizes to, or None."""
    mapper = cfg.dataloader.train.get("mapper", None)
    for augmentation in (mapper.get("augmentations", None) or []) if isinstance(mapper, DictConfig) else []:
        target = augmentation.get("_target_", None) if isinstance(augmentation, DictConfig) else None
        if (target if isinstance(target, str) else getattr(target, "__name__", "")).endswith("ResizeShortestEdge"):
            edge = augmentation.short_edge_length
            return max(edge) if isinstance(edge, (list, tuple, ListConfig)) else edge
    return None


def dataset_names(loader_cfg):
    names = loader_cfg.get("dataset", {}).get("names", [])
    return [names] if isinstance(names, str) else list(names)


def check_lazy_datasets_registered(cfg, nodes=("train", "test")):
    """Every dataset the loaders name is registered, or an error saying where to register it."""
    from detectron2.data import DatasetCatalog

    for node in nodes:
        missing = [n for n in dataset_names(cfg.dataloader[node]) if n not in DatasetCatalog.list()]
        if missing:
            raise KeyError(
                f"datasets {missing} (dataloader.{node}.dataset.names) are not registered: register them in the "
                ".py config itself (e.g. detectron2's register_coco_instances, guarded by `if name not in "
                "DatasetCatalog.list()`), so that every worker does. A run's config.yaml keeps no registrations: "
                "resume or evaluate with the .py config, with train.output_dir set to the run's.")


def apply_lazy_epoch_schedule(cfg):
    """``train.epochs`` (0: off) as iterations (d2_taskdistill/schedule.py): ``train.max_iter``,
    the milestones and ``num_updates`` of ``lr_multiplier.scheduler``, the warm-up fraction,
    ``train.eval_period`` and ``train.checkpointer`` (period, max_to_keep), written into ``cfg``; a second call
    changes nothing."""
    epochs = cfg.train.get("epochs", 0)
    if not epochs:
        return cfg
    with using_setting_names(LAZY_SETTING_NAMES):
        multiplier = cfg.lr_multiplier
        scheduler = multiplier.get("scheduler", None)
        if scheduler is None or "milestones" not in scheduler or "warmup_length" not in multiplier:
            raise ValueError(
                "train.epochs sets the lr steps of lr_multiplier = L(WarmupParamScheduler)(scheduler="
                "L(MultiStepParamScheduler)(values=..., milestones=..., num_updates=...), warmup_length=...), as "
                "detectron2's model zoo writes it; this config's lr_multiplier is another kind: remove "
                "train.epochs and set train.max_iter and the schedule yourself")
        check_lazy_datasets_registered(cfg, nodes=("train",))
        loader = cfg.dataloader.train
        num_images = kept_images(tuple(dataset_names(loader)), bool(loader.dataset.get("filter_empty", True)))
        checkpointer = cfg.train.checkpointer
        schedule = epoch_schedule(epochs, num_images, loader.total_batch_size,
                                  round(multiplier.warmup_length * cfg.train.max_iter), checkpointer.period,
                                  checkpointer.get("max_to_keep", None))
        max_iter = schedule["max_iter"]
        cfg.train.max_iter = max_iter
        scheduler.milestones = list(schedule["steps"])
        scheduler["values"] = list(scheduler["values"])[:len(schedule["steps"]) + 1]  # one value per phase
        scheduler.num_updates = max_iter
        multiplier.warmup_length = schedule["warmup_iters"] / max_iter
        cfg.train.eval_period = schedule["eval_period"]
        checkpointer.period = schedule["checkpoint_period"]
        checkpointer.max_to_keep = schedule["checkpoints_kept"]
        log_schedule(epochs, num_images, loader.total_batch_size, {
            "train.max_iter": max_iter, "lr_multiplier.scheduler.milestones": list(schedule["steps"]),
            "warm-up iterations": schedule["warmup_iters"], "train.checkpointer.period": schedule["checkpoint_period"],
            "train.checkpointer.max_to_keep": schedule["checkpoints_kept"], "train.eval_period": schedule["eval_period"]})
    return cfg


def evaluate(cfg, model, output_dir=None):
    """{dataset: metrics} of ``model`` on dataloader.test with dataloader.evaluator, which writes to
    ``output_dir`` where it takes one (default: its own)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    evaluator = cfg.dataloader.evaluator
    if output_dir is not None and "output_dir" in evaluator:
        evaluator = evaluator.copy()
        evaluator.output_dir = output_dir
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    names = dataset_names(cfg.dataloader.test)
    return {names[0] if len(names) == 1 else ",".join(names): results}


def build_train_loader(cfg):
    """``instantiate(dataloader.train)``. Where this detectron2's yacs loader seeds its
    TrainingSampler with SEED (upstream main), a loader config without a sampler gets
    ``TrainingSampler(len(dataset), seed=train.seed)`` as well: a .py config then orders its data
    as its yaml twin does on either detectron2 (v0.6 draws the seed from the seeded RNG on both)."""
    loader = cfg.dataloader.train
    if loader.get("sampler", None) is not None or not compat.yacs_train_sampler_takes_seed():
        return instantiate(loader)
    from detectron2.data.samplers import TrainingSampler

    target = loader._target_
    target = locate(target) if isinstance(target, str) else target
    kwargs = {key: instantiate(loader[key]) for key in loader if key != "_target_"}
    kwargs["sampler"] = TrainingSampler(len(kwargs["dataset"]), seed=int(cfg.train.get("seed", -1)))
    return target(**kwargs)


def resolve_device(cfg):
    """Run on the CPU when train.device asks for CUDA on a machine without it."""
    cfg.train.device = usable_device(str(cfg.train.get("device", "cuda")), "train.device")
    return cfg


def build_model(cfg, with_teacher=True):
    """``instantiate(cfg.model)`` on ``train.device``; without the teacher (inference only) its
    config is not even read, so no teacher checkpoint needs to exist."""
    model_cfg = cfg.model
    if not with_teacher:
        model_cfg = model_cfg.copy()
        model_cfg.teacher = None
    with using_setting_names(LAZY_SETTING_NAMES):
        model = instantiate(model_cfg)
        warn_unsynced_batch_norm(model)
    return model.to(cfg.train.device)


LAZY_NON_FINITE_HINT = "A loss is not finite: lower optimizer.lr or the weights of model.losses."


class _SimpleTrainer(NonFiniteLossHint, SimpleTrainer):
    non_finite_hint = LAZY_NON_FINITE_HINT


class _AMPTrainer(NonFiniteLossHint, AMPTrainer):
    non_finite_hint = LAZY_NON_FINITE_HINT


def mask_head_setting(detector, key):
    """(the LazyConfig key that gives ``detector`` a mask head, how to take it off); None without one."""
    if not trains_masks(detector):
        return None
    return (f"{key}.roi_heads.mask_head",
            f"delete {key}.roi_heads' mask_in_features, mask_pooler and mask_head (as configs/digits/lazy_common.py's "
            "digits_faster_rcnn does)")


def check_loader_keeps_masks(cfg, mask_head):
    """A mask head's DatasetMapper must keep the masks: without use_instance_mask the loss fails at
    the first step, far from the setting."""
    mapper = cfg.dataloader.train.get("mapper", None)
    target = mapper.get("_target_", None) if isinstance(mapper, DictConfig) else None
    target = locate(target) if isinstance(target, str) else target
    if mask_head is None or not (isinstance(target, type) and issubclass(target, DatasetMapper)):
        return
    if not mapper.get("use_instance_mask", False):
        raise ValueError(
            f"{mask_head[0]} trains a mask head, but dataloader.train.mapper.use_instance_mask is not True: the "
            "loader drops the masks. Set dataloader.train.mapper.use_instance_mask=True (and instance_mask_format="
            "'bitmask' for RLE masks), or train boxes only: " + mask_head[1])


def num_classes_setting(detector, key):
    """(the LazyConfig key of ``detector``'s class count, the count); an R-CNN's is its ROI heads'."""
    if is_rcnn(detector):
        return f"{key}.roi_heads.num_classes", detector.roi_heads.num_classes
    if hasattr(detector, "num_classes"):
        return f"{key}.num_classes", detector.num_classes
    return None, None


class LazyDistillTrainer:
    """Trains ``cfg.model`` (a TaskDistillDetector) as lazyconfig_train_net's do_train does:
    model, optimizer and data loader built in that order (the yacs DistillTrainer's order, so
    that the same seed gives the same run), SimpleTrainer or AMPTrainer, then hooks. A plain
    dense detector (the student alone, the baseline of a comparison) trains the same way,
    without the teacher's hooks."""

    def __init__(self, cfg):
        with using_setting_names(LAZY_SETTING_NAMES):
            self._build(cfg)

    def _build(self, cfg):
        self.cfg = cfg
        set_train_defaults(cfg)
        apply_lazy_epoch_schedule(cfg)  # train_net.py has applied it already: then a no-op
        amp = cfg.train.get("amp", {}).get("enabled", False)
        refuse_amp_off_cuda(amp, cfg.train.device, "train.amp.enabled", "train.device")
        check_lazy_datasets_registered(cfg)
        model = build_model(cfg)
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        data_loader = build_train_loader(cfg)
        self.unwrapped_model = model  # the detector itself (DDP wraps self.model)
        # defaults.create_ddp_model: the compat layer makes it accept CPU (gloo) workers.
        model = defaults.create_ddp_model(model, **cfg.train.get("ddp", {}))
        self._trainer = (_AMPTrainer if amp else _SimpleTrainer)(model, data_loader, optimizer)
        self.checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trainer=self._trainer)
        self.features = self.build_features()
        self.features.add_to_checkpointer(self.checkpointer)
        self._trainer.register_hooks(self.build_hooks())

    @property
    def model(self):
        return self._trainer.model

    @property
    def storage(self):
        return self._trainer.storage

    def build_features(self):
        cfg, model = self.cfg, self.unwrapped_model
        distill = is_distill_model(model)
        teacher_origin = model.teacher_origin if distill else None
        student, key = (model.student, "model.student") if distill else (model, "model")
        student_setting, mask_head = num_classes_setting(student, key), mask_head_setting(student, key)
        check_loader_keeps_masks(cfg, mask_head)
        teacher_node = cfg.train.student_init_teacher
        if parts_of(cfg.train.student_init) and not distill and teacher_node is None:
            raise ValueError(
                f"train.student_init={cfg.train.student_init!r} for a model trained alone: set "
                "train.student_init_teacher = L(load_teacher)(config_file=..., weights=...), the teacher to copy from")
        return DistillFeatures(
            model, cfg.train.output_dir,
            check_datasets=lambda: check_dataset_names(
                dataset_names(cfg.dataloader.train), dataset_names(cfg.dataloader.test), student_setting, teacher_origin,
                settings=("dataloader.train.dataset.names", "dataloader.test.dataset.names"),
                input_short_side=train_short_side(cfg), allow_other_teacher_names=cfg.train.allow_other_teacher_class_names,
                mask_head=mask_head),
            student_init=cfg.train.student_init, build_teacher=lambda: instantiate(teacher_node),
            teacher_eval_at_start=cfg.train.teacher_eval_at_start,
            allow_teacher_change=cfg.train.allow_teacher_change, student_alone_run=cfg.train.student_alone_run,
            evaluate=lambda m: evaluate(cfg, m, os.path.join(cfg.train.output_dir, TEACHER_EVAL_FOLDER)),
            train_dataset=next(iter(dataset_names(cfg.dataloader.train)), None),
            watchdog=(cfg.train.watchdog_seconds, "train.watchdog_seconds"))

    def build_hooks(self):
        """lazyconfig_train_net's hooks, with the project's features around them."""
        cfg = self.cfg
        result = [*self.features.first_hooks(), hooks.IterationTimer(),
                  *self.features.step_hooks(self._trainer),
                  hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier))]
        if comm.is_main_process():
            result.append(hooks.PeriodicCheckpointer(self.checkpointer, **cfg.train.checkpointer))
        eval_period = cfg.train.get("eval_period", 0)
        result.append(hooks.EvalHook(eval_period, lambda: self._evaluate()))
        if comm.is_main_process():
            result.append(hooks.PeriodicWriter(defaults.default_writers(cfg.train.output_dir, cfg.train.max_iter),
                                               period=cfg.train.get("log_period", WRITER_PERIOD)))
        return result

    def _evaluate(self):
        self.last_eval_results = evaluate(self.cfg, unwrap(self.model))
        # As DefaultTrainer.test: one dataset's metrics go to the event storage unwrapped.
        results = self.last_eval_results
        return next(iter(results.values())) if len(results) == 1 else results

    def resume_or_load(self, resume=True):
        """As DefaultTrainer's: the last checkpoint of train.output_dir with ``resume`` (when one
        exists), else train.init_checkpoint (model weights only)."""
        with using_setting_names(LAZY_SETTING_NAMES):
            self.checkpointer.resume_or_load(self.cfg.train.init_checkpoint, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self._trainer.iter + 1
        else:
            self.start_iter = 0
        check_resume_agreement(self.checkpointer, resume, self.start_iter, "train.output_dir")

    def train(self):
        with using_setting_names(LAZY_SETTING_NAMES):
            self._trainer.train(getattr(self, "start_iter", 0), self.cfg.train.max_iter)

    @property
    def teacher_results(self):
        return self.features.teacher_results


def evaluate_only(cfg, resume=False):
    """--eval-only: the student of train.init_checkpoint (or, with ``resume``, the last
    checkpoint of train.output_dir), without building the teacher."""
    check_lazy_datasets_registered(cfg, nodes=("test",))
    model = build_model(cfg, with_teacher=False)
    SafeCheckpointer(model, cfg.train.output_dir).resume_or_load(cfg.train.init_checkpoint, resume=resume)
    return evaluate(cfg, model)
