"""TaskDistillDetector, DistillTrainer, resume and export, with FITNET on CPU."""
import json
import logging
import math
import os

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.utils.visualizer import Visualizer

from d2_taskdistill.data import CLASS_NAMES
from d2_taskdistill.engine import DistillTrainer
from d2_taskdistill.export import export_student
from d2_taskdistill.modeling import TaskDistillDetector
from conftest import METHODS, distill_cfg, every_loss_cfg, finite_positive_history, without_checkpoints_or_evaluation

DETECTORS = ["retinanet", "fcos"]


def teacher_state(model):
    return {k: v.clone() for k, v in model.teacher.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("detector", DETECTORS)
def test_one_step_reaches_every_trainable_tensor(detector, method, teachers, tiny_batch, tmp_path):
    """What DDP without find_unused_parameters (detectron2's default) needs of every method: one
    step gives a gradient to every trainable tensor, the student's and the method's adapters'."""
    from detectron2.utils.events import EventStorage

    model = build_model(distill_cfg(f"{detector}_R34-R18_{method}.yaml", teachers[detector], tmp_path)).train()
    with EventStorage(0):
        sum(model(tiny_batch[:2]).values()).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("student.") for n in trainable)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


# Each loss's terms, by their own code: BCKD's centerness term on FCOS only; FGD's four terms
# with its global one on (the default); TBD's harmony (hd) and task-decoupled (tfd) terms.
DISTILL_TERMS = {"loss_distill_" + t for t in (
    "bckd_cls", "bckd_loc", "cwd", "fgd_attention", "fgd_bg", "fgd_fg", "fgd_global", "fgfi", "fitnet", "pkd",
    "tbd_hd_box", "tbd_hd_cls", "tbd_tfd_cls", "tbd_tfd_reg", "tid")}


@pytest.mark.parametrize("detector", DETECTORS)
def test_every_loss_trains_finite_and_positive(detector, teachers, tiny_dataset, tmp_path):
    """Three iterations of DistillTrainer with every loss in one model: each term is logged at
    every iteration, finite and positive; TBD's diagnostic every LOG_PERIOD (2: once, at 1)."""
    cfg = every_loss_cfg(detector, teachers[detector], tmp_path, opts=["DISTILL.TBD.LOG_PERIOD", 2])
    trainer = without_checkpoints_or_evaluation(DistillTrainer(cfg))
    trainer.train()
    histories = trainer.storage.histories()
    expected = DISTILL_TERMS | ({"loss_distill_bckd_ctr"} if detector == "fcos" else set())
    assert {n for n in histories if n.startswith("loss_distill")} == expected
    for name in expected:
        assert finite_positive_history(histories, name), name
    for who in ("teacher", "student"):
        shares = [v for v, _ in histories[f"tbd/harmonious_share_{who}"].values()]
        assert len(shares) == 1 and 0.0 <= shares[0] <= 1.0


@pytest.mark.parametrize("detector", DETECTORS)
def test_training_updates_student_only(detector, teachers, tiny_dataset, tmp_path, caplog):
    # A student-alone run whose last evaluation (99 AP) the untrained teacher does not reach.
    alone = tmp_path / "student_alone"
    alone.mkdir()
    (alone / "metrics.json").write_text('{"iteration": 9, "bbox/AP": 12.5}\n{"iteration": 19, "bbox/AP": 99.0}\n')
    cfg = distill_cfg(f"{detector}_R34-R18_fitnet.yaml", teachers[detector], tmp_path / "run",
                      opts=["DISTILL.TEACHER.EVAL_AT_START", True, "DISTILL.STUDENT_ALONE_RUN", str(alone)])
    trainer = DistillTrainer(cfg)
    model = trainer.model
    assert isinstance(model, TaskDistillDetector)
    teacher_before = teacher_state(model)
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}

    # The teacher is out of parameters(), the optimizer and the checkpoint.
    teacher_params = {id(p) for p in model.teacher.parameters()}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not teacher_params & optimized
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert all(k.startswith(("student.", "distill_losses.")) for k in model.state_dict())
    assert any(k.startswith("distill_losses.FITNET.adapter") for k in model.state_dict())

    with caplog.at_level(logging.WARNING, logger="d2_taskdistill.hooks"):
        trainer.train()
    assert f"is not better than the student trained alone (AP 99.00, {alone})" in caplog.text
    assert "more SOLVER.EPOCHS" in caplog.text
    assert not model.teacher.training  # model.train() does not reach the teacher
    assert all(not p.requires_grad for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    floats = [k for k, v in student_before.items() if v.dtype.is_floating_point]
    changed = [k for k in floats if not torch.equal(model.student.state_dict()[k], student_before[k])]
    assert len(changed) >= 0.95 * len(floats)

    metrics = trainer.storage.latest()
    assert math.isfinite(metrics["loss_distill_fitnet"][0]) and metrics["loss_distill_fitnet"][0] > 0
    saved = torch.load(os.path.join(tmp_path, "run", "model_final.pth"), weights_only=False)["model"]
    assert not any(k.startswith("teacher") for k in saved)

    # The teacher was evaluated once, before training, on DATASETS.TEST.
    with open(os.path.join(tmp_path, "run", "teacher_eval.json")) as f:
        teacher_eval = json.load(f)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(teacher_eval[tiny_dataset]["bbox"])
    assert json.dumps(trainer.teacher_results, sort_keys=True) == json.dumps(teacher_eval, sort_keys=True)
    # The teacher's predictions in their own folder; the student's final evaluation in detectron2's.
    assert os.path.isfile(os.path.join(tmp_path, "run", "inference_teacher", tiny_dataset, "coco_instances_results.json"))
    assert os.path.isfile(os.path.join(tmp_path, "run", "inference", "coco_instances_results.json"))


def test_resume_continues_and_reloads_teacher(teachers, tiny_dataset, tmp_path):
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teachers["retinanet"], tmp_path, max_iter=3)
    DistillTrainer(cfg).train()  # checkpoints at iterations 2 (period) and 3 (final)
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 5
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3
    final = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)
    for k, v in trainer.model.student.state_dict().items():
        assert torch.equal(v, final["model"]["student." + k]), k
    assert trainer.optimizer.state_dict()["state"]  # momentum buffers restored
    teacher_ckpt = torch.load(teachers["retinanet"], weights_only=False)["model"]
    for k, v in trainer.model.teacher.state_dict().items():
        assert torch.equal(v, teacher_ckpt[k]), k
    trainer.train()
    ran = [it for _, it in trainer.storage.history("total_loss").values()]
    assert ran == [3, 4]


@pytest.mark.parametrize("detector", DETECTORS)
def test_export_matches_trained_student(detector, teachers, tiny_dataset, tiny_batch, tmp_path, monkeypatch):
    # Every candidate kept, even at probability 0: after 3 unseeded FitNet iterations, every score of
    # a batch can underflow to 0 (seen once in CI), and a 0.0 threshold would leave nothing to compare.
    cfg = distill_cfg(f"{detector}_R34-R18_fitnet.yaml", teachers[detector], tmp_path / "train",
                      opts=["MODEL.RETINANET.SCORE_THRESH_TEST", -1.0, "MODEL.FCOS.SCORE_THRESH_TEST", -1.0])
    trainer = DistillTrainer(cfg)
    trainer.train()
    monkeypatch.chdir(tmp_path)
    weights, config, metadata = export_student(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), "export")
    config, metadata = os.path.abspath(config), os.path.abspath(metadata)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the exported folder is used from another directory
    with open(metadata) as f:
        assert json.load(f) == {"thing_classes": CLASS_NAMES, "dataset": cfg.DATASETS.TRAIN[0]}

    if detector == "retinanet":
        stock_cfg = get_cfg()  # plain detectron2, no project keys
    else:
        from d2_taskdistill import add_fcos_config  # detectron2 has FCOS only as a LazyConfig

        stock_cfg = get_cfg()
        add_fcos_config(stock_cfg)
    stock_cfg.merge_from_file(config)
    stock = build_model(stock_cfg)
    assert type(stock).__name__ == ("RetinaNet" if detector == "retinanet" else "FCOS")
    DetectionCheckpointer(stock).load(weights)

    inputs = [{"image": x["image"]} for x in tiny_batch[:2]]
    trained = trainer.model.eval()
    stock.eval()
    with torch.no_grad():
        expected, actual = trained(inputs), stock(inputs)
    for e, a in zip(expected, actual):
        e, a = e["instances"], a["instances"]
        assert len(e) > 0
        assert torch.equal(e.pred_boxes.tensor, a.pred_boxes.tensor)
        assert torch.equal(e.scores, a.scores)
        assert torch.equal(e.pred_classes, a.pred_classes)

    # As docs/usage.md shows a user: DefaultPredictor on the exported config (CPU), class names
    # from metadata.json under a fresh metadata name, and detectron2's Visualizer.
    assert stock_cfg.MODEL.DEVICE == "cpu"
    stock_cfg.DATASETS.TEST = ("exported_student_" + detector,)
    with open(metadata) as f:
        MetadataCatalog.get(stock_cfg.DATASETS.TEST[0]).set(thing_classes=json.load(f)["thing_classes"])
    predictor = DefaultPredictor(stock_cfg)
    image = tiny_batch[0]["image"].permute(1, 2, 0).numpy()  # BGR, HWC
    instances = predictor(image)["instances"].to("cpu")
    assert len(instances) > 0
    drawn = Visualizer(image[:, :, ::-1], predictor.metadata).draw_instance_predictions(instances)
    assert drawn.get_image().shape == image.shape
    assert predictor.metadata.thing_classes == CLASS_NAMES
