"""Registry of distillation losses (``DISTILL.LOSSES``) and their base class."""
import keyword

import torch.nn as nn

from detectron2.utils.registry import Registry

from ..settings import loss_setting, setting

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """
A distillation loss is a :class:`DistillLoss` whose forward takes ``(student, teacher)``
DenseOutputs and returns a dict of ``loss_distill_*`` terms. Its ``__init__`` is detectron2
``@configurable`` and keyword-only:

    __init__(self, *, student_shapes, teacher_shapes, <setting>=<default>, ...)

student_shapes / teacher_shapes: ShapeSpecs of the head's input (FPN) features, by level.
One keyword per key of its yacs node DISTILL.<config_node>, named as the key in lower case
(a trailing "_" where that is a Python keyword: GLOBAL -> global_), with the yacs default.
So both config systems build it:

    TID(cfg, student_shapes, teacher_shapes)                      # yacs, via from_config
    TID(student_shapes=s, teacher_shapes=t, weight=2.0)           # keywords (LazyConfig)

Class attributes: ``config_node`` (the yacs node's name); ``needs_same_layout``, True when the
loss compares predictions location by location, so teacher and student must share anchors,
levels and strides; ``distils_rpn``, True when such a loss also distils a two-stage detector's
RPN (a one-class dense head, modeling.rcnn_outputs); ``two_stage_only``, True when the loss
distils an R-CNN's ROI heads, so that teacher and student must both be R-CNNs. ``check_detectors(student, teacher)`` runs
once both detectors exist.
"""


def keyword_name(key):
    """The keyword argument of yacs key ``key``: WEIGHT -> weight, GLOBAL -> global_."""
    name = key.lower()
    return name + "_" if keyword.iskeyword(name) else name


class DistillLoss(nn.Module):
    """Base of the registered losses: yacs kwargs by name, and a hook on the built detectors."""

    needs_same_layout = False
    distils_rpn = False
    two_stage_only = False
    config_node = None  # e.g. "TID": the yacs node DISTILL.TID

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        # Every key of the node becomes a keyword: a yacs key without one fails loudly here.
        node = cfg.DISTILL[cls.config_node]
        kwargs = {keyword_name(key): value for key, value in node.items()}
        return {"student_shapes": student_shapes, "teacher_shapes": teacher_shapes, **kwargs}

    def check_detectors(self, student, teacher):
        """Checks that need the built detectors (not just their config); the model calls it
        once both exist. Default: none."""


def registered_loss(name):
    """The loss class registered as ``name``, or a KeyError listing the registered ones."""
    if name not in DISTILL_LOSS_REGISTRY:
        known = sorted(k for k, _ in DISTILL_LOSS_REGISTRY)
        raise KeyError(f"Unknown loss {name!r} in {setting('losses')}; registered losses: {known}")
    return DISTILL_LOSS_REGISTRY.get(name)


def build_distill_loss(name, cfg, student_shapes, teacher_shapes):
    return registered_loss(name)(cfg, student_shapes, teacher_shapes)


def check_choices(node, **settings):
    """Raise a ValueError naming the setting when a value is not allowed.

    node: the yacs node's name, e.g. "TID"; settings: name=(value, (allowed values, ...)).
    """
    for name, (value, allowed) in settings.items():
        if value not in allowed:
            raise ValueError(f"{loss_setting(node, name, value)}; choose one of {allowed}")


def check_positive(node, **settings):
    """Raise a ValueError naming the setting when a value (name=value) is not positive."""
    for name, value in settings.items():
        if value <= 0:
            raise ValueError(f"{loss_setting(node, name, value)}; must be positive")


def check_num_levels(node, num_levels, available):
    """``num_levels`` as a count of FPN levels, finest first: 0, or more than the
    ``available`` levels, means all of them. Raise a ValueError naming the setting when negative."""
    if num_levels < 0:
        raise ValueError(f"{loss_setting(node, 'num_levels', num_levels)}; choose 0 (all levels) or more")
    return min(num_levels, available) or available
