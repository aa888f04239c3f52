"""TaskDistillDetector: a frozen teacher and a trainable student, side by side."""
import logging
from collections.abc import Mapping

import torch
import torch.nn as nn

from detectron2.config import configurable, instantiate
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from ..config import YACS_SETTING_NAMES
from ..losses import DISTILL_LOSS_REGISTRY, build_distill_loss
from ..losses.registry import registered_loss
from ..settings import setting, using_setting_names
from .dense_outputs import DENSE_DETECTOR_ATTRIBUTES, run_dense_detector
from .inherit import parts_of
from .level_pairs import LevelSubset, shared_level_indices
from .rcnn_outputs import RCNN_DETECTOR_ATTRIBUTES, is_rcnn, rcnn_levels, run_rcnn_detector
from .teacher import DISTILLABLE_ARCHITECTURES, build_teacher

logger = logging.getLogger(__name__)


def student_config(cfg):
    """The student's own config: ``cfg`` with the student's meta-architecture."""
    arch = cfg.DISTILL.STUDENT_ARCHITECTURE
    if arch not in DISTILLABLE_ARCHITECTURES:
        raise ValueError(f"DISTILL.STUDENT_ARCHITECTURE={arch!r}; must be one of {DISTILLABLE_ARCHITECTURES}")
    student_cfg = cfg.clone()
    student_cfg.defrost()
    student_cfg.MODEL.META_ARCHITECTURE = arch
    return student_cfg


def check_detector(detector, role, losses):
    """A clear error when ``detector`` lacks what running it for distillation reads."""
    needed = RCNN_DETECTOR_ATTRIBUTES if is_rcnn(detector) else DENSE_DETECTOR_ATTRIBUTES
    missing = [a for a in needed if getattr(detector, a, None) is None]
    if isinstance(detector, nn.Module) and not missing:
        return
    what = f"lacks {missing}, which" if isinstance(detector, nn.Module) else "is not an nn.Module; "
    raise TypeError(
        f"The {role} ({type(detector).__module__}.{type(detector).__name__}) is not a detector that "
        f"d2_taskdistill can distil: it {what} running it for the losses {list(losses)} reads. Use "
        "detectron2's RetinaNet, FCOS or GeneralizedRCNN with an RPN (Faster/Mask R-CNN), or a subclass "
        "with the same attributes."
    )


def distilled_levels(detector):
    """The FPN levels a detector's feature losses read: its dense head's, or its RPN's."""
    return rcnn_levels(detector) if is_rcnn(detector) else list(detector.head_in_features)


def num_classes_of(detector):
    return detector.roi_heads.num_classes if is_rcnn(detector) else detector.num_classes


def yacs_loss_factory(name, cfg):
    registered_loss(name)  # before two detectors are built in vain
    return lambda student_shapes, teacher_shapes: build_distill_loss(name, cfg, student_shapes, teacher_shapes)


def build_loss_from_spec(name, spec, student_shapes, teacher_shapes):
    """A distillation loss from a built module, a LazyConfig ``L(Loss)(...)`` (or a dict with
    ``_target_``) completed with both detectors' shapes, or a factory of the shapes."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, Mapping) and "_target_" in spec:
        spec = {**spec, "student_shapes": student_shapes, "teacher_shapes": teacher_shapes}
        try:
            return instantiate(spec)
        except TypeError as e:  # e.g. an argument the loss does not take
            raise TypeError(f"Distillation loss {name!r} could not be built from its config: {e}") from e
    if callable(spec):
        return spec(student_shapes, teacher_shapes)
    raise TypeError(
        f"Distillation loss {name!r} is a {type(spec).__name__}; give a loss module, its LazyConfig "
        "(e.g. L(TID)(weight=1.0)) or a callable (student_shapes, teacher_shapes) -> loss.")


def check_loss_name(name, loss):
    """A registered loss keeps its registered name as its key in ``losses`` (``<name>_<suffix>`` for
    a second one): logs, metrics and checkpoint keys (distill_losses.<key>.*) are named by it, so
    a typo such as {"TDI": L(TID)()} would train under a wrong name."""
    registered = [n for n, cls in DISTILL_LOSS_REGISTRY if cls is type(loss)]
    if registered and not any(name == n or name.startswith(n + "_") for n in registered):
        raise ValueError(
            f"{setting('losses')}: the key {name!r} holds a {type(loss).__name__} loss, registered as "
            f"{registered[0]!r}: name it {registered[0]!r} (or {registered[0] + '_2'!r} etc. for a second "
            "one), the name its logs, metrics and checkpoint keys use")


def anchor_layout(detector):
    """What must match for location-by-location comparison of two detectors (an R-CNN's: its RPN's)."""
    generator = detector.proposal_generator.anchor_generator if is_rcnn(detector) else detector.anchor_generator
    return {
        "head_in_features": distilled_levels(detector),
        "strides": list(generator.strides),
        "anchors per location": list(generator.num_cell_anchors),
        # Rounded to 1e-3 px: configs write sizes like 32 * 2**(1/3) with varying precision.
        "cell anchors": [tuple(tuple(round(v, 3) for v in box) for box in a.tolist()) for a in generator.cell_anchors],
        "padding (size_divisibility)": detector.backbone.size_divisibility,
    }


def layout_free_losses():
    """The registered losses that compare features only: they run across anchor layouts."""
    return sorted(name for name, loss in DISTILL_LOSS_REGISTRY
                  if not getattr(loss, "needs_same_layout", False) and not getattr(loss, "two_stage_only", False))


def losses_between(two_stage):
    """The registered losses that run between two detectors of one kind: two R-CNNs (``two_stage``:
    feature, RPN and ROI head losses) or two dense detectors (all but the ROI heads')."""
    if two_stage:
        return sorted(name for name, loss in DISTILL_LOSS_REGISTRY
                      if not getattr(loss, "needs_same_layout", False) or getattr(loss, "distils_rpn", False))
    return sorted(name for name, loss in DISTILL_LOSS_REGISTRY if not getattr(loss, "two_stage_only", False))


def rpn_losses():
    """The registered head losses that distil an R-CNN's RPN (a one-class dense head)."""
    return sorted(name for name, loss in DISTILL_LOSS_REGISTRY if getattr(loss, "distils_rpn", False))


def check_losses_compatible(student, teacher, losses):
    """ValueError unless ``losses`` ({name: a loss or its class}) can distil ``teacher`` into ``student``."""
    needs_layout = [n for n, l in losses.items() if getattr(l, "needs_same_layout", False)]
    rcnn = [role for role, d in (("student", student), ("teacher", teacher)) if is_rcnn(d)]
    two_stage_only = [n for n, l in losses.items() if getattr(l, "two_stage_only", False)]
    if two_stage_only and len(rcnn) < 2:
        dense = [role for role in ("student", "teacher") if role not in rcnn]
        raise ValueError(
            f"Losses {two_stage_only} distil an R-CNN's ROI heads into another's: the teacher and the student must "
            f"both be two-stage (GeneralizedRCNN), and the {' and '.join(dense)} {'is' if len(dense) == 1 else 'are'} "
            f"not. Use losses that compare features ({layout_free_losses()}) in {setting('losses')} for this pair.")
    if rcnn and needs_layout:
        two_stage = f"The {' and '.join(rcnn)} {'is' if len(rcnn) == 1 else 'are'} two-stage (GeneralizedRCNN)"
        not_on_rpn = [n for n in needs_layout if not getattr(losses[n], "distils_rpn", False)]
        if not_on_rpn:
            raise ValueError(
                f"{two_stage}: losses {not_on_rpn} compare dense heads location by location, which an R-CNN does "
                f"not have. Use losses that compare features ({layout_free_losses()}), or {rpn_losses()} on the "
                f"RPN of two R-CNNs, in {setting('losses')}.")
        if len(rcnn) == 1:
            raise ValueError(
                f"{two_stage}: losses {needs_layout} distil an R-CNN's RPN, a one-class dense head, into the RPN of "
                f"another R-CNN: the teacher and the student must both be R-CNNs. Use losses that compare features "
                f"({layout_free_losses()}) in {setting('losses')} for this pair.")
    check_compatible(student, teacher, bool(needs_layout), needs_layout or list(losses))


def check_compatible(student, teacher, needs_same_layout, loss_names):
    student_classes, teacher_classes = num_classes_of(student), num_classes_of(teacher)
    if student_classes != teacher_classes:
        origin = getattr(teacher, "teacher_origin", None)
        weights = f" ({origin.weights_setting}={origin.weights!r})" if origin is not None else ""
        raise ValueError(
            f"Teacher has {teacher_classes} classes, student {student_classes}: the losses compare "
            f"class outputs, so both must know the same classes. The teacher's weights{weights} were trained "
            f"for {teacher_classes}: use a teacher trained on the student's dataset, or set "
            f"{setting('student.rcnn_num_classes' if is_rcnn(student) else 'student.num_classes')} to "
            f"{teacher_classes} if the student trains on the teacher's classes."
        )
    s_layout, t_layout = anchor_layout(student), anchor_layout(teacher)
    # Feature losses compare the levels of equal stride (level_pairs); there must be some.
    keys = list(s_layout) if needs_same_layout else ["padding (size_divisibility)"]
    if not set(s_layout["strides"]) & set(t_layout["strides"]):
        keys = ["strides", *keys]
    for key in keys:
        if s_layout[key] != t_layout[key]:
            across = ""
            if needs_same_layout:  # e.g. an anchor-free FCOS teacher cannot match a RetinaNet's anchors
                across = (f" With a teacher whose layout cannot match (student {type(student).__name__}, teacher "
                          f"{type(teacher).__name__}), use losses that compare features only: {layout_free_losses()}.")
            raise ValueError(
                f"Teacher and student differ in {key} (student {s_layout[key]}, teacher "
                f"{t_layout[key]}), which losses {loss_names} need equal. Align {setting('anchor_layout')}." + across
            )


def loss_description(name, loss):
    """'NAME (weight=1.0, ...)': the loss and its weights, for the log."""
    weights = {k: v for k, v in vars(loss).items() if "weight" in k and isinstance(v, (int, float))}
    return f"{name} ({', '.join(f'{k}={v}' for k, v in weights.items())})"


@META_ARCH_REGISTRY.register()
class TaskDistillDetector(nn.Module):
    """Student + frozen teacher + distillation losses, for yacs and LazyConfig alike.

    yacs: ``MODEL.META_ARCHITECTURE: TaskDistillDetector`` with ``DISTILL.*`` (``from_config``).
    LazyConfig: ``L(TaskDistillDetector)(student=<a dense detector>, teacher=L(load_teacher)(...),
    losses={"TID": L(TID)(weight=1.0), ...})``: the losses are built here, once both
    detectors exist, because their adapters need both FPN widths.

    The teacher is held outside the module tree: it is not in ``parameters()``,
    ``state_dict()`` (so not in checkpoints), the optimizer or DDP, and ``train()``
    does not reach it; ``.to()`` and the like move it with the student. Inference runs the
    student alone; ``teacher=None`` builds a model for inference only (``--eval-only``).
    """

    @configurable
    def __init__(self, *, student, teacher, losses, input_format=None, teacher_input_format=None,
                 fcos_iou_thresholds=(0.4, 0.5), teacher_amp=False, setting_names=None):
        """
        Args:
            student: a dense detector (detectron2's RetinaNet or FCOS, or a subclass), or a
                GeneralizedRCNN with an RPN (Faster/Mask R-CNN: the feature losses, and BCKD on the RPN).
            teacher: a frozen detector of those kinds with its weights (:func:`load_teacher`), or None.
            losses: {name: a DistillLoss, or its LazyConfig (``L(TID)(...)``), or a callable
                ``(student_shapes, teacher_shapes) -> DistillLoss``}.
            input_format / teacher_input_format: "BGR" or "RGB"; default: the detector's own
                ``input_format`` attribute, else the teacher's config (``load_teacher``), else BGR.
            setting_names: what errors call the settings (d2_taskdistill.settings); default: the
                caller's vocabulary.
        """
        super().__init__()
        with using_setting_names(setting_names):
            self._build(student, teacher, losses, input_format, teacher_input_format, fcos_iou_thresholds, teacher_amp)

    def _build(self, student, teacher, losses, input_format, teacher_input_format, fcos_iou_thresholds, teacher_amp):
        if not losses:
            raise ValueError(
                f"TaskDistillDetector has no distillation losses ({setting('losses')}): name at least one "
                "(e.g. TID) or train the student's own architecture."
            )
        check_detector(student, "student", losses)
        self.student = student
        self.input_format = input_format or getattr(student, "input_format", None) or "BGR"
        self.fcos_thresholds = tuple(fcos_iou_thresholds)
        self.teacher_amp = teacher_amp
        self.__dict__["teacher"] = teacher  # not a submodule, on purpose (see class doc)
        self.distill_losses = nn.ModuleDict()
        if teacher is None:  # inference only: the losses need the teacher's shapes
            logger.info("Built without the teacher, for inference: the student runs alone, and the "
                        "distillation adapters (distill_losses.*) of a checkpoint are not used.")
            self.teacher_needs_bgr_flip = False
            self.level_pairs = None
            return
        check_detector(teacher, "teacher", losses)
        source = getattr(teacher, "teacher_origin", None)  # set by load_teacher / build_teacher
        teacher_format = teacher_input_format or getattr(source, "input_format", None) or getattr(
            teacher, "input_format", None) or "BGR"
        if {self.input_format, teacher_format} - {"BGR", "RGB"}:
            raise ValueError(
                f"Input formats {self.input_format} (student, {setting('student.input_format')}) / {teacher_format} "
                f"(teacher, {setting('teacher.input_format')}): only BGR and RGB are supported"
            )
        self.teacher_needs_bgr_flip = self.input_format != teacher_format

        s_shapes = [self.student.backbone.output_shape()[f] for f in distilled_levels(self.student)]
        t_shapes = [teacher.backbone.output_shape()[f] for f in distilled_levels(teacher)]
        self.level_pairs = None  # (student indices, teacher indices) where the strides differ
        s_strides, t_strides = [x.stride for x in s_shapes], [x.stride for x in t_shapes]
        if s_strides != t_strides:
            self.level_pairs = shared_level_indices(s_strides, t_strides)
            if not self.level_pairs[0]:
                raise ValueError(
                    f"Teacher and student share no FPN stride (student {s_strides}, teacher {t_strides}): the "
                    f"losses compare the levels of equal stride. Align {setting('anchor_layout')}.")
            s_shapes = [s_shapes[i] for i in self.level_pairs[0]]
            t_shapes = [t_shapes[i] for i in self.level_pairs[1]]
            s_names, t_names = distilled_levels(self.student), distilled_levels(teacher)
            logger.info("The feature losses compare the levels of equal stride: %s",
                        ", ".join(f"student {s_names[i]} - teacher {t_names[j]} (stride {s_strides[i]})"
                                  for i, j in zip(*self.level_pairs)))
        for name, loss in losses.items():
            self.distill_losses[name] = build_loss_from_spec(name, loss, s_shapes, t_shapes)
            check_loss_name(name, self.distill_losses[name])
        logger.info("Distillation losses: %s", "; ".join(loss_description(n, l) for n, l in self.distill_losses.items()))
        check_losses_compatible(self.student, teacher, self.distill_losses)
        # Head losses read an R-CNN teacher's RPN head outputs too (known once, not every step).
        self.reads_head_outputs = any(getattr(l, "needs_same_layout", False) for l in self.distill_losses.values())
        for loss in self.distill_losses.values():
            check = getattr(loss, "check_detectors", None)
            if check is not None:
                check(self.student, teacher)

    @classmethod
    def from_config(cls, cfg, with_teacher=True):
        with using_setting_names(YACS_SETTING_NAMES):
            return cls._yacs_arguments(cfg, with_teacher)

    @classmethod
    def _yacs_arguments(cls, cfg, with_teacher):
        if not cfg.DISTILL.LOSSES:
            raise ValueError(
                "MODEL.META_ARCHITECTURE is TaskDistillDetector but DISTILL.LOSSES is empty; name "
                "at least one loss (e.g. ['TID']) or train the student's own architecture."
            )
        parts_of(cfg.DISTILL.STUDENT_INIT)  # a wrong choice fails before anything is built
        losses = {name: yacs_loss_factory(name, cfg) for name in cfg.DISTILL.LOSSES}  # names checked
        # Built in this order (student, teacher, then the losses' adapters): the random init,
        # and so every committed result, depends on it.
        student = build_model(student_config(cfg))
        teacher = build_teacher(cfg) if with_teacher else None
        return {
            "student": student,
            "teacher": teacher,
            "losses": losses,
            "input_format": cfg.INPUT.FORMAT,
            "fcos_iou_thresholds": tuple(cfg.DISTILL.FCOS_IOU_THRESHOLDS),
            "teacher_amp": cfg.DISTILL.TEACHER.AMP,
            "setting_names": YACS_SETTING_NAMES,
        }

    @property
    def teacher_origin(self):
        """Where the teacher came from (modeling.teacher.TeacherOrigin: its config file, weights,
        input format, training datasets), or None."""
        return getattr(self.teacher, "teacher_origin", None)

    @property
    def device(self):
        return self.student.device

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .float() ... reach the teacher too (LazyConfig training moves the model
        # after building it), though it is outside the module tree.
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def teacher_inputs(self, batched_inputs):
        if not self.teacher_needs_bgr_flip:
            return batched_inputs
        return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]

    def forward(self, batched_inputs):
        if not self.training:
            return self.student(batched_inputs)
        if self.teacher is None:
            raise RuntimeError(
                "This TaskDistillDetector was built without its teacher (for inference only, e.g. "
                "--eval-only); build it with the teacher to train.")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        image_sizes = self.image_sizes_on_device(batched_inputs)
        # The teacher first: its activations are freed before the student's exist, so the
        # step's peak memory is the larger of the two, not their sum.
        teacher_out = self.run_teacher(batched_inputs, gt_instances, image_sizes)
        # The student runs under the caller's autocast (SOLVER.AMP.ENABLED); its losses, the
        # distillation losses and the masks that feed them run in float32: exp, log, softmax
        # and IoU overflow or lose the small values they compare at half precision.
        student_out = self.run_detector(self.student, batched_inputs, gt_instances, image_sizes)
        with torch.autocast(device_type=self.device.type, enabled=False):
            student_out.to_float32()
            losses = dict(student_out.detector_losses())
            student_levels, teacher_levels = self.paired_levels(student_out, teacher_out)
            for loss in self.distill_losses.values():
                losses.update(loss(student_levels, teacher_levels))
        # A non-finite term: detectron2's trainer reads every loss each step and raises
        # FloatingPointError naming them before the optimizer step (hooks.NonFiniteLossHint).
        return losses

    def paired_levels(self, student_out, teacher_out):
        """Both detectors' outputs on the levels the losses compare (a mixed pair: those of equal stride)."""
        if self.level_pairs is None:
            return student_out, teacher_out
        return LevelSubset(student_out, self.level_pairs[0]), LevelSubset(teacher_out, self.level_pairs[1])

    def image_sizes_on_device(self, batched_inputs):
        """(N, 2) image heights and widths on the model's device: one copy per step for both
        detectors, from pinned memory on CUDA so that it does not block."""
        sizes = torch.tensor([tuple(x["image"].shape[-2:]) for x in batched_inputs])
        if self.device.type == "cuda":
            sizes = sizes.pin_memory()
        return sizes.to(self.device, non_blocking=True)

    def run_detector(self, detector, batched_inputs, gt_instances, image_sizes, with_losses=True):
        """A dense detector up to its head outputs; an R-CNN's features, its RPN head's outputs when a
        loss reads them, and its own losses ``with_losses``."""
        if is_rcnn(detector):
            return run_rcnn_detector(detector, batched_inputs, gt_instances, image_sizes, with_losses,
                                     self.reads_head_outputs)
        return run_dense_detector(detector, batched_inputs, gt_instances, self.fcos_thresholds, image_sizes)

    @torch.no_grad()
    def run_teacher(self, batched_inputs, gt_instances, image_sizes=None):
        if self.teacher.training:  # someone called teacher.train(): the teacher stays frozen
            self.teacher.eval()
        inputs = self.teacher_inputs(batched_inputs)
        device_type = self.device.type
        # DISTILL.TEACHER.AMP alone decides the teacher's precision, not the student's autocast.
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=bool(self.teacher_amp)):
            # An R-CNN teacher runs its backbone (and its RPN head for BCKD) only: no proposals.
            outputs = self.run_detector(self.teacher, inputs, gt_instances, image_sizes, with_losses=False)
        return outputs.to_float32()

