"""SOLVER.EPOCHS: the iteration settings from the training set's size and the batch."""
import logging

import pytest

from d2_taskdistill.schedule import apply_epoch_schedule, epoch_schedule
from conftest import distill_cfg


def test_epochs_set_the_iterations_hand_computed():
    # 300 images at 16 a batch: 19 iterations an epoch (18.75 rounded up); 12 epochs: 228.
    assert epoch_schedule(12, 300, 16, warmup_iters=1000, checkpoint_period=5000) == {
        "SOLVER.MAX_ITER": 228,
        "SOLVER.STEPS": (152, 203),  # 2/3 and 8/9 of 228: 152 and 202.67
        "SOLVER.WARMUP_ITERS": 19,  # at most one epoch
        "SOLVER.CHECKPOINT_PERIOD": 19,
        "TEST.EVAL_PERIOD": 57,  # every ceil(12 / 4) = 3 epochs
    }
    # COCO train2017 (117,266 images with boxes) at 16: 7,330 an epoch; the configured warmup and
    # checkpoint period are shorter than an epoch and stay.
    assert epoch_schedule(12, 117266, 16, 1000, 5000) == {
        "SOLVER.MAX_ITER": 87960, "SOLVER.STEPS": (58640, 78187), "SOLVER.WARMUP_ITERS": 1000,
        "SOLVER.CHECKPOINT_PERIOD": 5000, "TEST.EVAL_PERIOD": 21990}
    # Half an epoch of 100 images at 10: 5 iterations; a run of 4 epochs or fewer evaluates at the end only.
    assert epoch_schedule(0.5, 100, 10, 100, 5000) == {
        "SOLVER.MAX_ITER": 5, "SOLVER.STEPS": (3, 4), "SOLVER.WARMUP_ITERS": 10,
        "SOLVER.CHECKPOINT_PERIOD": 10, "TEST.EVAL_PERIOD": 0}
    # One iteration: no step inside the run.
    assert epoch_schedule(1, 4, 4, 10, 10)["SOLVER.STEPS"] == ()


@pytest.mark.parametrize("epochs,images,batch,message", [
    (-1, 300, 16, r"SOLVER.EPOCHS=-1: give a positive number"),
    (12, 0, 16, r"training set \(DATASETS.TRAIN\) has no image"),
    (12, 10, 16, r"SOLVER.IMS_PER_BATCH=16 is larger than the training set \(10 images\).*at most 10"),
])
def test_epochs_that_cannot_make_a_schedule_are_refused(epochs, images, batch, message):
    with pytest.raises(ValueError, match=message):
        epoch_schedule(epochs, images, batch, 1000, 5000)


def test_a_config_with_epochs_gets_its_iterations_from_the_dataset(teachers, tiny_dataset, tmp_path, caplog):
    # The tiny set: 8 images at 2 a batch, 4 iterations an epoch; 3 epochs.
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teachers["retinanet"], tmp_path,
                      opts=["SOLVER.EPOCHS", 3, "SOLVER.WARMUP_ITERS", 100])
    cfg.freeze()
    with caplog.at_level(logging.INFO, logger="d2_taskdistill.schedule"):
        scheduled = apply_epoch_schedule(cfg)
    assert (scheduled.SOLVER.MAX_ITER, scheduled.SOLVER.STEPS, scheduled.SOLVER.WARMUP_ITERS,
            scheduled.SOLVER.CHECKPOINT_PERIOD, scheduled.TEST.EVAL_PERIOD) == (12, (8, 11), 4, 2, 4)
    assert cfg.SOLVER.MAX_ITER == 3 and cfg.is_frozen()  # the given config is left as it was
    assert "SOLVER.EPOCHS 3 on 8 training images at SOLVER.IMS_PER_BATCH 2 (4 iterations an epoch): " \
           "SOLVER.MAX_ITER 12, SOLVER.STEPS (8, 11)" in caplog.text
    assert apply_epoch_schedule(scheduled).SOLVER.MAX_ITER == 12  # applying it again changes nothing
