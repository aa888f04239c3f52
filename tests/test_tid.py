"""TID: hand-computed masks and losses on toy tensors, and real training steps."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2_taskdistill import load_config
from d2_taskdistill.losses.maps import local_maxima, top_fraction_mask, unflatten_levels
from d2_taskdistill.losses.tid import (
    TID,
    classification_score,
    information_value,
    regression_score,
    tier_mask,
)
from conftest import config_path, distill_cfg, TEST_DEVICE


def test_regression_score_at_and_around_thresholds():
    iou = torch.tensor([0.0, 0.39, 0.4, 0.41, 0.49, 0.5, 0.51, 1.0])
    expected = torch.tensor([0.4, 0.4, 0.4, 1.5, 1.5, 2.0, 2.0, 2.0])
    assert torch.equal(regression_score(iou, 0.4, 0.5), expected)


def test_classification_score_top_fraction_with_ties():
    # 8 locations, 3 classes; the image's GT has classes 0 and 2, class 1 is ignored.
    scores = torch.tensor([[
        [0.9, 0.1, 0.2], [0.1, 0.1, 0.7], [0.7, 0.0, 0.3], [0.1, 0.99, 0.1],
        [0.2, 0.0, 0.2], [0.3, 0.0, 0.0], [0.0, 0.0, 0.05], [0.6, 0.0, 0.0],
    ]])
    gt_classes = torch.tensor([[True, False, True]])
    # GT-class scores: .9 .7 .7 .1 .2 .3 .05 .6; top 25% -> k = 2, the 2nd is .7, tied twice.
    score_c = classification_score(scores, gt_classes, 0.25)
    assert torch.equal(score_c, torch.tensor([[1.5, 1.5, 1.5, 1, 1, 1, 1, 1]]))
    # Without GT classes nothing is selected.
    assert torch.equal(classification_score(scores, torch.zeros(1, 3, dtype=torch.bool), 0.25), torch.ones(1, 8))


def test_weak_area_with_and_without_nms():
    gap = torch.tensor([[[0.9, 0.8, 0.0],
                         [0.7, 0.0, 0.0],
                         [0.0, 0.0, 0.6]]])
    flat = gap.flatten(1)
    candidates = flat > 0
    # Without NMS the top 2 (k = ceil(0.2 * 9 locations)) of the gap pile up on one corner.
    everywhere = torch.ones_like(candidates)
    assert torch.nonzero(top_fraction_mask(flat, 0.2, candidates, everywhere))[:, 1].tolist() == [0, 1]
    # With a 3x3 NMS only local maxima compete: 0.9 and 0.6.
    peaks = local_maxima([gap], 3)[0].flatten(1)
    assert torch.nonzero(peaks & candidates)[:, 1].tolist() == [0, 8]
    assert torch.nonzero(top_fraction_mask(flat, 0.2, candidates & peaks, everywhere))[:, 1].tolist() == [0, 8]
    # A larger fraction cannot select more than the candidates.
    assert top_fraction_mask(flat, 0.9, candidates & peaks, everywhere).sum() == 2


def test_information_value_band_fall_off():
    box = torch.tensor([[[10.0, 10.0, 30.0, 30.0]]])  # sqrt(area) 20, band 0.5 * 20 = 10
    points = torch.tensor([[20.0, 20.0], [30.0, 20.0], [35.0, 20.0], [40.0, 20.0],
                           [33.0, 34.0], [50.0, 50.0], [17.5, 10.0]])
    v = information_value(points, box, torch.tensor([[True]]), 0.5)
    expected = torch.tensor([[1.0, 1.0, 0.5, 0.0, 0.5, 0.0, 1.0]])
    assert torch.allclose(v, expected)
    # A padded (invalid) box contributes nothing.
    two = torch.cat([box, torch.tensor([[[40.0, 10.0, 60.0, 30.0]]])], dim=1)
    assert torch.allclose(information_value(points, two, torch.tensor([[True, False]]), 0.5), expected)


def test_tier_mask():
    v = torch.tensor([2.0, 1.0, 0.99, 0.5, 0.01, 0.0099, 0.0])
    expected = torch.tensor([2.0, 1.0, 0.693, 0.35, 0.007, 0.000495, 0.0])
    assert torch.allclose(tier_mask(v), expected)


class ToyOutputs:
    """DenseOutputs' interface on two levels (2x2, stride 16; 1x1, stride 32), A = 1, K = 2."""

    level_shapes = [(2, 2), (1, 1)]
    thr_neg, thr_pos = 0.4, 0.5

    def __init__(self, iou_max, class0_scores, features):
        self.iou_max = torch.tensor([iou_max])
        scores = torch.tensor(class0_scores)
        self.scores_flat = torch.stack([scores, torch.full_like(scores, 0.99)], dim=1)[None]
        self.gt_class_mask = torch.tensor([[True, False]])
        self.valid_mask = torch.ones(1, 5, dtype=torch.bool)
        self.features = features
        gt = Instances((32, 32))
        gt.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
        gt.gt_classes = torch.tensor([0])
        self.gt_instances = [gt]
        # Position centres (8,8) (24,8) (8,24) (24,24) on level 0, (16,16) on level 1.
        self.anchors = [
            Boxes(torch.tensor([[0.0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]])),
            Boxes(torch.tensor([[0.0, 0, 32, 32]])),
        ]

    def to_maps(self, flat):
        return unflatten_levels(flat, self.level_shapes)


def toy_tid(**overrides):
    cfg = load_config(config_path("digits", "retinanet_R34-R18_tid.yaml"))
    cfg.DISTILL.TID.CLS_TOP_FRACTION = 0.2
    cfg.DISTILL.TID.KEY_FRACTION = 0.2
    cfg.DISTILL.TID.WEAK_FRACTION = 0.2
    for k, v in overrides.items():
        setattr(cfg.DISTILL.TID, k, v)
    from detectron2.layers import ShapeSpec

    tid = TID(cfg, [ShapeSpec(channels=2)] * 2, [ShapeSpec(channels=2)] * 2)
    with torch.no_grad():  # identity adapter
        tid.adapter.conv.weight.copy_(torch.eye(2)[:, :, None, None])
        tid.adapter.conv.bias.zero_()
    return tid


def toy_pair():
    teacher_features = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    student_level0 = torch.full((1, 2, 2, 2), 5.0)
    student_level0[0, :, 0, 0] = torch.tensor([1.0, 3.0])
    student_features = [student_level0, torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)]
    # Teacher: Score_r 2 1.5 .4 .4 .4; Score_c 1.5 on the top 20% (one location) -> Score_T 3 1.5 .4 .4 .4.
    teacher = ToyOutputs([0.6, 0.45, 0.1, 0.1, 0.3], [0.9, 0.2, 0.1, 0.1, 0.3], teacher_features)
    # Student: Score_r .4 1.5 .4 .4 .4; top class score at location 1 -> Score_S .4 2.25 .4 .4 .4.
    student = ToyOutputs([0.3, 0.45, 0.1, 0.1, 0.3], [0.1, 0.5, 0.1, 0.1, 0.2], student_features)
    return student, teacher


def test_tid_masks_and_loss_on_two_levels():
    student, teacher = toy_pair()
    tid = toy_tid()
    m = tid.masks(student, teacher)
    assert torch.allclose(m.score_teacher, torch.tensor([[3.0, 1.5, 0.4, 0.4, 0.4]]))
    assert torch.allclose(m.score_student, torch.tensor([[0.4, 2.25, 0.4, 0.4, 0.4]]))
    assert m.key_area.tolist() == [[True, False, False, False, False]]
    # Gap 2.6 -.75 0 0 0: only location 0 is a positive local maximum.
    assert m.weak_area.tolist() == [[True, False, False, False, False]]
    assert torch.allclose(m.value_output, torch.tensor([[4.5, 0.4, 0.4, 0.4, 0.4]]))
    # Inside the GT box: (8,8) and (16,16) on the box corner; the others are a full band away.
    assert torch.allclose(m.information, torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]]))
    assert torch.allclose(m.mask, torch.tensor([[4.5, 0.0, 0.0, 0.0, 0.28]]))

    # Squared errors averaged over channels: (1 + 9) / 2 = 5 at location 0, (4 + 0) / 2 = 2 on level 1.
    loss = tid(student, teacher)["loss_distill_tid"]
    assert loss.item() == pytest.approx((4.5 * 5 + 0.28 * 2) / (4.5 + 0.28), rel=1e-6)
    per_level = toy_tid(NORMALIZER="per_level")(student, teacher)["loss_distill_tid"]
    assert per_level.item() == pytest.approx((4.5 * 5 / 4 + 0.28 * 2 / 1) / 2, rel=1e-6)


def test_tid_ablation_switches():
    student, teacher = toy_pair()
    assert torch.allclose(toy_tid(IMPORTANCE="cls").masks(student, teacher).score_teacher,
                          torch.tensor([[1.5, 1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(toy_tid(IMPORTANCE="reg").masks(student, teacher).score_teacher,
                          torch.tensor([[2.0, 1.5, 0.4, 0.4, 0.4]]))
    iou = toy_tid(REG_SCORE_MODE="iou").masks(student, teacher)
    assert torch.allclose(iou.score_teacher, torch.tensor([[0.9, 0.45, 0.1, 0.1, 0.3]]))
    assert torch.allclose(toy_tid(AREAS="key").masks(student, teacher).value_output,
                          torch.tensor([[3.0, 0.4, 0.4, 0.4, 0.4]]))
    assert torch.allclose(toy_tid(AREAS="weak").masks(student, teacher).value_output,
                          torch.tensor([[1.5, 1.0, 1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"TID\(areas='all'\)"):
        toy_tid(AREAS="all")


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_tid_zero_when_student_matches_teacher(detector, tiny_batch, tmp_path):
    # The teacher is the student's own config and weights, the adapter the identity.
    student_cfg = load_config(config_path("digits", f"{detector}_R18_FPN_student.yaml"), ["MODEL.DEVICE", TEST_DEVICE])
    torch.manual_seed(0)
    twin = build_model(student_cfg)
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(twin, save_dir=str(tmp_path)).save("twin")
    cfg = distill_cfg(f"{detector}_R34-R18_tid.yaml", str(tmp_path / "twin.pth"), tmp_path,
                      opts=["DISTILL.TEACHER.CONFIG_FILE", config_path("digits", f"{detector}_R18_FPN_student.yaml")],
                      teacher_opts=["MODEL.RESNETS.DEPTH", 18, "MODEL.FPN.OUT_CHANNELS", 64])
    model = build_model(cfg)
    model.student.load_state_dict(twin.state_dict())
    adapter = model.distill_losses["TID"].adapter.conv
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(64)[:, :, None, None])
        adapter.bias.zero_()
    model.train()
    model.student.eval()  # BatchNorm as in the teacher, so the features are identical
    with EventStorage(0):
        losses = model(tiny_batch[:2])
    assert losses["loss_distill_tid"].item() == 0.0
    assert model.distill_losses["TID"].last_masks.mask.sum() > 0  # the mask itself is not empty
