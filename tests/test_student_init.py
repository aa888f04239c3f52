"""DISTILL.STUDENT_INIT: the student's FPN and/or head start from the teacher's weights."""
import os

import pytest
import torch

from d2_taskdistill import load_config
from d2_taskdistill.engine import DistillTrainer
from d2_taskdistill.hooks import StudentInit
from d2_taskdistill.config import YACS_SETTING_NAMES
from d2_taskdistill.lazy_engine import LAZY_SETTING_NAMES, LazyDistillTrainer
from d2_taskdistill.modeling.inherit import inherit_from_teacher
from d2_taskdistill.settings import using_setting_names
from conftest import (SMALL_TEACHER_OPTS, config_path, distill_cfg, lazy_cfg, make_teacher_checkpoint, scratch_dir,
                      tiny_run_opts, TEST_DEVICE)

# The teacher with the student's FPN width (64) and head depth (2): R34 body, R18 student.
SAME_NECK = ["MODEL.FPN.OUT_CHANNELS", 64, "MODEL.RETINANET.NUM_CONVS", 2]


@pytest.fixture(scope="module")
def same_neck_teacher(tmp_path_factory, tiny_batch):
    with scratch_dir(tmp_path_factory, "init_teacher") as root:
        yield make_teacher_checkpoint("retinanet", str(root / "teacher.pth"), tiny_batch, opts=SAME_NECK)


def trainer_for(teacher, out, init, max_iter=2, path="yacs"):
    """A distillation trainer of the FitNet config with STUDENT_INIT ``init``, from yaml or .py."""
    if path == "yacs":
        cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher, out, teacher_opts=SAME_NECK, max_iter=max_iter,
                          opts=["DISTILL.STUDENT_INIT", init])
        return DistillTrainer(cfg)
    cfg = lazy_cfg("retinanet_R34-R18_fitnet.py", teacher, out, max_iter=max_iter,
                   overrides=[f"train.student_init={init}"])
    cfg.model.teacher.overrides = [*cfg.model.teacher.overrides, *SAME_NECK]
    return LazyDistillTrainer(cfg)


def plain_trainer_for(teacher, out, path):
    """The student trained alone (no distillation), started from ``teacher`` (neck+head)."""
    teacher_config = config_path("digits", "retinanet_R34_FPN_teacher.yaml")
    teacher_opts = [*SMALL_TEACHER_OPTS, *SAME_NECK]
    if path == "yacs":
        cfg = load_config(config_path("digits", "retinanet_R18_FPN_student.yaml"), [
            *tiny_run_opts(out, 2), "DISTILL.STUDENT_INIT", "neck+head", "DISTILL.TEACHER.CONFIG_FILE", teacher_config,
            "DISTILL.TEACHER.WEIGHTS", teacher, "DISTILL.TEACHER.OPTS", teacher_opts])
        return DistillTrainer(cfg)
    from detectron2.config import LazyCall as L

    from d2_taskdistill.modeling import load_teacher

    cfg = lazy_cfg("retinanet_R34-R18_fitnet.py", teacher, out, overrides=["train.student_init=neck+head"])
    cfg.model = cfg.model.student
    cfg.train.student_init_teacher = L(load_teacher)(config_file=teacher_config, weights=teacher,
                                                     overrides=[str(o) for o in teacher_opts])
    return LazyDistillTrainer(cfg)


def start(trainer, resume=False):
    """resume_or_load, then the StudentInit hook as trainer.train() runs it, before any step
    (with the trainer's setting names)."""
    trainer.resume_or_load(resume=resume)
    yacs = isinstance(trainer, DistillTrainer)
    hooks = trainer._hooks if yacs else trainer._trainer._hooks
    if not yacs:  # as SimpleTrainer.train(start_iter, ...) sets it
        trainer._trainer.start_iter = trainer.start_iter
    with using_setting_names(YACS_SETTING_NAMES if yacs else LAZY_SETTING_NAMES):
        next(h for h in hooks if isinstance(h, StudentInit)).before_train()


def split_state(model):
    state = {k: v.clone() for k, v in model.student.state_dict().items()}
    neck = {k for k in state if k.startswith("backbone.") and not k.startswith("backbone.bottom_up.")}
    head = {k for k in state if k.startswith("head.")}
    return state, neck, head


@pytest.mark.parametrize("path", ["yacs", "lazy"])
@pytest.mark.parametrize("init", ["neck", "head", "neck+head"])
def test_fresh_start_copies_the_chosen_parts_only(init, path, same_neck_teacher, tiny_dataset, tmp_path):
    trainer = trainer_for(same_neck_teacher, tmp_path, init, path=path)
    before, neck, head = split_state(trainer.model)
    start(trainer)
    after, _, _ = split_state(trainer.model)
    teacher = trainer.model.teacher.state_dict()
    chosen = (neck if "neck" in init else set()) | (head if "head" in init else set())
    # FPN: 3 lateral + 3 output convs + P6 + P7 (weight, bias); head: 2 + 2 convs + 2 predictors.
    assert len(neck) == 16 and len(head) == 12
    for k in chosen:
        assert torch.equal(after[k], teacher[k]), k
    for k in set(after) - chosen:  # the ResNet body and the part not chosen are the student's own
        assert torch.equal(after[k], before[k]), k
    # A copy, not a coincidence: the student's own weights differed (biases start at zero in both).
    assert all(not torch.equal(before[k], teacher[k]) for k in chosen if k.endswith("weight"))


def test_resume_does_not_reinitialise(same_neck_teacher, tiny_dataset, tmp_path):
    trainer = trainer_for(same_neck_teacher, tmp_path, "neck+head", max_iter=2)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)["model"]
    resumed = trainer_for(same_neck_teacher, tmp_path, "neck+head", max_iter=4)
    start(resumed, resume=True)
    assert resumed.start_iter == 2
    teacher = resumed.model.teacher.state_dict()
    student = resumed.model.student.state_dict()
    for k, v in student.items():
        assert torch.equal(v, final["student." + k]), k  # the checkpoint, not the teacher again
    assert not torch.equal(student["head.cls_score.weight"], teacher["head.cls_score.weight"])


def test_init_that_copies_nothing_is_an_error(teachers_with_other_neck, tiny_dataset, tmp_path):
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teachers_with_other_neck, tmp_path,
                      opts=["DISTILL.STUDENT_INIT", "neck"])
    trainer = DistillTrainer(cfg)  # the teacher's FPN has 96 channels, the student's 64
    with pytest.raises(ValueError, match=r"^DISTILL.STUDENT_INIT='neck' copies nothing.*shape: student \(64,.*"
                                         r"same FPN channels \(MODEL.FPN.OUT_CHANNELS\)"):
        start(trainer)
    with pytest.raises(ValueError, match=r"^inherit_from_teacher\(choice=...\)='fpn'; choose one of"):
        inherit_from_teacher(trainer.model.student, trainer.model.teacher, "fpn")


@pytest.fixture
def teachers_with_other_neck(teachers):
    return teachers["retinanet"]  # SMALL_TEACHER_OPTS: a 96-channel FPN


def test_a_layer_is_copied_whole_or_not_at_all(tiny_batch):
    """Teacher head convs 96 wide, the student's 64: the predictors' biases match in shape
    (A*K, A*4) but their weights do not, so nothing of the head is copied."""
    from detectron2.modeling import build_model

    from d2_taskdistill import load_config
    from conftest import SMALL_TEACHER_OPTS, config_path

    student = build_model(load_config(config_path("digits", "retinanet_R18_FPN_student.yaml"), ["MODEL.DEVICE", TEST_DEVICE]))
    teacher = build_model(load_config(config_path("digits", "retinanet_R34_FPN_teacher.yaml"),
                                      ["MODEL.DEVICE", TEST_DEVICE, *SMALL_TEACHER_OPTS]))
    assert student.state_dict()["head.cls_score.bias"].shape == teacher.state_dict()["head.cls_score.bias"].shape
    with pytest.raises(ValueError, match="copies nothing"):
        inherit_from_teacher(student, teacher, "head")


@pytest.mark.parametrize("path", ["yacs", "lazy"])
def test_plain_student_starts_from_the_teacher(path, same_neck_teacher, tiny_dataset, tmp_path):
    """The baseline with inheritance: a student trained alone (no distillation losses), its FPN
    and head started from the teacher's checkpoint (yaml: DISTILL.TEACHER.*, .py:
    train.student_init_teacher)."""
    trainer = plain_trainer_for(same_neck_teacher, tmp_path, path)
    assert type(trainer.model).__name__ == "RetinaNet"
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    start(trainer)
    after = trainer.model.state_dict()
    teacher = torch.load(same_neck_teacher, weights_only=False)["model"]
    inherited = [k for k in after if k.startswith("head.") or (k.startswith("backbone.") and ".bottom_up." not in k)]
    assert len(inherited) == 28
    for k in inherited:
        assert torch.equal(after[k], teacher[k]), k
    for k in set(after) - set(inherited):
        assert torch.equal(after[k], before[k]), k
