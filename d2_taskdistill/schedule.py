"""The schedule in a user's terms: ``SOLVER.EPOCHS`` (yaml) sets the iteration settings from the
training set's size and the batch.

detectron2 counts in iterations, tuned for COCO (90k iterations of 16 images, steps at 60k and
80k, warmup 1000, a checkpoint every 5000). On another dataset those numbers mean nothing; an
epoch count does. With ``SOLVER.EPOCHS > 0``:

- ``SOLVER.MAX_ITER`` = epochs x iterations per epoch (ceil(images / SOLVER.IMS_PER_BATCH), the
  images detectron2's loader keeps: without annotations they are dropped when
  ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``);
- ``SOLVER.STEPS`` at 2/3 and 8/9 of MAX_ITER, where detectron2's 1x schedule decays;
- ``SOLVER.WARMUP_ITERS`` and ``SOLVER.CHECKPOINT_PERIOD``: the configured values, at most one
  epoch (a preempted job loses at most an epoch);
- ``TEST.EVAL_PERIOD``: four evaluations over the run (every ceil(epochs / 4) epochs) and the
  final one, so that the AP curve shows whether the schedule was long enough.

The chosen values are logged; ``SOLVER.EPOCHS 0`` (the default) leaves the configured iterations.
"""
import functools
import logging
import math

logger = logging.getLogger(__name__)

STEP_FRACTIONS = (2 / 3, 8 / 9)
EVALUATIONS = 4


def epoch_schedule(epochs, num_images, ims_per_batch, warmup_iters, checkpoint_period):
    """{setting: value} of the iteration settings for ``epochs`` passes over ``num_images``."""
    if epochs <= 0:
        raise ValueError(f"SOLVER.EPOCHS={epochs}: give a positive number of passes over the training set "
                         "(or 0 to use SOLVER.MAX_ITER and SOLVER.STEPS as configured)")
    if num_images == 0:
        raise ValueError("SOLVER.EPOCHS is set but the training set (DATASETS.TRAIN) has no image that "
                         "detectron2's loader keeps: check its annotations, or "
                         "DATALOADER.FILTER_EMPTY_ANNOTATIONS if its images have none")
    if ims_per_batch > num_images:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={ims_per_batch} is larger than the training set ({num_images} "
                         f"images): an epoch would be less than one batch. Lower SOLVER.IMS_PER_BATCH to at most "
                         f"{num_images}.")
    per_epoch = math.ceil(num_images / ims_per_batch)
    max_iter = max(1, round(epochs * per_epoch))
    eval_epochs = max(1, math.ceil(epochs / EVALUATIONS))
    return {
        "SOLVER.MAX_ITER": max_iter,
        # Strictly increasing and inside the run: a very short one keeps fewer steps.
        "SOLVER.STEPS": tuple(sorted({round(max_iter * f) for f in STEP_FRACTIONS} - {0, max_iter})),
        "SOLVER.WARMUP_ITERS": min(warmup_iters, per_epoch),
        "SOLVER.CHECKPOINT_PERIOD": min(checkpoint_period, per_epoch),
        "TEST.EVAL_PERIOD": eval_epochs * per_epoch if eval_epochs * per_epoch < max_iter else 0,
    }


def training_set_size(cfg):
    """How many images detectron2's training loader keeps of ``cfg.DATASETS.TRAIN``."""
    return _kept_images(tuple(cfg.DATASETS.TRAIN), bool(cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS))


@functools.lru_cache(maxsize=None)
def _kept_images(names, filter_empty):
    # Once per process: train_net.py and the trainer both apply the schedule, and a COCO json
    # takes seconds to load.
    from detectron2.data import get_detection_dataset_dicts

    return len(get_detection_dataset_dicts(list(names), filter_empty=filter_empty))


def apply_epoch_schedule(cfg):
    """``cfg`` with the iteration settings of ``SOLVER.EPOCHS`` (unchanged when it is 0); a clone
    when it changes anything, so a frozen config stays as it was."""
    if not cfg.SOLVER.EPOCHS:
        return cfg
    num_images = training_set_size(cfg)
    settings = epoch_schedule(cfg.SOLVER.EPOCHS, num_images, cfg.SOLVER.IMS_PER_BATCH,
                              cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list([item for setting in settings.items() for item in setting])
    logger.info("SOLVER.EPOCHS %s on %d training images at SOLVER.IMS_PER_BATCH %d (%d iterations an epoch): %s",
                cfg.SOLVER.EPOCHS, num_images, cfg.SOLVER.IMS_PER_BATCH, math.ceil(num_images / cfg.SOLVER.IMS_PER_BATCH),
                ", ".join(f"{k} {v}" for k, v in settings.items()))
    return cfg
