"""SOLVER.EPOCHS: the iteration settings from the training set's size and the batch."""
import logging

import pytest

from d2_taskdistill.config import YACS_SETTING_NAMES
from d2_taskdistill.lazy_engine import LAZY_SETTING_NAMES, apply_lazy_epoch_schedule
from d2_taskdistill.schedule import apply_epoch_schedule, epoch_schedule
from d2_taskdistill.settings import using_setting_names
from conftest import config_path, distill_cfg, lazy_cfg, load_train_net, tiny_run_opts


def test_epochs_set_the_iterations_hand_computed():
    # 300 images at 16 a batch: 19 iterations an epoch (18.75 rounded up); 12 epochs: 228.
    assert epoch_schedule(12, 300, 16, warmup_iters=1000, checkpoint_period=5000) == {
        "max_iter": 228,
        "steps": (152, 203),  # 2/3 and 8/9 of 228: 152 and 202.67
        "warmup_iters": 19,  # at most one epoch
        "checkpoint_period": 19,
        "eval_period": 57,  # every ceil(12 / 4) = 3 epochs
        "checkpoints_kept": 3,  # all (0) configured: the last 3
    }
    # COCO train2017 (117,266 images with boxes) at 16: 7,330 an epoch; the configured warmup and
    # checkpoint period are shorter than an epoch and stay.
    assert epoch_schedule(12, 117266, 16, 1000, 5000) == {
        "max_iter": 87960, "steps": (58640, 78187), "warmup_iters": 1000, "checkpoint_period": 5000,
        "eval_period": 21990, "checkpoints_kept": 3}
    # Half an epoch of 100 images at 10: 5 iterations; a run of 4 epochs or fewer evaluates at the end only.
    assert epoch_schedule(0.5, 100, 10, 100, 5000) == {
        "max_iter": 5, "steps": (3, 4), "warmup_iters": 10, "checkpoint_period": 10, "eval_period": 0,
        "checkpoints_kept": 3}
    # One iteration: no step inside the run.
    assert epoch_schedule(1, 4, 4, 10, 10)["steps"] == ()
    # Fewer kept checkpoints than 3 stay as configured, more are capped.
    assert [epoch_schedule(1, 4, 4, 10, 10, kept)["checkpoints_kept"] for kept in (None, 1, 3, 100)] == [3, 1, 3, 3]


@pytest.mark.parametrize("names,epochs,images,batch,message", [
    (YACS_SETTING_NAMES, -1, 300, 16, r"^SOLVER.EPOCHS=-1: give a positive number"),
    (YACS_SETTING_NAMES, 12, 0, 16, r"training set \(DATASETS.TRAIN\) has no image.*DATALOADER.FILTER_EMPTY_ANNOTATIONS"),
    (YACS_SETTING_NAMES, 12, 10, 16, r"^SOLVER.IMS_PER_BATCH=16 is larger than the training set \(10 images\).*at most 10"),
    (LAZY_SETTING_NAMES, -1, 300, 16, r"^train.epochs=-1: give a positive number"),
    (LAZY_SETTING_NAMES, 12, 0, 16, r"training set \(dataloader.train.dataset.names\) has no image.*"
                                    r"dataloader.train.dataset.filter_empty"),
    (LAZY_SETTING_NAMES, 12, 10, 16, r"^dataloader.train.total_batch_size=16 is larger than the training set"),
])
def test_epochs_that_cannot_make_a_schedule_are_refused(names, epochs, images, batch, message):
    with using_setting_names(names), pytest.raises(ValueError, match=message):
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


def test_a_lazyconfig_with_epochs_gets_its_iterations_and_lr_steps(teachers, tiny_dataset, tmp_path, caplog):
    # The tiny set at dataloader.train.total_batch_size 2: 4 iterations an epoch; 3 epochs. The digits
    # .py schedule: warm-up over a quarter of train.max_iter (2 here, of lazy_cfg's 8), checkpoints
    # every 2 (lazy_cfg).
    lazy = lazy_cfg("retinanet_R34-R18_tid.py", teachers["retinanet"], tmp_path, max_iter=8,
                    overrides=["train.epochs=3", "lr_multiplier.warmup_length=0.25",
                               "lr_multiplier.scheduler.values=[1.0,0.1,0.01]"])
    with caplog.at_level(logging.INFO, logger="d2_taskdistill.schedule"):
        apply_lazy_epoch_schedule(lazy)
    scheduler = lazy.lr_multiplier.scheduler
    assert (lazy.train.max_iter, list(scheduler.milestones), scheduler.num_updates, list(scheduler["values"])) == \
        (12, [8, 11], 12, [1.0, 0.1, 0.01])
    assert lazy.lr_multiplier.warmup_length == 2 / 12  # min(2, one epoch of 4) iterations
    assert (lazy.train.eval_period, lazy.train.checkpointer.period, lazy.train.checkpointer.max_to_keep) == (4, 2, 3)
    assert "train.epochs 3 on 8 training images at dataloader.train.total_batch_size 2 (4 iterations an epoch): " \
           "train.max_iter 12, lr_multiplier.scheduler.milestones [8, 11]" in caplog.text
    apply_lazy_epoch_schedule(lazy)  # a second time changes nothing
    assert (lazy.train.max_iter, list(scheduler.milestones), lazy.lr_multiplier.warmup_length) == (12, [8, 11], 2 / 12)
    # The instantiated scheduler decays where the schedule says.
    from detectron2.config import instantiate

    multiplier = instantiate(lazy.lr_multiplier)
    assert [round(multiplier(i / 12), 4) for i in (7, 8, 10, 11)] == [1.0, 0.1, 0.1, 0.01]


def test_a_run_with_epochs_keeps_the_last_three_checkpoints(tiny_dataset, tmp_path):
    # 3 epochs of the tiny set at 2 a batch: 12 iterations, a checkpoint every 2 (iterations 1, 3,
    # ..., 11, and model_final.pth); the first three are deleted as the later ones come.
    from d2_taskdistill import load_config
    from d2_taskdistill.engine import DistillTrainer

    cfg = load_config(config_path("digits", "retinanet_R18_FPN_student.yaml"),
                      [*tiny_run_opts(tmp_path), "SOLVER.EPOCHS", 3, "DATASETS.TEST", "()"])
    DistillTrainer(cfg).train()
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == [
        "model_0000007.pth", "model_0000009.pth", "model_0000011.pth", "model_final.pth"]


def test_train_net_writes_the_iterations_into_the_runs_config(tiny_dataset, tmp_path):
    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args([
        "--config-file", config_path("digits", "retinanet_R18_FPN_student.yaml"),
        *map(str, tiny_run_opts(tmp_path, max_iter=3)), "SOLVER.EPOCHS", "3"])
    cfg = load_train_net().setup(args)
    assert cfg.SOLVER.MAX_ITER == 12 and cfg.SOLVER.STEPS == (8, 11)
    saved = (tmp_path / "config.yaml").read_text()
    assert "MAX_ITER: 12" in saved and "EPOCHS: 3" in saved
