"""LazyConfig (.py) distillation: the digits .py configs are the yaml ones, trained the same
way; lazy export, --eval-only without the teacher, and bad input."""
import glob
import json
import logging
import os
import shutil

import pytest
import torch

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from d2_taskdistill import load_config
from d2_taskdistill.data.config_datasets import thing_classes
from d2_taskdistill.engine import DistillTrainer
from d2_taskdistill.export import export_lazy_student
from d2_taskdistill import lazy_engine
from d2_taskdistill.lazy_engine import LazyDistillTrainer, evaluate_only, load_lazy_config

from conftest import (TINY_TRAIN, assert_same_detections, config_path, detections, distill_cfg, lazy_cfg,
                      without_checkpoints_or_evaluation)

# The configs here train and evaluate on the tiny dataset: registered for every test.
pytestmark = pytest.mark.usefixtures("tiny_dataset")

DIGITS = config_path("digits")
ITERATIONS = 2


@pytest.mark.parametrize("detector, methods", [("retinanet", 10), ("fcos", 10), ("faster_rcnn", 11), ("mask_rcnn", 3)])
def test_every_yaml_distillation_has_a_py_twin_building_the_same_model(detector, methods, teachers, request, tmp_path):
    rcnn_fixture = {"faster_rcnn": "rcnn_teacher", "mask_rcnn": "mask_rcnn_teacher"}.get(detector)
    teacher = request.getfixturevalue(rcnn_fixture) if rcnn_fixture else teachers[detector]
    yaml_files = sorted(glob.glob(os.path.join(DIGITS, f"{detector}_R34-R18_*.yaml")))
    assert len(yaml_files) == methods
    for yaml_file in yaml_files:
        name = os.path.basename(yaml_file)[:-len(".yaml")]
        cfg = distill_cfg(os.path.basename(yaml_file), teacher, tmp_path)
        lazy = lazy_cfg(name + ".py", teacher, tmp_path)
        assert lazy.train.output_dir == str(tmp_path)
        torch.manual_seed(0)
        from_yaml = build_model(cfg)
        torch.manual_seed(0)
        from_py = instantiate(lazy.model)
        assert list(from_py.distill_losses) == list(cfg.DISTILL.LOSSES), name
        assert repr(from_py) == repr(from_yaml), name
        a, b = from_yaml.state_dict(), from_py.state_dict()
        assert list(a) == list(b), name
        # Same seed, same construction order: the same initial weights, adapters included.
        assert all(torch.equal(a[k], b[k]) for k in a), name
        for loss_name, loss in from_yaml.distill_losses.items():
            twin = from_py.distill_losses[loss_name]
            plain = {k: v for k, v in vars(loss).items() if not k.startswith("_")}
            assert plain == {k: v for k, v in vars(twin).items() if not k.startswith("_")}, (name, loss_name)
        for attr in ("smooth_l1_beta", "test_score_thresh", "test_nms_thresh", "test_topk_candidates",
                     "max_detections_per_image", "focal_loss_alpha", "focal_loss_gamma", "num_classes"):
            assert getattr(from_py.student, attr, None) == getattr(from_yaml.student, attr, None), (name, attr)
        assert from_py.input_format == from_yaml.input_format == "BGR"
        assert from_py.teacher_needs_bgr_flip == from_yaml.teacher_needs_bgr_flip


@pytest.mark.parametrize("name", ["retinanet_R34_FPN_teacher", "retinanet_R18_FPN_student",
                                  "faster_rcnn_R34_FPN_teacher", "faster_rcnn_R18_FPN_student",
                                  "mask_rcnn_R34_FPN_teacher", "mask_rcnn_R18_FPN_student"])
def test_the_plain_py_twins_build_their_yaml_model_and_schedule(name):
    lazy = load_lazy_config(os.path.join(DIGITS, name + ".py"), ["train.device=cpu"])
    yaml_cfg = load_config(os.path.join(DIGITS, name + ".yaml"), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    from_yaml = build_model(yaml_cfg)
    torch.manual_seed(0)
    from_py = instantiate(lazy.model)
    assert repr(from_py) == repr(from_yaml)
    a, b = from_yaml.state_dict(), from_py.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert lazy_engine.train_short_side(lazy) == max(yaml_cfg.INPUT.MIN_SIZE_TRAIN) == 128  # for the data summary
    mapper = lazy.dataloader.train.mapper  # Mask R-CNN: the digits' masks, as bitmasks
    assert (mapper.get("use_instance_mask", False), mapper.get("instance_mask_format", "polygon")) == (
        yaml_cfg.MODEL.MASK_ON, yaml_cfg.INPUT.MASK_FORMAT if yaml_cfg.MODEL.MASK_ON else "polygon")
    scheduler = lazy.lr_multiplier.scheduler
    assert (lazy.optimizer.lr, lazy.train.max_iter, list(scheduler.milestones), scheduler.num_updates,
            round(lazy.lr_multiplier.warmup_length * lazy.train.max_iter), lazy.train.output_dir) == (
        yaml_cfg.SOLVER.BASE_LR, yaml_cfg.SOLVER.MAX_ITER, list(yaml_cfg.SOLVER.STEPS), yaml_cfg.SOLVER.MAX_ITER,
        yaml_cfg.SOLVER.WARMUP_ITERS, yaml_cfg.OUTPUT_DIR)


# CPU training is not bit-reproducible from run to run here after the first step: the same
# yaml run, same seed and weights, twice in one process, differed by up to 6e-7 (relative) at
# its second step, with one thread or two. The first step must be bit-identical, later ones
# within RTOL.
RTOL = 1e-5


def loss_histories(trainer):
    return {k: [v for v, _ in h.values()] for k, h in trainer.storage.histories().items()
            if k.startswith(("loss", "total_loss", "lr", "distill/"))}


# The training wiring (loader order, optimizer, schedule, hooks) does not depend on the method,
# and every twin builds the same model (the test above): one twin per detector trains, with the
# methods that log the most (TBD's diagnostics; BCKD and TID together).
@pytest.mark.parametrize("detector,method", [("retinanet", "tbd"), ("fcos", "bckd_tid"), ("faster_rcnn", "pkd_bckd_roi_kd")])
def test_yaml_and_py_train_identically(detector, method, teachers, request, tmp_path):
    """Same seed and initial weights: every loss and the lr bit-identical at the first step,
    within RTOL after it (see RTOL). Faster R-CNN: its ROI heads sample proposals from the same
    seeded generator."""
    name = f"{detector}_R34-R18_{method}"
    teachers = {**teachers, "faster_rcnn": request.getfixturevalue("rcnn_teacher")} if detector == "faster_rcnn" else teachers
    init = str(tmp_path / "init.pth")
    cfg = distill_cfg(name + ".yaml", teachers[detector], tmp_path / "yaml", max_iter=ITERATIONS)
    cfg.SEED = 0
    seed_all_rng(0)
    trainer = DistillTrainer(cfg)
    torch.save({"model": trainer.model.state_dict()}, init)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = init
    seed_all_rng(0)
    trainer = without_checkpoints_or_evaluation(DistillTrainer(cfg))
    trainer.resume_or_load(resume=False)
    trainer.train()
    from_yaml = loss_histories(trainer)

    lazy = lazy_cfg(name + ".py", teachers[detector], tmp_path / "py", overrides=[f"train.init_checkpoint={init}", "train.seed=0"])
    seed_all_rng(0)
    lazy_trainer = without_checkpoints_or_evaluation(LazyDistillTrainer(lazy))
    lazy_trainer.resume_or_load(resume=False)
    lazy_trainer.train()
    from_py = loss_histories(lazy_trainer)
    assert sorted(from_py) == sorted(from_yaml)
    assert len(from_yaml["total_loss"]) == ITERATIONS
    assert {k: v[0] for k, v in from_py.items()} == {k: v[0] for k, v in from_yaml.items()}
    for key, values in from_yaml.items():
        assert from_py[key] == pytest.approx(values, rel=RTOL), key


def test_a_plain_detector_py_trains_with_the_projects_entry(tmp_path, monkeypatch, caplog):
    """A teacher or the student alone as a .py (here the digits student, model.student): the
    entry trains it as lazyconfig_train_net would, without distillation."""
    plain = write_config(tmp_path, f"from detectron2.config import LazyConfig\nc = LazyConfig.load({BASE!r})\n"
                                   "model, dataloader, train = c.model.student, c.dataloader, c.train\n"
                                   "optimizer, lr_multiplier = c.optimizer, c.lr_multiplier\n", "plain.py")
    cfg = load_lazy_config(plain, [
        "train.device=cpu", f"train.output_dir={tmp_path / 'run'}", "train.max_iter=2",
        "dataloader.train.total_batch_size=2", f"dataloader.train.dataset.names=['{TINY_TRAIN}']",
        f"dataloader.test.dataset.names=['{TINY_TRAIN}']", f"dataloader.evaluator.dataset_name={TINY_TRAIN}"])
    trainer = without_checkpoints_or_evaluation(LazyDistillTrainer(cfg))
    assert type(trainer.unwrapped_model).__name__ == "RetinaNet"
    # With several processes, the same warning as the yaml path's, in the .py's names.
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="d2_taskdistill"):
        lazy_engine.build_model(cfg)
    assert "BatchNorm layers (NORM 'BN') with 2 processes" in caplog.text
    assert "Set the backbone's norm (norm of model.backbone.bottom_up.stem, .stages and model.backbone" in caplog.text
    monkeypatch.undo()
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = loss_histories(trainer)
    assert len(losses["loss_cls"]) == 2 and not any(k.startswith("loss_distill") for k in losses)


def test_lazy_export_loads_in_plain_detectron2_and_eval_only_needs_no_teacher(teachers, tiny_batch, tmp_path):
    # Two iterations leave every score below the default threshold: keep them all (-1: even a
    # probability that underflows to 0).
    lazy = lazy_cfg("retinanet_R34-R18_tid.py", teachers["retinanet"], tmp_path / "run", max_iter=2,
                    overrides=["model.student.test_score_thresh=-1.0"])
    seed_all_rng(0)
    trainer = LazyDistillTrainer(lazy)
    trainer.resume_or_load(resume=False)
    trainer.train()
    weights = str(tmp_path / "run" / "model_final.pth")
    assert os.path.isfile(weights)
    before = detections(trainer.unwrapped_model, tiny_batch)

    # The run recorded its class names: a dataset registered by the .py alone is not needed to export.
    assert json.load(open(tmp_path / "run" / "metadata.json")) == {
        "thing_classes": thing_classes(TINY_TRAIN), "dataset": TINY_TRAIN}
    lazy.dataloader.train.dataset.names = "registered_by_its_py_only"
    _, config_file, metadata = export_lazy_student(lazy, weights, str(tmp_path / "exported"))
    assert json.load(open(metadata)) == {"thing_classes": thing_classes(TINY_TRAIN), "dataset": TINY_TRAIN}
    elsewhere = tmp_path / "elsewhere" / "model_final.pth"
    os.makedirs(elsewhere.parent)
    shutil.copy(weights, elsewhere)
    with pytest.raises(KeyError, match=r"export: the training set 'registered_by_its_py_only' is not registered here "
                                       r"and the run recorded no class names .*Give the config that registers it"):
        export_lazy_student(lazy, str(elsewhere), str(tmp_path / "not_exported"))
    assert not (tmp_path / "not_exported").exists()
    lazy.dataloader.train.dataset.names = TINY_TRAIN
    assert "d2_taskdistill" not in open(config_file).read()  # detectron2's classes only
    plain = LazyConfig.load(config_file)
    student = instantiate(plain.model)
    assert type(instantiate(plain.dataloader.evaluator)).__name__ == "COCOEvaluator"
    assert type(student).__name__ == "RetinaNet"
    DetectionCheckpointer(student).load(plain.train.init_checkpoint)
    assert_same_detections(before, detections(student, tiny_batch))

    # --eval-only of the run, with the teacher's checkpoint gone.
    os.rename(teachers["retinanet"], teachers["retinanet"] + ".moved")
    try:
        lazy.train.init_checkpoint = weights
        results = evaluate_only(lazy)
        assert results[TINY_TRAIN]["bbox"]["AP"] == trainer.last_eval_results[TINY_TRAIN]["bbox"]["AP"]
        with pytest.raises(FileNotFoundError, match=r"load_teacher\(weights=...\)=.*no such file"):
            instantiate(lazy.model)  # training does need it, and says which setting
    finally:
        os.rename(teachers["retinanet"] + ".moved", teachers["retinanet"])


def test_fcos_export_names_detectron2s_fcos(teachers, tmp_path):
    from detectron2.modeling.meta_arch.fcos import FCOS

    from d2_taskdistill.export import plain_detectron2_targets

    cfg = lazy_cfg("fcos_R34-R18_tid.py", teachers["fcos"], tmp_path)
    assert cfg.model.student._target_ is not FCOS  # the project's subclass, with v0.6's guard
    plain_detectron2_targets(cfg.model.student)
    assert cfg.model.student._target_ is FCOS


def write_config(tmp_path, text, name="bad.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BASE = os.path.join(DIGITS, "retinanet_R34-R18_tid.py")


def test_bad_lazy_configs_say_what_to_fix(tmp_path, teachers):
    with pytest.raises(ValueError, match=r"Overrides \['train.max_iter'\].*key=value"):
        load_lazy_config(BASE, ["train.max_iter"])
    with pytest.raises(ValueError, match=r"do not apply to .*retinanet_R34-R18_tid.py"):
        load_lazy_config(BASE, ["train.max_iter=[1,"])
    with pytest.raises(FileNotFoundError, match=r"--config-file 'nope.py': no such file"):
        load_lazy_config("nope.py")

    no_train = write_config(tmp_path, f"from detectron2.config import LazyConfig\n"
                                      f"c = LazyConfig.load({BASE!r})\nmodel, dataloader = c.model, c.dataloader\n"
                                      "optimizer, lr_multiplier = c.optimizer, c.lr_multiplier\n")
    with pytest.raises(ValueError, match=r"has no \['train'\]: a training config defines"):
        load_lazy_config(no_train)

    no_target = write_config(tmp_path, f"from detectron2.config import LazyConfig\nc = LazyConfig.load({BASE!r})\n"
                                       "model, dataloader, train = dict(a=1), c.dataloader, c.train\n"
                                       "optimizer, lr_multiplier = c.optimizer, c.lr_multiplier\n", "no_target.py")
    with pytest.raises(ValueError, match=r"its `model` has no _target_: write model = L\(SomeDetector\)"):
        load_lazy_config(no_target)

    cfg = lazy_cfg("retinanet_R34-R18_tid.py", teachers["retinanet"], tmp_path)
    cfg.model.student = {"_target_": torch.nn.Linear, "in_features": 1, "out_features": 1}
    with pytest.raises(TypeError, match=r"The student \(torch.nn.modules.linear.Linear\) is not a detector that "
                                        r"d2_taskdistill can distil.*lacks \['preprocess_image', 'backbone'.*losses \['TID'\]"):
        instantiate(cfg.model)

    cfg = lazy_cfg("retinanet_R34-R18_tid.py", teachers["retinanet"], tmp_path)
    cfg.model.teacher.config_file = "configs/digits/no_such_teacher.yaml"
    with pytest.raises(FileNotFoundError, match=r"load_teacher\(config_file=...\)='configs/digits/no_such_teacher"
                                                r".yaml' is neither a file .* nor a detectron2 model-zoo config name"):
        instantiate(cfg.model)

    cfg = lazy_cfg("retinanet_R34-R18_tid.py", teachers["retinanet"], tmp_path)
    cfg.model.losses = {"TID": {"_target_": "d2_taskdistill.losses.TID", "wieght": 2.0}}
    with pytest.raises(TypeError, match=r"Distillation loss 'TID' could not be built from its config.*wieght"):
        instantiate(cfg.model)

    cfg = lazy_cfg("retinanet_R34-R18_tid.py", teachers["retinanet"], tmp_path)
    cfg.model.losses = {"TDI": cfg.model.losses.TID}  # a typo would name its logs and checkpoint keys
    with pytest.raises(ValueError, match=r"the key 'TDI' holds a TID loss, registered as 'TID': name it 'TID' "
                                         r"\(or 'TID_2' etc. for a second one\)"):
        instantiate(cfg.model)


COCO_PY = sorted(os.path.basename(p) for p in glob.glob(config_path("COCO-Detection", "*.py"))
                 if not os.path.basename(p).startswith("distill_"))


def test_coco_py_configs_cover_the_yaml_ones():
    yaml_twins = [n for n in COCO_PY if os.path.exists(config_path("COCO-Detection", n[:-3] + ".yaml"))]
    assert len(COCO_PY) == 11 and len(yaml_twins) == 10


@pytest.mark.parametrize("config", COCO_PY)
def test_coco_py_config_builds_the_zoo_student_of_its_yaml_twin(config, monkeypatch):
    from detectron2.modeling.meta_arch.fcos import FCOS
    from detectron2.modeling.meta_arch.retinanet import RetinaNet

    from d2_taskdistill.losses import DISTILL_LOSS_REGISTRY
    from d2_taskdistill.modeling.meta_arch import student_config
    from d2_taskdistill.modeling.teacher import resolve_teacher_config_file

    from conftest import ROOT

    monkeypatch.chdir(ROOT)  # teacher config paths are relative to the project root
    cfg = load_lazy_config(config_path("COCO-Detection", config), ["train.device=cpu"])
    assert cfg.train.output_dir.startswith("output/coco/")
    assert os.path.isfile(resolve_teacher_config_file(cfg.model.teacher.config_file))
    assert all(loss["_target_"] in [c for _, c in DISTILL_LOSS_REGISTRY] for loss in cfg.model.losses.values())
    student = instantiate(cfg.model.student)
    assert type(student) in (RetinaNet, FCOS) and student.num_classes == 80  # the zoo's own classes
    twin = config_path("COCO-Detection", config[:-3] + ".yaml")
    if os.path.exists(twin):
        yaml_cfg = load_config(twin, ["MODEL.DEVICE", "cpu"])
        assert list(cfg.model.losses) == list(yaml_cfg.DISTILL.LOSSES)
        yaml_student = build_model(student_config(yaml_cfg))
        a, b = student.state_dict(), yaml_student.state_dict()
        assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}


@pytest.mark.parametrize("override,error,message", [
    ("train.max_itr=10", KeyError, r"name keys it does not have: train.max_itr \(did you mean train.max_iter\?\)"),
    ("foo.bar=1", KeyError, r"name keys it does not have: foo.bar\. Write \+key=value to add a key on purpose"),
    ('losses=["BCKD","TDI"]', KeyError, r"losses \(did you mean model.losses\?\)"),
    ("train.max_iter=abc", ValueError, r"give numbers another type: \[\"train.max_iter='abc' \(it was 200\)\"\]"),
    ('model.losses=["BCKD","TDI"]', ValueError, r"model.losses is a dict \(keys \['TID'\]\), which a list cannot "
                                                 r"replace\. The \.py form of yaml's DISTILL.LOSSES .* model.losses = "
                                                 r"\{\"BCKD\": L\(BCKD\)\(\), \"TID\": L\(TID\)\(\)\}"),
])
def test_lazy_overrides_are_checked_before_anything_is_built(override, error, message):
    with pytest.raises(error, match=message):
        load_lazy_config(BASE, [override])


def test_lazy_overrides_that_add_keys_on_purpose_or_set_the_projects_train_keys():
    # An argument of the node's class that the config does not list (RetinaNet's test_score_thresh).
    cfg = load_lazy_config(BASE, ["+foo.bar=1", "train.student_init=neck", "train.seed=null",
                                  "model.student.test_score_thresh=0.0"])
    assert cfg.foo.bar == 1 and cfg.train.student_init == "neck" and cfg.train.seed is None
    assert cfg.model.student.test_score_thresh == 0.0
    with pytest.raises(KeyError, match=r"model.student.test_score_thres \(did you mean"):
        load_lazy_config(BASE, ["model.student.test_score_thres=0.0"])
