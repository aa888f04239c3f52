"""Bad input fails at build (or at the offending iteration) with a message naming the setting."""
import os
import pickle

import pytest
import torch
import torch.nn as nn

from detectron2.modeling import build_model

from d2_taskdistill.losses import DISTILL_LOSS_REGISTRY
from d2_taskdistill.modeling import TaskDistillDetector
from d2_taskdistill.lazy_engine import build_model as build_lazy_model
from conftest import distill_cfg, lazy_cfg, make_teacher_checkpoint


class _ZeroLayoutLoss(nn.Module):
    """Test loss that compares predictions location by location."""

    needs_same_layout = True

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__()

    def forward(self, student, teacher):
        return {"loss_distill_zero": student.logits_flat.sum() * 0}


class _NaNLoss(_ZeroLayoutLoss):
    def forward(self, student, teacher):
        return {"loss_distill_nan": student.features[0].sum() * float("nan")}


for _cls, _name in [(_ZeroLayoutLoss, "TEST_LAYOUT"), (_NaNLoss, "TEST_NAN")]:
    if _name not in DISTILL_LOSS_REGISTRY:
        DISTILL_LOSS_REGISTRY._do_register(_name, _cls)


@pytest.fixture
def teacher_ckpt(teachers):
    return teachers["retinanet"]


def build(cfg):
    return build_model(cfg)


def test_valid_config_builds(teacher_ckpt, tmp_path):
    assert isinstance(build(distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher_ckpt, tmp_path)), TaskDistillDetector)


def test_missing_teacher_weights(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match=r"DISTILL.TEACHER.WEIGHTS=.*nowhere.pth.*no such file"):
        build(distill_cfg("retinanet_R34-R18_fitnet.yaml", missing, tmp_path))


def test_empty_teacher_weights(tmp_path):
    with pytest.raises(ValueError, match="DISTILL.TEACHER.WEIGHTS is empty"):
        build(distill_cfg("retinanet_R34-R18_fitnet.yaml", "", tmp_path))


def test_teacher_keys_that_do_not_load(tmp_path, teachers):
    fcos_ckpt = teachers["fcos"]
    with pytest.raises(KeyError) as err:
        build(distill_cfg("retinanet_R34-R18_fitnet.yaml", fcos_ckpt, tmp_path))
    message = str(err.value)
    assert "DISTILL.TEACHER.WEIGHTS=" in message and "fcos.pth" in message
    missing = message.split("missing keys: ")[1].split("]")[0]
    unexpected = message.split("unexpected keys: ")[1].split("]")[0]
    shapes = message.split("shape mismatches: ")[1]
    assert "'head.cls_subnet.2.weight'" in missing  # FCOS has GroupNorm at index 1, conv at 3
    assert "'head.ctrness.weight'" in unexpected
    assert "head.cls_score.weight: checkpoint (10, 96, 3, 3) vs model (90, 96, 3, 3)" in shapes
    assert "head.cls_score.weight" not in missing  # listed once, with its shapes


def test_model_zoo_pkl_teacher(teacher_ckpt, tmp_path):
    state = torch.load(teacher_ckpt, weights_only=False)["model"]
    pkl = tmp_path / "teacher.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    model = build(distill_cfg("retinanet_R34-R18_fitnet.yaml", str(pkl), tmp_path))
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_unknown_teacher_config(teacher_ckpt, tmp_path):
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher_ckpt, tmp_path,
                      opts=["DISTILL.TEACHER.CONFIG_FILE", "COCO-Detection/no_such_model.yaml"])
    with pytest.raises(FileNotFoundError, match="DISTILL.TEACHER.CONFIG_FILE='COCO-Detection/no_such_model.yaml'"):
        build(cfg)


def test_class_count_mismatch(tmp_path, tiny_batch):
    five = make_teacher_checkpoint("retinanet", str(tmp_path / "t5.pth"), tiny_batch,
                                   opts=["MODEL.RETINANET.NUM_CLASSES", 5])
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", five, tmp_path,
                      teacher_opts=["MODEL.RETINANET.NUM_CLASSES", 5])
    with pytest.raises(ValueError, match=r"Teacher has 5 classes, student 10: .*DISTILL.TEACHER.WEIGHTS='.*t5.pth'\) were "
                                         r"trained for 5: .*set MODEL.RETINANET.NUM_CLASSES / MODEL.FCOS.NUM_CLASSES to 5"):
        build(cfg)
    # The .py twin names its own settings.
    lazy = lazy_cfg("retinanet_R34-R18_fitnet.py", five, tmp_path)
    lazy.model.teacher.overrides = [*lazy.model.teacher.overrides, "MODEL.RETINANET.NUM_CLASSES", "5"]
    with pytest.raises(ValueError, match=r"load_teacher\(weights=...\)='.*t5.pth'\) were trained for 5: .*"
                                         r"set model.student.num_classes to 5"):
        build_lazy_model(lazy)


def test_anchor_layout_mismatch(teacher_ckpt, tmp_path):
    sizes = "[[20, 25.2, 31.75], [40, 50.4, 63.5], [80, 100.8, 127], [160, 201.6, 254], [320, 403.2, 508]]"
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher_ckpt, tmp_path,
                      opts=["DISTILL.LOSSES", ["FITNET", "TEST_LAYOUT"]],
                      teacher_opts=["MODEL.ANCHOR_GENERATOR.SIZES", sizes])
    with pytest.raises(ValueError, match=r"differ in cell anchors .*\['TEST_LAYOUT'\]"):
        build(cfg)
    # Feature-only losses do not need the same anchors.
    cfg.defrost()
    cfg.DISTILL.LOSSES = ["FITNET"]
    assert isinstance(build(cfg), TaskDistillDetector)


def test_unknown_loss_name(teacher_ckpt, tmp_path):
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher_ckpt, tmp_path, opts=["DISTILL.LOSSES", ["FITNETT"]])
    with pytest.raises(KeyError, match=r"Unknown loss 'FITNETT' in DISTILL.LOSSES; registered losses: \[.*'FITNET'"):
        build(cfg)


def test_no_losses(teacher_ckpt, tmp_path):
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher_ckpt, tmp_path, opts=["DISTILL.LOSSES", []])
    with pytest.raises(ValueError, match="DISTILL.LOSSES is empty"):
        build(cfg)


def test_a_non_finite_loss_stops_training_naming_it_and_what_to_change(teacher_ckpt, tiny_dataset, tmp_path):
    """detectron2's trainer reads every loss each step and raises before the optimizer step; the
    project adds the settings to change, in each config system's names."""
    from d2_taskdistill.engine import DistillTrainer
    from d2_taskdistill.lazy_engine import LazyDistillTrainer
    from conftest import lazy_cfg

    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher_ckpt, tmp_path / "yaml",
                      opts=["DISTILL.LOSSES", ["FITNET", "TEST_NAN"]])
    trainer = DistillTrainer(cfg)
    # numpy 2 prints the values as np.float64(nan)
    nan_term = r"'loss_distill_nan': (np.float64\()?nan"
    with pytest.raises(FloatingPointError, match=r"(?s)iteration=0.*" + nan_term + r".*lower SOLVER.BASE_LR or the "
                                                 r"distillation weights \(DISTILL"):
        trainer.train()
    lazy = lazy_cfg("retinanet_R34-R18_fitnet.py", teacher_ckpt, tmp_path / "py")
    lazy.model.losses["TEST_NAN"] = lambda s_shapes, t_shapes: _NaNLoss(None, s_shapes, t_shapes)
    trainer = LazyDistillTrainer(lazy)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match=r"(?s)" + nan_term + r".*lower optimizer.lr or the weights of "
                                                 r"model.losses"):
        trainer.train()
    assert not any(f.startswith("model_") for f in os.listdir(tmp_path / "py"))  # stopped before any save


def test_optimizer_choice(teacher_ckpt, tmp_path):
    from d2_taskdistill.engine import DistillTrainer

    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher_ckpt, tmp_path)
    model = build(cfg)
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"  # the digits configs' choice
    optimizer = DistillTrainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters()}  # student + adapters, no teacher
    cfg.defrost()
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='LAMB'"):
        DistillTrainer.build_optimizer(cfg, model)


def test_teacher_follows_to_but_stays_out_of_the_module_tree(teacher_ckpt, tmp_path):
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher_ckpt, tmp_path)
    model = build(cfg)
    assert model.to(torch.float64) is model
    assert {p.dtype for p in model.teacher.parameters()} == {torch.float64}
    assert {p.dtype for p in model.student.parameters()} == {torch.float64}
    teacher_params = {id(p) for p in model.teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert all(k.startswith(("student.", "distill_losses.")) for k in model.state_dict())
    model.train()
    assert not model.teacher.training
