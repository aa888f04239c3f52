"""TBD (reconstruction), FITNET and FGFI: hand-computed values and real training steps."""
import math

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from d2_taskdistill import load_config
from d2_taskdistill.losses import FITNET, TBD, harmonious_share, harmony_score, imitation_mask
from d2_taskdistill.losses.maps import unflatten_levels
from conftest import config_path


def test_harmony_score_hand_values():
    s = torch.tensor([0.0, 0.7, 0.0, 0.6, 0.5, 1.0])
    u = torch.tensor([0.9, 0.0, 0.0, 0.6, 1.0, 1.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.6, 2 * 0.5 / 1.5, 1.0])
    assert torch.allclose(harmony_score(s, u), expected)
    # High only when both are high: .9 and .1 give less than their mean.
    assert harmony_score(torch.tensor(0.9), torch.tensor(0.1)).item() == pytest.approx(0.18)


def test_harmonious_share_as_defined():
    hs = torch.tensor([[0.9, 0.5, 0.49, 0.1, 0.95]])
    positive = torch.tensor([[True, True, True, True, False]])
    # Positives with HS >= .5: .9 and .5 of four.
    assert harmonious_share(hs, positive, 0.5) == 0.5
    assert math.isnan(harmonious_share(hs, torch.zeros_like(positive), 0.5))


def tbd_module(**overrides):
    cfg = load_config(config_path("digits", "retinanet_R34-R18_tbd.yaml"))
    for k, v in overrides.items():
        setattr(cfg.DISTILL.TBD, k, v)
    return TBD(cfg, [ShapeSpec(channels=2)] * 2, [ShapeSpec(channels=2)] * 2)


class ToyOutputs:
    """One image, two locations (level shapes [(1, 1), (1, 1)]), two classes."""

    num_classes = 2
    level_shapes = [(1, 1), (1, 1)]

    def __init__(self, logits, boxes, iou_max=(0.0, 0.0)):
        self.logits_flat = torch.tensor([logits], requires_grad=True)
        self.scores_flat = self.logits_flat.sigmoid()
        self.pred_boxes = torch.tensor([boxes], requires_grad=True)
        self.valid_mask = torch.ones(1, 2, dtype=torch.bool)
        self.iou_max = torch.tensor([iou_max])
        self.features = [torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)]
        # Location 0 is assigned class 1 with GT box (0, 0, 10, 10); location 1 is background.
        self.assigned_labels = torch.tensor([[1, 2]])
        self.assigned_boxes = torch.tensor([[[0.0, 0, 10, 10], [0.0, 0, 0, 0]]])
        self.positive_mask = torch.tensor([[True, False]])

    def to_maps(self, flat):
        return unflatten_levels(flat, self.level_shapes)


def toy_pair():
    student = ToyOutputs([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0, 10, 10], [0.0, 0, 5, 5]])
    # Teacher at location 0: p = .8 for class 1, box (0, 0, 10, 5) with IoU .5 against the GT.
    teacher = ToyOutputs([[0.0, math.log(4.0)], [math.log(9.0), 0.0]], [[0.0, 0, 10, 5], [0.0, 0, 5, 5]],
                         iou_max=(0.5, 0.25))
    return student, teacher


def test_harmonious_distillation_hand_values():
    student, teacher = toy_pair()
    hs_t = 2 * 0.8 * 0.5 / 1.3
    losses = tbd_module().harmonious_distillation(student, teacher)
    # z_S = 0: BCE = log 2 for any target; |HS_T - .5|^2; weighted by HS_T; one positive.
    assert losses["loss_distill_tbd_hd_cls"].item() == pytest.approx(hs_t * math.log(2) * (hs_t - 0.5) ** 2, rel=1e-5)
    # Student box (0,0,10,10) vs teacher box (0,0,10,5): GIoU .5.
    assert losses["loss_distill_tbd_hd_box"].item() == pytest.approx(hs_t * 0.5, rel=1e-5)
    # Against the GT box the student's box is exact.
    gt_losses = tbd_module(BOX_TARGET="gt").harmonious_distillation(student, teacher)
    assert gt_losses["loss_distill_tbd_hd_box"].item() == pytest.approx(0.0, abs=1e-6)


def test_tfd_masks_and_balance():
    student, teacher = toy_pair()
    tbd = tbd_module()
    cls_mask, reg_mask = tbd.tfd_masks(teacher)
    # Classification mask: the teacher's max class score per position (.8 and .9).
    assert torch.allclose(torch.cat([m.flatten() for m in cls_mask]), torch.tensor([0.8, 0.9]))
    # Regression mask: the IoU of the teacher's predicted box with its best GT.
    assert torch.allclose(torch.cat([m.flatten() for m in reg_mask]), torch.tensor([0.5, 0.25]))

    l_c, l_r = torch.tensor(3.0), torch.tensor(5.0)
    assert [v.item() for v in tbd.balance_terms(l_c, l_r)] == [1.5, 2.5]
    learned = tbd_module(BALANCE="learned")
    with torch.no_grad():
        learned.log_vars.copy_(torch.tensor([math.log(2.0), 0.0]))
    c, r = learned.balance_terms(l_c, l_r)
    assert c.item() == pytest.approx(1.5 + math.log(2.0)) and r.item() == pytest.approx(5.0)

    # TFD with identity adapters: student features 0 vs teacher features (1, 3) -> error 5 everywhere.
    for adapter in (tbd.cls_adapter, tbd.reg_adapter):
        with torch.no_grad():
            adapter.conv.weight.copy_(torch.eye(2)[:, :, None, None])
            adapter.conv.bias.zero_()
    teacher.features = [torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)] * 2
    losses = tbd.task_decoupled_features(student, teacher)
    # Normalised by max(mask sum, 1): cls (.8 + .9) * 5 / 1.7 = 5; reg (.5 + .25) * 5 / 1 = 3.75.
    # The equal balance halves each.
    assert losses["loss_distill_tbd_tfd_cls"].item() == pytest.approx(2.5)
    assert losses["loss_distill_tbd_tfd_reg"].item() == pytest.approx(1.875)


def test_tbd_switches():
    student, teacher = toy_pair()
    teacher.features = student.features
    assert set(tbd_module(COMPONENTS="hd")(student, teacher)) == {"loss_distill_tbd_hd_cls", "loss_distill_tbd_hd_box"}
    assert set(tbd_module(COMPONENTS="tfd")(student, teacher)) == {"loss_distill_tbd_tfd_cls", "loss_distill_tbd_tfd_reg"}
    with pytest.raises(ValueError, match=r"TBD\(balance='auto'\)"):
        tbd_module(BALANCE="auto")


def test_fgfi_imitation_mask():
    class Outputs:
        anchors_flat = Boxes(torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [20.0, 20, 30, 30]]))

    gt = Instances((40, 40))
    gt.gt_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 26, 26]]))
    empty = Instances((40, 40))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    Outputs.gt_instances = [gt, empty]
    # GT 1: IoUs 1, 1/3, 0 -> above .5 * 1: anchor 0. GT 2: best IoU .36 (anchor 2) -> anchor 2.
    assert imitation_mask(Outputs, 0.5).tolist() == [[True, False, True], [False, False, False]]


def test_fgfi_region_on_fcos_point_boxes_skips_the_level_fcos_uses():
    # FCOS's "anchors" are stride-sized boxes. A 24 x 24 GT box around a position's centre
    # (FCOS puts it on P3, stride 8: it is under P3's regression range): the P3 box (8 x 8)
    # has IoU 64/576 = 0.111, P4's (16 x 16) 256/576 = 0.444, P5's (32 x 32) 576/1024 = 0.5625.
    # Threshold 0.5 * 0.5625: FGFI imitates P4 and P5 there, not P3 (benchmarks/fgfi_regions.md).
    class Outputs:
        anchors_flat = Boxes(torch.tensor([[28.0, 28, 36, 36], [24.0, 24, 40, 40], [16.0, 16, 48, 48]]))

    gt = Instances((64, 64))
    gt.gt_boxes = Boxes(torch.tensor([[20.0, 20, 44, 44]]))
    Outputs.gt_instances = [gt]
    assert imitation_mask(Outputs, 0.5).tolist() == [[False, True, True]]


def test_fitnet_hand_value():
    cfg = load_config(config_path("digits", "retinanet_R34-R18_fitnet.yaml"))
    fitnet = FITNET(cfg, [ShapeSpec(channels=2)] * 2, [ShapeSpec(channels=2)] * 2)
    with torch.no_grad():
        fitnet.adapter.conv.weight.copy_(torch.eye(2)[:, :, None, None])
        fitnet.adapter.conv.bias.zero_()

    class Out:
        pass

    student, teacher = Out(), Out()
    student.features = [torch.zeros(1, 2, 2, 1), torch.zeros(1, 2, 1, 1)]
    teacher.features = [torch.tensor([[[[2.0], [0.0]], [[0.0], [0.0]]]]), torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)]
    # Level 0: errors (4 + 0) / 2 = 2 and 0, mean 1; level 1: (1 + 1) / 2 = 1; mean over levels 1.
    assert fitnet(student, teacher)["loss_distill_fitnet"].item() == pytest.approx(1.0)
