"""Start the student's neck (FPN) and/or head from the teacher's weights (yacs DISTILL.STUDENT_INIT,
LazyConfig train.student_init), as ICD and FGD do: where parameter names and shapes match (R101->R50, R34->R18 FPN and head)."""
import logging

import torch

from ..settings import setting

logger = logging.getLogger(__name__)

# Which state-dict keys each part covers; the ResNet body (backbone.bottom_up) is never copied.
PARTS = {
    "neck": lambda key: key.startswith("backbone.") and not key.startswith("backbone.bottom_up."),
    # A dense detector's head; an R-CNN's RPN and ROI heads.
    "head": lambda key: key.startswith(("head.", "proposal_generator.", "roi_heads.")),
}
CHOICES = ("none", "neck", "head", "neck+head")


def parts_of(choice):
    if choice not in CHOICES:
        raise ValueError(f"{setting('student_init')}={choice!r}; choose one of {CHOICES}")
    return [] if choice == "none" else choice.split("+")


@torch.no_grad()
def inherit_from_teacher(student, teacher, choice):
    """Copy the teacher's tensors into the student for the parts ``choice`` names.

    Returns (copied keys, {skipped key: reason}). Copying nothing is an error.
    """
    parts = parts_of(choice)
    if not parts:
        return [], {}
    s_state, t_state = student.state_dict(), teacher.state_dict()
    reasons = {}
    for key, value in s_state.items():
        if not any(PARTS[p](key) for p in parts):
            continue
        if key not in t_state:
            reasons[key] = "not in the teacher"
        elif t_state[key].shape != value.shape:
            reasons[key] = f"shape: student {tuple(value.shape)}, teacher {tuple(t_state[key].shape)}"
        else:
            reasons[key] = None
    # A layer is copied whole or not at all: a bias without its weight is no inheritance.
    layer_of = {key: key.rsplit(".", 1)[0] for key in reasons}
    broken = {layer_of[k] for k, why in reasons.items() if why is not None}
    copied, skipped = [], {}
    for key, why in reasons.items():
        if why is None and layer_of[key] not in broken:
            s_state[key].copy_(t_state[key])  # state_dict tensors share storage with the parameters
            copied.append(key)
        else:
            skipped[key] = why or "another tensor of its layer does not match"
    if not copied:
        examples = dict(list(skipped.items())[:3])
        raise ValueError(
            f"{setting('student_init')}={choice!r} copies nothing from the teacher: no {' or '.join(parts)} "
            f"tensor matches in name and shape (e.g. {examples}). It needs the same FPN channels "
            f"({setting('fpn_channels')}) and head layout as the teacher; set it to 'none' otherwise."
        )
    logger.info("%s=%s: copied %d tensors from the teacher; skipped %d%s", setting("student_init"), choice,
                len(copied), len(skipped), f": {skipped}" if skipped else "")
    return copied, skipped
