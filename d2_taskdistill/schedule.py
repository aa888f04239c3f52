"""The schedule in a user's terms: ``SOLVER.EPOCHS`` (yaml) or ``train.epochs`` (LazyConfig) sets
the iteration settings from the training set's size and the batch.

detectron2 counts in iterations, tuned for COCO (90k iterations of 16 images, steps at 60k and
80k, warmup 1000, a checkpoint every 5000). On another dataset those numbers mean nothing; an
epoch count does. With ``SOLVER.EPOCHS > 0``:

- ``SOLVER.MAX_ITER`` = epochs x iterations per epoch (ceil(images / SOLVER.IMS_PER_BATCH), the
  images detectron2's loader keeps: without annotations they are dropped when
  ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``);
- ``SOLVER.STEPS`` at 2/3 and 8/9 of MAX_ITER, where detectron2's 1x schedule decays;
- ``SOLVER.WARMUP_ITERS`` and ``SOLVER.CHECKPOINT_PERIOD``: the configured values, at most one
  epoch (a preempted job loses at most an epoch);
- ``SOLVER.CHECKPOINT_MAX_TO_KEEP``: at most the last 3 periodic checkpoints (checkpoints every
  epoch of a small set would otherwise fill the disk: 48 epochs of an R34 RetinaNet are 13 GB);
- ``TEST.EVAL_PERIOD``: four evaluations over the run (every ceil(epochs / 4) epochs) and the
  final one, so that the AP curve shows whether the schedule was long enough.

The chosen values are logged; 0 (the default) leaves the configured iterations. A LazyConfig
gets the same: ``train.max_iter``, the milestones and ``num_updates`` of its
``lr_multiplier.scheduler`` (a MultiStepParamScheduler, as the model zoo's), the warm-up fraction,
``train.eval_period``, ``train.checkpointer.period`` and ``max_to_keep``.
"""
import functools
import logging
import math

from .config import YACS_SETTING_NAMES
from .data.config_datasets import check_registered, keeps_no_image
from .settings import setting, using_setting_names

logger = logging.getLogger(__name__)

STEP_FRACTIONS = (2 / 3, 8 / 9)
EVALUATIONS = 4
CHECKPOINTS_KEPT = 3


def epoch_schedule(epochs, num_images, ims_per_batch, warmup_iters, checkpoint_period, checkpoints_kept=0):
    """The iteration settings for ``epochs`` passes over ``num_images`` at ``ims_per_batch``:
    {"max_iter", "steps", "warmup_iters", "checkpoint_period", "eval_period" (0: at the end only),
    "checkpoints_kept"}. ``checkpoints_kept`` is the configured number (0 or None: all)."""
    if epochs <= 0:
        raise ValueError(f"{setting('epochs')}={epochs}: give a positive number of passes over the training set "
                         "(or 0 to keep the configured iterations)")
    if num_images == 0:
        raise ValueError(f"{setting('epochs')} is set but the training set ({setting('train_datasets')}) has no image "
                         f"that detectron2's loader keeps: check its annotations, or {setting('filter_empty')} if "
                         "its images have none")
    if ims_per_batch > num_images:
        raise ValueError(f"{setting('ims_per_batch')}={ims_per_batch} is larger than the training set ({num_images} "
                         f"images): an epoch would be less than one batch. Lower it to at most {num_images}.")
    per_epoch = math.ceil(num_images / ims_per_batch)
    max_iter = max(1, round(epochs * per_epoch))
    eval_every = max(1, math.ceil(epochs / EVALUATIONS)) * per_epoch
    return {
        "max_iter": max_iter,
        # Strictly increasing and inside the run: a very short one keeps fewer steps.
        "steps": tuple(sorted({round(max_iter * f) for f in STEP_FRACTIONS} - {0, max_iter})),
        "warmup_iters": min(warmup_iters, per_epoch),
        "checkpoint_period": min(checkpoint_period, per_epoch),
        "eval_period": eval_every if eval_every < max_iter else 0,
        "checkpoints_kept": min(checkpoints_kept or CHECKPOINTS_KEPT, CHECKPOINTS_KEPT),
    }


@functools.lru_cache(maxsize=None)
def kept_images(names, filter_empty):
    """How many images of the datasets ``names`` detectron2's training loader keeps. Once per
    process: train_net.py and the trainer both apply the schedule, and a COCO json takes seconds."""
    from detectron2.data import get_detection_dataset_dicts

    try:
        return len(get_detection_dataset_dicts(list(names), filter_empty=filter_empty))
    except AssertionError as e:
        if keeps_no_image(e):
            return 0  # epoch_schedule says what to check, in the config system's names
        raise


def log_schedule(epochs, num_images, ims_per_batch, chosen):
    logger.info("%s %s on %d training images at %s %d (%d iterations an epoch): %s", setting("epochs"), epochs,
                num_images, setting("ims_per_batch"), ims_per_batch, math.ceil(num_images / ims_per_batch),
                ", ".join(f"{name} {value}" for name, value in chosen.items()))


def apply_epoch_schedule(cfg):
    """A yacs ``cfg`` with the iteration settings of ``SOLVER.EPOCHS`` (unchanged when it is 0); a
    clone when it changes anything, so a frozen config stays as it was."""
    if not cfg.SOLVER.EPOCHS:
        return cfg
    check_registered(cfg.DATASETS.TRAIN)
    with using_setting_names(YACS_SETTING_NAMES):
        num_images = kept_images(tuple(cfg.DATASETS.TRAIN), bool(cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS))
        s = cfg.SOLVER
        schedule = epoch_schedule(s.EPOCHS, num_images, s.IMS_PER_BATCH, s.WARMUP_ITERS, s.CHECKPOINT_PERIOD,
                                  s.CHECKPOINT_MAX_TO_KEEP)
        chosen = {"SOLVER.MAX_ITER": schedule["max_iter"], "SOLVER.STEPS": schedule["steps"],
                  "SOLVER.WARMUP_ITERS": schedule["warmup_iters"],
                  "SOLVER.CHECKPOINT_PERIOD": schedule["checkpoint_period"],
                  "SOLVER.CHECKPOINT_MAX_TO_KEEP": schedule["checkpoints_kept"], "TEST.EVAL_PERIOD": schedule["eval_period"]}
        cfg = cfg.clone()
        cfg.defrost()
        cfg.merge_from_list([item for pair in chosen.items() for item in pair])
        log_schedule(s.EPOCHS, num_images, s.IMS_PER_BATCH, chosen)
    return cfg
