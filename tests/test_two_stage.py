"""Two-stage detectors (detectron2's GeneralizedRCNN): the feature losses between Faster R-CNNs,
and between a RetinaNet and a Faster R-CNN, on the levels of equal stride."""
import json
import logging
import os
import re

import pytest
import torch

from conftest import assert_same_detections, detections, distill_cfg, lazy_cfg

FEATURE_LOSSES = ["FITNET", "FGFI", "FGD", "PKD", "CWD"]
RCNN_OWN_LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}


def build(config, teacher, tmp_path, losses=FEATURE_LOSSES, opts=()):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(distill_cfg(config, teacher, tmp_path, opts=["MODEL.DEVICE", "cpu", "DISTILL.LOSSES", losses,
                                                                     *opts]))


def backbone_levels(detector, batch, names):
    with torch.no_grad():
        features = detector.backbone(detector.preprocess_image(batch).tensor)
    return [features[n] for n in names]


def hand_fitnet(adapter, student_levels, teacher_levels):
    """FitNet by hand: the mean over levels of sum((A(F_S) - F_T)^2) / (C * N * H * W)."""
    per_level = []
    for fs, ft in zip(student_levels, teacher_levels):
        diff = adapter.conv(fs) - ft
        per_level.append((diff ** 2).sum() / diff.numel())
    return sum(per_level) / len(per_level)


def training_losses(model, batch, seed=0):
    from detectron2.utils.events import EventStorage

    torch.manual_seed(seed)  # the ROI heads sample proposals at random
    with EventStorage():
        return model(batch)


def test_faster_rcnn_into_faster_rcnn_distils_p2_to_p6(rcnn_teacher, tiny_batch, tmp_path):
    from d2_taskdistill.modeling.rcnn_outputs import run_rcnn_detector

    model = build("faster_rcnn_R34-R18_fitnet.yaml", rcnn_teacher, tmp_path)
    assert model.level_pairs is None  # the same strides: every level, in order
    losses = training_losses(model, tiny_batch)
    assert RCNN_OWN_LOSSES | {"loss_distill_fitnet", "loss_distill_fgfi", "loss_distill_pkd", "loss_distill_cwd",
                              "loss_distill_fgd_fg"} <= set(losses)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())

    # The student's own losses are those GeneralizedRCNN.forward computes, at the same seed.
    alone = training_losses(model.student, tiny_batch)
    for name in RCNN_OWN_LOSSES:
        assert losses[name].item() == pytest.approx(alone[name].item(), rel=1e-6), name

    names = ["p2", "p3", "p4", "p5", "p6"]
    student_levels = backbone_levels(model.student, tiny_batch, names)
    teacher_levels = backbone_levels(model.teacher, tiny_batch, names)
    expected = hand_fitnet(model.distill_losses["FITNET"].adapter, student_levels, teacher_levels)
    assert losses["loss_distill_fitnet"].item() == pytest.approx(expected.item(), rel=1e-5)

    # FGD's masks and FGFI's region on the RPN's levels and anchors (3 per location, P2 at stride 4).
    gt = [x["instances"] for x in tiny_batch]
    with torch.no_grad():
        out = run_rcnn_detector(model.student, tiny_batch, gt, with_losses=False)
    assert out.feature_strides == [4, 8, 16, 32, 64]
    assert out.num_anchors == 3
    assert len(out.anchors_flat) == 3 * sum(h * w for h, w in out.level_shapes)
    assert out.level_shapes == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]

    sum(losses.values()).backward()
    assert model.student.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_a_retinanet_teacher_and_a_faster_rcnn_student_share_p3_to_p6(teachers, tiny_batch, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="d2_taskdistill"):
        model = build("retinanet_R34-faster_rcnn_R18_fgd.yaml", teachers["retinanet"], tmp_path, ["FITNET", "FGD"])
    assert model.level_pairs == ([1, 2, 3, 4], [0, 1, 2, 3])
    assert ("compare the levels of equal stride: student p3 - teacher p3 (stride 8), student p4 - teacher p4 "
            "(stride 16), student p5 - teacher p5 (stride 32), student p6 - teacher p6 (stride 64)") in caplog.text
    losses = training_losses(model, tiny_batch)
    assert RCNN_OWN_LOSSES <= set(losses)
    names = ["p3", "p4", "p5", "p6"]
    expected = hand_fitnet(model.distill_losses["FITNET"].adapter, backbone_levels(model.student, tiny_batch, names),
                           backbone_levels(model.teacher, tiny_batch, names))
    assert losses["loss_distill_fitnet"].item() == pytest.approx(expected.item(), rel=1e-5)
    # FGD's scale masks use the paired levels' strides, 8 to 64 (not the student's P2 stride 4).
    assert torch.isfinite(losses["loss_distill_fgd_fg"]) and losses["loss_distill_fgd_fg"] > 0


def test_a_faster_rcnn_teacher_and_a_retinanet_student(rcnn_teacher, tiny_batch, tmp_path):
    model = build("retinanet_R34-R18_fitnet.yaml", rcnn_teacher, tmp_path, ["FITNET"],
                  opts=["DISTILL.TEACHER.CONFIG_FILE", "configs/digits/faster_rcnn_R34_FPN_teacher.yaml"])
    assert model.level_pairs == ([0, 1, 2, 3], [1, 2, 3, 4])  # student P3-P6 (of P3-P7), teacher P3-P6 (of P2-P6)
    losses = training_losses(model, tiny_batch)
    assert {"loss_cls", "loss_box_reg", "loss_distill_fitnet"} == set(losses)  # RetinaNet's own, and FitNet


@pytest.mark.parametrize("config, teacher_config, loss, expected", [
    ("faster_rcnn_R34-R18_fitnet.yaml", None, "TID",
     "The student and teacher are two-stage (GeneralizedRCNN): losses ['TID'] compare dense heads"),
    ("retinanet_R34-R18_fitnet.yaml", "configs/digits/faster_rcnn_R34_FPN_teacher.yaml", "TBD",
     "The teacher is two-stage (GeneralizedRCNN): losses ['TBD'] compare dense heads"),
    ("retinanet_R34-faster_rcnn_R18_fgd.yaml", None, "BCKD",
     "The student is two-stage (GeneralizedRCNN): losses ['BCKD'] distil an R-CNN's RPN, a one-class dense head, "
     "into the RPN of another R-CNN: the teacher and the student must both be R-CNNs"),
])
def test_head_losses_that_cannot_run_are_refused_by_name(config, teacher_config, loss, expected, rcnn_teacher,
                                                         teachers, tmp_path):
    teacher = teachers["retinanet"] if "retinanet_R34-" in config and teacher_config is None else rcnn_teacher
    opts = ["DISTILL.TEACHER.CONFIG_FILE", teacher_config] if teacher_config else []
    with pytest.raises(ValueError) as error:
        build(config, teacher, tmp_path, [loss], opts)
    message = str(error.value)
    assert expected in message
    assert "'CWD', 'FGD', 'FGFI', 'FITNET', 'PKD'" in message and "DISTILL.LOSSES" in message


def flat_rpn_outputs(rpn, features):
    """The RPN head's objectness (N, R) and decoded boxes (N, R, 4), in detectron2's (level, y, x,
    anchor) order, and its anchors."""
    objectness, deltas = rpn.rpn_head(features)
    anchors = torch.cat([a.tensor for a in rpn.anchor_generator(features)])
    logits = torch.cat([o.permute(0, 2, 3, 1).reshape(o.shape[0], -1) for o in objectness], dim=1)
    deltas = torch.cat([d.view(d.shape[0], -1, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(d.shape[0], -1, 4)
                        for d in deltas], dim=1)
    boxes = torch.stack([rpn.box2box_transform.apply_deltas(d, anchors) for d in deltas])
    return logits, boxes, anchors


def elementwise_giou(a, b):
    lt, rb = torch.max(a[..., :2], b[..., :2]), torch.min(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).prod(-1)
    return inter / union - (hull - union) / hull


def test_bckd_distils_the_rpn_of_two_faster_rcnns(rcnn_teacher, tiny_batch, tmp_path):
    """BCKD on the RPNs, by hand: BCE(z_S, p_T) |p_T - p_S| over every anchor, and
    (1 - GIoU) of both RPNs' decoded proposals weighted by |p_T - p_S|, each over the student
    RPN's matched positives (IoU >= 0.7, or an object's best anchor)."""
    from detectron2.structures import Boxes, pairwise_iou

    model = build("faster_rcnn_R34-R18_fitnet.yaml", rcnn_teacher, tmp_path, ["BCKD"])
    losses = training_losses(model, tiny_batch)
    assert RCNN_OWN_LOSSES | {"loss_distill_bckd_cls", "loss_distill_bckd_loc"} == set(losses)

    names = ["p2", "p3", "p4", "p5", "p6"]
    with torch.no_grad():
        z_s, boxes_s, anchors = flat_rpn_outputs(model.student.proposal_generator,
                                                 backbone_levels(model.student, tiny_batch, names))
        z_t, boxes_t, _ = flat_rpn_outputs(model.teacher.proposal_generator,
                                           backbone_levels(model.teacher, tiny_batch, names))
    assert z_s.shape[1] == 3 * (32 ** 2 + 16 ** 2 + 8 ** 2 + 4 ** 2 + 2 ** 2)
    p_s, p_t = z_s.sigmoid(), z_t.sigmoid()
    positives = 0
    for x in tiny_batch:  # the RPN's matcher: IoU >= 0.7, and each object's best anchors
        iou = pairwise_iou(x["instances"].gt_boxes, Boxes(anchors))
        best = iou.max(dim=1, keepdim=True).values
        positives += int(((iou.max(dim=0).values >= 0.7) | ((iou == best) & (best > 0)).any(dim=0)).sum())
    bce = -(p_t * torch.log(p_s) + (1 - p_t) * torch.log(1 - p_s))
    bckd = model.distill_losses["BCKD"]
    expected_cls = bckd.cls_weight * (bce * (p_t - p_s).abs()).sum() / positives
    expected_loc = bckd.loc_weight * ((1 - elementwise_giou(boxes_s, boxes_t)) * (p_t - p_s).abs()).sum() / positives
    assert losses["loss_distill_bckd_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-4)
    assert losses["loss_distill_bckd_loc"].item() == pytest.approx(expected_loc.item(), rel=1e-4)


def test_mask_rcnn_distillation_trains_and_evaluates_boxes_and_masks(rcnn_teacher, tiny_dataset, tiny_batch, tmp_path):
    """train_net.py's trainer on a Mask R-CNN student with a Faster R-CNN teacher: the teacher
    evaluated at the start, the student trained on the digits' masks (the teacher untouched),
    saved without the teacher and evaluated at the end, boxes and masks."""
    from d2_taskdistill.engine import DistillTrainer

    out = tmp_path / "run"
    cfg = distill_cfg("mask_rcnn_R34-R18_fgd.yaml", rcnn_teacher, out, max_iter=2,
                      opts=["DISTILL.TEACHER.EVAL_AT_START", True, "SOLVER.CHECKPOINT_PERIOD", 100,
                            "DISTILL.TEACHER.CONFIG_FILE", "configs/digits/faster_rcnn_R34_FPN_teacher.yaml",
                            # Untrained, no score reaches 0.05: keep every detection, so that masks are evaluated.
                            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    trainer = DistillTrainer(cfg)
    teacher_before = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert all(torch.equal(v, teacher_before[k]) for k, v in trainer.model.teacher.state_dict().items())
    history = trainer.storage.histories()
    assert all(torch.isfinite(torch.tensor(history[k].latest())) for k in ("loss_mask", "loss_distill_fgd_fg"))
    saved = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert any(k.startswith("student.roi_heads.mask_head") for k in saved)
    assert not any(k.startswith("teacher") for k in saved)
    with open(out / "teacher_eval.json") as f:
        assert "AP" in json.load(f)[tiny_dataset]["bbox"]
    with open(out / "metrics.json") as f:
        evaluations = [json.loads(line) for line in f if "bbox/AP" in line]
    assert len(evaluations) == 1 and "segm/AP" in evaluations[0]  # after the last iteration

    # The export: a plain Mask R-CNN config and weights that load into it whole, masks included.
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from d2_taskdistill.export import export_student

    weights, config_file, _ = export_student(cfg, str(out / "model_final.pth"), str(tmp_path / "export"))
    plain = get_cfg()
    plain.merge_from_file(config_file)
    assert (plain.MODEL.META_ARCHITECTURE, plain.MODEL.MASK_ON, plain.MODEL.ROI_HEADS.NUM_CLASSES) == (
        "GeneralizedRCNN", True, 10)
    exported = build_model(plain)
    DetectionCheckpointer(exported).load(weights)
    student = {k.removeprefix("student."): v for k, v in saved.items() if k.startswith("student.")}
    assert exported.state_dict().keys() == student.keys()
    assert all(torch.equal(v, student[k]) for k, v in exported.state_dict().items())
    assert_same_detections(detections(trainer.model.student, tiny_batch), detections(exported, tiny_batch))


def test_the_mixed_pair_py_twin_builds_the_yaml_model(teachers, tmp_path):
    from detectron2.config import instantiate



    name = "retinanet_R34-faster_rcnn_R18_fgd"
    from_yaml = build(name + ".yaml", teachers["retinanet"], tmp_path, ["FGD"])
    torch.manual_seed(0)
    from_py = instantiate(lazy_cfg(name + ".py", teachers["retinanet"], tmp_path).model)
    assert repr(from_py) == repr(from_yaml) and from_py.level_pairs == from_yaml.level_pairs
    a, b = from_yaml.state_dict(), from_py.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_an_rcnn_teacher_whose_keys_do_not_load(teachers, tmp_path):
    """A RetinaNet checkpoint given as the Faster R-CNN teacher's weights: a hard error that
    names the setting and the keys, as for dense teachers."""
    with pytest.raises(KeyError) as error:
        build("faster_rcnn_R34-R18_fgd.yaml", teachers["retinanet"], tmp_path, ["FGD"])
    message = str(error.value)
    assert "DISTILL.TEACHER.WEIGHTS=" in message and "retinanet.pth" in message
    assert "'roi_heads.box_predictor.cls_score.weight'" in message.split("missing keys: ")[1].split("]")[0]
    assert "'head.cls_score.weight'" in message.split("unexpected keys: ")[1].split("]")[0]


def test_figures_of_a_two_stage_run_are_refused_by_name(rcnn_teacher, tiny_batch, tmp_path):
    from d2_taskdistill.visualize import visualize_batch

    model = build("faster_rcnn_R34-R18_fgd.yaml", rcnn_teacher, tmp_path, ["FGD"])
    with pytest.raises(ValueError, match="this run's student is a GeneralizedRCNN, whose figures are not built yet"):
        visualize_batch(model, tiny_batch, str(tmp_path / "figures"), "BGR")


def test_a_py_faster_rcnn_distillation_trains(rcnn_teacher, tiny_dataset, tmp_path):
    """The .py path: LazyDistillTrainer on the PKD + BCKD twin, its class count read from the
    student's ROI heads for the dataset check."""
    from conftest import without_checkpoints_or_evaluation
    from d2_taskdistill.lazy_engine import LazyDistillTrainer, num_classes_setting

    lazy = lazy_cfg("faster_rcnn_R34-R18_pkd_bckd.py", rcnn_teacher, tmp_path)
    trainer = without_checkpoints_or_evaluation(LazyDistillTrainer(lazy))
    assert num_classes_setting(trainer.model.student, "model.student") == ("model.student.roi_heads.num_classes", 10)
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = {k: v[0] for k, v in trainer.storage.latest().items()}
    for name in (*RCNN_OWN_LOSSES, "loss_distill_pkd", "loss_distill_bckd_cls", "loss_distill_bckd_loc"):
        assert torch.isfinite(torch.tensor(latest[name])) and latest[name] > 0, name


def test_roi_kd_scores_the_students_proposals_with_the_teachers_box_head(rcnn_teacher, tiny_batch, tmp_path):
    """ROI_KD by hand: the proposals the student sampled (at the same seed, by its own forward)
    pooled from the teacher's P2-P5 through the teacher's box head; T^2 KL(p_T || p_S) at T = 2
    averaged over the proposals, and 1 - GIoU of both heads' boxes for each object's class
    averaged over the proposals matched to an object."""
    import torch.nn.functional as F
    from detectron2.utils.events import EventStorage

    from d2_taskdistill.modeling.rcnn_outputs import capturing_training_outputs

    model = build("faster_rcnn_R34-R18_roi_kd.yaml", rcnn_teacher, tmp_path, ["ROI_KD"],
                  opts=["DISTILL.ROI_KD.TEMPERATURE", 2.0, "DISTILL.ROI_KD.BOX_WEIGHT", 3.0])
    losses = training_losses(model, tiny_batch)
    assert RCNN_OWN_LOSSES | {"loss_distill_roi_cls", "loss_distill_roi_box"} == set(losses)

    torch.manual_seed(0)
    with EventStorage(), capturing_training_outputs(model.student) as captured:
        alone = model.student(tiny_batch)
    assert alone["loss_cls"].item() == pytest.approx(losses["loss_cls"].item(), rel=1e-6)  # the same samples
    proposals = captured["roi_samples"]
    student_scores, student_deltas = captured["roi_predictions"]
    heads = model.teacher.roi_heads
    with torch.no_grad():
        pooled = heads.box_pooler(backbone_levels(model.teacher, tiny_batch, ["p2", "p3", "p4", "p5"]),
                                  [p.proposal_boxes for p in proposals])
        teacher_scores, teacher_deltas = heads.box_predictor(heads.box_head(pooled))
        p_t = F.softmax(teacher_scores / 2.0, dim=1)
        log_p_s = F.log_softmax(student_scores / 2.0, dim=1)
        expected_cls = (p_t * (p_t.log() - log_p_s)).sum() * 4.0 / len(student_scores)

        classes = torch.cat([p.gt_classes for p in proposals])
        foreground = classes < 10
        assert 0 < foreground.sum() < len(classes)
        boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])[foreground]
        rows = torch.arange(len(classes))[foreground]
        columns = (4 * classes[foreground])[:, None] + torch.arange(4)
        decode = model.student.roi_heads.box_predictor.box2box_transform.apply_deltas
        student_boxes = decode(student_deltas[rows[:, None], columns], boxes)
        teacher_boxes = decode(teacher_deltas[rows[:, None], columns], boxes)
        expected_box = 3.0 * (1 - elementwise_giou(student_boxes, teacher_boxes)).mean()
    assert losses["loss_distill_roi_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-4)
    assert losses["loss_distill_roi_box"].item() == pytest.approx(expected_box.item(), rel=1e-4)


def test_roi_kd_refuses_a_dense_teacher(teachers, tmp_path):
    with pytest.raises(ValueError, match=r"Losses \['ROI_KD'\] distil an R-CNN's ROI heads into another's: the "
                                         r"teacher and the student must both be two-stage \(GeneralizedRCNN\), and "
                                         r"the teacher is not"):
        build("retinanet_R34-faster_rcnn_R18_fgd.yaml", teachers["retinanet"], tmp_path, ["ROI_KD"])


def test_roi_kd_mask_term_on_the_foreground_proposals(tiny_digits, mask_rcnn_teacher, tmp_path):
    """Two Mask R-CNNs, MASK_WEIGHT 2: the teacher's mask head on the foreground proposals the
    student's mask head trained on; BCE(z_S, sigmoid(z_T)) of each proposal's class channel, by
    hand, averaged over the 28 x 28 pixels and the proposals."""
    import torch.nn.functional as F
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json
    import detectron2.data.transforms as T
    from detectron2.utils.events import EventStorage

    from d2_taskdistill.modeling.rcnn_outputs import capturing_training_outputs

    json_path, image_root = tiny_digits
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(128, 128)], image_format="BGR",
                           use_instance_mask=True, instance_mask_format="bitmask")
    batch = [mapper(d) for d in load_coco_json(json_path, image_root, "digits_tiny_masks")[:4]]
    model = build("mask_rcnn_R34-R18_fgd.yaml", mask_rcnn_teacher, tmp_path, ["ROI_KD"], opts=["DISTILL.ROI_KD.MASK_WEIGHT", 2.0])
    with torch.no_grad():  # mask predictors start at std 0.001: every class channel near 0 would hide a wrong one
        for detector in (model.student, model.teacher):
            torch.nn.init.normal_(detector.roi_heads.mask_head.predictor.weight, std=0.3)
    losses = training_losses(model, batch)
    assert {"loss_mask", "loss_distill_roi_cls", "loss_distill_roi_box", "loss_distill_roi_mask"} <= set(losses)

    torch.manual_seed(0)
    with EventStorage(), capturing_training_outputs(model.student) as captured:
        model.student(batch)
    proposals, student_logits = captured["mask_samples"], captured["mask_logits"]
    classes = torch.cat([p.gt_classes for p in proposals])
    assert student_logits.shape == (len(classes), 10, 28, 28) and (classes < 10).all()
    heads = model.teacher.roi_heads
    with torch.no_grad():
        pooled = heads.mask_pooler(backbone_levels(model.teacher, batch, ["p2", "p3", "p4", "p5"]),
                                   [p.proposal_boxes for p in proposals])
        teacher_logits = heads.mask_head.layers(pooled)
        rows = torch.arange(len(classes))
        z_s, p_t = student_logits[rows, classes], teacher_logits[rows, classes].sigmoid()
        bce = -(p_t * F.logsigmoid(z_s) + (1 - p_t) * F.logsigmoid(-z_s))
        expected = 2.0 * bce.mean(dim=(1, 2)).mean()
    assert losses["loss_distill_roi_mask"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_roi_kd_mask_term_needs_two_mask_rcnns(rcnn_teacher, tmp_path):
    with pytest.raises(ValueError, match=r"DISTILL.ROI_KD.MASK_WEIGHT=2.0 distils mask logits, but the student has no "
                                         r"mask head"):
        build("faster_rcnn_R34-R18_roi_kd.yaml", rcnn_teacher, tmp_path, ["ROI_KD"],
              opts=["DISTILL.ROI_KD.MASK_WEIGHT", 2.0])


def test_the_new_baselines_mask_rcnn_py_config_builds_a_compatible_pair(monkeypatch):
    """configs/COCO-InstanceSegmentation: the zoo's new-baselines R50 recipe as the student, its
    R101 400-epoch Mask R-CNN as the teacher (built here from its config, without weights): FGD and
    ROI_KD with its mask term accept the pair."""
    from detectron2.config import instantiate

    from conftest import ROOT, config_path
    from d2_taskdistill.lazy_engine import load_lazy_config
    from d2_taskdistill.losses import FGD, ROI_KD
    from d2_taskdistill.modeling.meta_arch import check_losses_compatible, distilled_levels
    from d2_taskdistill.modeling.teacher import teacher_origin_from

    monkeypatch.chdir(ROOT)
    cfg = load_lazy_config(config_path("COCO-InstanceSegmentation", "mask_rcnn_R101-R50_100ep_LSJ_fgd_roi_kd.py"),
                           ["train.device=cpu"])
    student = instantiate(cfg.model.student)
    teacher = teacher_origin_from(cfg.model.teacher.config_file, cfg.model.teacher.weights).build_model()
    assert student.backbone.bottom_up.stages[0][0].conv1.norm.__class__.__name__ == "SyncBatchNorm"
    assert len(teacher.backbone.bottom_up.res4) == 23 and len(student.backbone.bottom_up.res4) == 6  # R101, R50
    assert distilled_levels(student) == distilled_levels(teacher) == ["p2", "p3", "p4", "p5", "p6"]
    losses = {name: instantiate({**spec, "student_shapes": [], "teacher_shapes": []}) if name == "ROI_KD" else None
              for name, spec in cfg.model.losses.items()}
    assert losses["ROI_KD"].mask_weight == 1.0
    check_losses_compatible(student, teacher, {"FGD": FGD, "ROI_KD": ROI_KD})
    losses["ROI_KD"].check_detectors(student, teacher)


def test_detectors_without_a_common_stride_are_refused(rcnn_teacher, tmp_path):
    """The student's RPN reads P2 alone, the teacher's P3-P6 (MODEL.RPN.IN_FEATURES, one anchor
    size per level): no level to compare, an error that names both strides."""
    from detectron2.modeling import build_model

    cfg = distill_cfg("faster_rcnn_R34-R18_fitnet.yaml", rcnn_teacher, tmp_path,
                      opts=["MODEL.DEVICE", "cpu", "MODEL.RPN.IN_FEATURES", ["p2"], "MODEL.ANCHOR_GENERATOR.SIZES",
                            [[16]]],
                      teacher_opts=["MODEL.RPN.IN_FEATURES", ["p3", "p4", "p5", "p6"],
                                    "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256]]])
    with pytest.raises(ValueError, match=r"Teacher and student share no FPN stride \(student \[4\], teacher "
                                         r"\[8, 16, 32, 64\]\)"):
        build_model(cfg)


@pytest.mark.parametrize("lazy", [False, True])
def test_a_class_count_mismatch_names_the_roi_heads_setting(lazy, rcnn_teacher, tmp_path):
    """A Faster R-CNN student of 5 classes under a 10-class teacher: the error names the R-CNN's
    class setting in the config's own words."""
    from detectron2.modeling import build_model

    from d2_taskdistill.lazy_engine import build_model as build_lazy_model

    if lazy:
        cfg = lazy_cfg("faster_rcnn_R34-R18_fgd.py", rcnn_teacher, tmp_path, overrides=[
            "model.student.roi_heads.num_classes=5"])
        expected, make = "set model.student.roi_heads.num_classes to 10", lambda: build_lazy_model(cfg)
    else:
        cfg = distill_cfg("faster_rcnn_R34-R18_fgd.yaml", rcnn_teacher, tmp_path,
                          opts=["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", 5])
        expected, make = "set MODEL.ROI_HEADS.NUM_CLASSES to 10", lambda: build_model(cfg)
    with pytest.raises(ValueError, match=r"Teacher has 10 classes, student 5: .*" + re.escape(expected)):
        make()


def test_a_mask_rcnn_on_a_dataset_without_masks_names_the_setting(tiny_digits, tmp_path):
    """Three annotations without 'segmentation': an error before the first step (detectron2's
    mapper would build no gt_masks and the mask loss fail), naming MODEL.MASK_ON and the dataset."""
    from d2_taskdistill.data.config_datasets import check_datasets

    json_path, image_root = tiny_digits
    with open(json_path) as f:
        data = json.load(f)
    for annotation in data["annotations"][:3]:
        del annotation["segmentation"]
    partly_masked = tmp_path / "partly_masked.json"
    partly_masked.write_text(json.dumps(data))
    cfg = distill_cfg("mask_rcnn_R34-R18_fgd.yaml", "unused.pth", tmp_path, opts=[
        "DATASETS.COCO", [["digits_partly_masked", str(partly_masked), image_root]],
        "DATASETS.TRAIN", ("digits_partly_masked",), "DATASETS.TEST", ("digits_partly_masked",)])
    total = len(data["annotations"])
    with pytest.raises(ValueError, match=re.escape(
            f"MODEL.MASK_ON trains a mask head, but 3 of the {total} annotations of dataset 'digits_partly_masked' "
            "(DATASETS.TRAIN) have no instance mask ('segmentation')") + r".*or train boxes only: set MODEL.MASK_ON False"):
        check_datasets(cfg)
    cfg.defrost()
    cfg.MODEL.MASK_ON = False  # the same data trains a Faster R-CNN
    check_datasets(cfg)


def test_a_py_mask_rcnn_whose_loader_drops_the_masks(mask_rcnn_teacher, tiny_dataset, tmp_path):
    from d2_taskdistill.lazy_engine import LazyDistillTrainer

    lazy = lazy_cfg("mask_rcnn_R34-R18_fgd.py", mask_rcnn_teacher, tmp_path,
                    overrides=["dataloader.train.mapper.use_instance_mask=False"])
    with pytest.raises(ValueError, match=re.escape(
            "model.student.roi_heads.mask_head trains a mask head, but dataloader.train.mapper.use_instance_mask is "
            "not True: the loader drops the masks")):
        LazyDistillTrainer(lazy)


def test_a_py_mask_rcnn_run_exports_and_evaluates_without_its_teacher(mask_rcnn_teacher, tiny_dataset, tiny_batch,
                                                                       tmp_path):
    """The .py twin of the Mask R-CNN FGD + ROI_KD run: trained 2 steps and evaluated (boxes and
    masks); its export loads into detectron2's own GeneralizedRCNN and gives the same boxes,
    scores, classes and masks; --eval-only of the run needs no teacher checkpoint and gives the
    run's AP."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    from d2_taskdistill.export import export_lazy_student
    from d2_taskdistill.lazy_engine import LazyDistillTrainer, evaluate_only

    # Untrained, no score reaches 0.05: keep every detection, so that masks are evaluated.
    lazy = lazy_cfg("mask_rcnn_R34-R18_fgd_roi_kd.py", mask_rcnn_teacher, tmp_path / "run",
                    overrides=["model.student.roi_heads.box_predictor.test_score_thresh=0.0"])
    trainer = LazyDistillTrainer(lazy)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.storage.latest()["loss_distill_roi_mask"][0] > 0
    trained = trainer.last_eval_results[tiny_dataset]
    assert {"bbox", "segm"} <= set(trained)
    weights = str(tmp_path / "run" / "model_final.pth")
    before = detections(trainer.unwrapped_model, tiny_batch)
    assert all("pred_masks" in d for d in before)

    _, config_file, _ = export_lazy_student(lazy, weights, str(tmp_path / "exported"))
    plain = LazyConfig.load(config_file)
    student = instantiate(plain.model)
    assert type(student).__name__ == "GeneralizedRCNN" and student.roi_heads.mask_on
    DetectionCheckpointer(student).load(plain.train.init_checkpoint)
    assert_same_detections(before, detections(student, tiny_batch))

    os.rename(mask_rcnn_teacher, mask_rcnn_teacher + ".moved")
    try:
        lazy.train.init_checkpoint = weights
        results = evaluate_only(lazy)[tiny_dataset]
        assert (results["bbox"]["AP"], results["segm"]["AP"]) == (trained["bbox"]["AP"], trained["segm"]["AP"])
    finally:
        os.rename(mask_rcnn_teacher + ".moved", mask_rcnn_teacher)


def test_a_meta_architecture_neither_dense_nor_an_rcnn_is_named(rcnn_teacher, tmp_path):
    """detectron2's RPN-only ProposalNetwork as the student: refused by name, with what is supported."""
    with pytest.raises(ValueError, match=re.escape("DISTILL.STUDENT_ARCHITECTURE='ProposalNetwork'; must be one of ")
                       + r".*GeneralizedRCNN"):
        build("faster_rcnn_R34-R18_fitnet.yaml", rcnn_teacher, tmp_path, ["FITNET"],
              opts=["DISTILL.STUDENT_ARCHITECTURE", "ProposalNetwork"])
