"""Errors name the setting the user wrote, in the user's config system.

The modelling code words an error with ``setting("teacher.weights")``; the config layer picks the
vocabulary around what it builds (``with using_setting_names(YACS_SETTING_NAMES)`` in the yacs trainer,
LazyConfig paths in the .py one), so the same check names ``DISTILL.TEACHER.WEIGHTS`` for a yaml
user and ``load_teacher(weights=...)`` for a .py one. Without a vocabulary: the Python API's names.
"""
import contextlib
import contextvars

# The Python API: the arguments a user who builds the model in code passes.
API_SETTING_NAMES = {
    "teacher.run": "load_teacher(run=...)",
    "teacher.config_file": "load_teacher(config_file=...)",
    "teacher.weights": "load_teacher(weights=...)",
    "teacher.overrides": "load_teacher(overrides=...)",
    "teacher.sha256": "load_teacher(sha256=...)",
    "losses": "TaskDistillDetector(losses=...)",
    "student.num_classes": "the student's num_classes",
    "student.rcnn_num_classes": "the student's roi_heads.num_classes",
    "student.input_format": "TaskDistillDetector(input_format=...)",
    "teacher.input_format": "TaskDistillDetector(teacher_input_format=...)",
    "anchor_layout": "the anchor generator, FPN levels and size_divisibility of both detectors",
    "fpn_channels": "the student's FPN out_channels",
    "student_init": "inherit_from_teacher(choice=...)",
    "teacher.allow_change": "DistillFeatures(allow_teacher_change=...)",
    "teacher.allow_other_class_names": "check_dataset_names(allow_other_teacher_names=...)",
    "epochs": "epoch_schedule(epochs=...)",
    "student_alone_run": "DistillFeatures(student_alone_run=...)",
    "ims_per_batch": "epoch_schedule(ims_per_batch=...)",
    "train_datasets": "the training datasets",
    "filter_empty": "the loader's filter of images without annotations",
    "norm": "the backbone's norm",
    "input_size": "the input's short side",
    "coco_datasets": "register_declared_datasets(coco=...)",
    "voc_datasets": "register_declared_datasets(voc=...)",
    "check_images": "register_declared_datasets(image_check=...)",
    # A distillation loss's keyword argument and its value, e.g. TID(areas='all').
    "loss_argument": "{node}({name}={value!r})",
}

_current = contextvars.ContextVar("d2_taskdistill_setting_names", default=None)


def setting(concept, **fields):
    """The name of ``concept`` (a key of API_SETTING_NAMES) in the vocabulary in use."""
    names = _current.get() or API_SETTING_NAMES
    return names.get(concept, API_SETTING_NAMES[concept]).format(**fields)


def loss_setting(node, name, value):
    """A distillation loss's argument with its value: "TID(areas='all')", in yacs
    "DISTILL.TID.AREAS='all'" (``node``: the loss's yacs node; ``name``: its keyword)."""
    return setting("loss_argument", node=node, name=name, key=name.rstrip("_").upper(), value=value)


def current_setting_names():
    """The vocabulary in use (None: the Python API's), to name settings later in the same words."""
    return _current.get()


@contextlib.contextmanager
def using_setting_names(names):
    """Errors raised inside name settings from ``names`` (None: keep the vocabulary in use)."""
    if names is None:
        yield
        return
    token = _current.set(names)
    try:
        yield
    finally:
        _current.reset(token)
