"""Registry of distillation losses (``DISTILL.LOSSES``)."""
from detectron2.utils.registry import Registry

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """
A distillation loss is an nn.Module built as ``cls(cfg, student_shapes, teacher_shapes)``
(FPN ShapeSpecs of the head's input features, by level) whose forward takes
``(student, teacher)`` DenseOutputs and returns a dict of ``loss_distill_*`` terms.
Class attribute ``needs_same_layout``: True when the loss compares predictions
location by location, so teacher and student must share anchors, levels and strides.
"""


def build_distill_loss(name, cfg, student_shapes, teacher_shapes):
    if name not in DISTILL_LOSS_REGISTRY:
        known = sorted(k for k, _ in DISTILL_LOSS_REGISTRY)
        raise KeyError(f"Unknown loss {name!r} in DISTILL.LOSSES; registered losses: {known}")
    return DISTILL_LOSS_REGISTRY.get(name)(cfg, student_shapes, teacher_shapes)


def check_choices(node, node_name, choices):
    """Raise a ValueError naming the key when a string setting of ``node`` is not allowed.

    choices: {KEY: (allowed values, ...)}; node_name e.g. "DISTILL.TID".
    """
    for key, allowed in choices.items():
        if node[key] not in allowed:
            raise ValueError(f"{node_name}.{key}={node[key]!r}; choose one of {allowed}")


def check_num_levels(node, node_name, available):
    """``node.NUM_LEVELS`` as a count of FPN levels, finest first: 0, or more than the
    ``available`` levels, means all of them. Raise a ValueError naming the key when negative."""
    num_levels = node.NUM_LEVELS
    if num_levels < 0:
        raise ValueError(f"{node_name}.NUM_LEVELS={num_levels}; choose 0 (all levels) or more")
    return min(num_levels, available) or available
