"""BCKD: hand-computed terms, the gradient of the binary term, and real training steps."""
import math

import pytest
import torch

from d2_taskdistill import load_config
from d2_taskdistill.losses.bckd import BCKD, binary_distillation
from d2_taskdistill.losses.normalizers import global_mean
from fvcore.nn import giou_loss
from conftest import config_path

LOG2 = math.log(2.0)


def test_binary_term_hand_values():
    z = torch.tensor([0.0, math.log(4.0), 100.0, -100.0, 0.0])
    p_t = torch.tensor([0.8, 0.8, 0.0, 1.0, 0.5])
    out = binary_distillation(z, p_t)
    # z = 0, p_T = .8: BCE = log 2, |.8 - .5| = .3; p_T = p_S = .8: zero; saturated: 100 * 1; p_T = p_S = .5: zero.
    expected = torch.tensor([0.3 * LOG2, 0.0, 100.0, 100.0, 0.0])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.isfinite(out).all()


def written_formula(z, p_t):
    p_s = torch.sigmoid(z)
    return -(p_t * torch.log(p_s) + (1 - p_t) * torch.log(1 - p_s)) * (p_t - p_s).abs()


def test_binary_term_gradient():
    torch.manual_seed(0)
    z = (torch.randn(6, 3, dtype=torch.float64) * 2).requires_grad_()
    p_t = torch.rand(6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: binary_distillation(x, p_t), (z,))
    (grad,) = torch.autograd.grad(binary_distillation(z, p_t).sum(), z)
    (expected,) = torch.autograd.grad(written_formula(z, p_t).sum(), z)
    assert torch.allclose(grad, expected, atol=1e-12)
    # The gradient flows through |p_T - p_S| too: it differs from BCE's alone times the factor.
    p_s = torch.sigmoid(z.detach())
    bce_only = (p_s - p_t) * (p_t - p_s).abs()
    assert not torch.allclose(grad, bce_only)


def test_giou_term_identical_disjoint_nested():
    student = torch.tensor([[0.0, 0, 2, 2], [0.0, 0, 1, 1], [0.0, 0, 2, 2]])
    teacher = torch.tensor([[0.0, 0, 2, 2], [2.0, 0, 3, 1], [0.0, 0, 4, 4]])
    # identical: 0; disjoint: 1 - (0 - (3 - 2) / 3) = 4/3; nested: 1 - 4/16 = 0.75.
    assert torch.allclose(giou_loss(student, teacher), torch.tensor([0.0, 4 / 3, 0.75]), atol=1e-6)


def test_normalizer_floors_zero_positives():
    assert global_mean(torch.tensor(0)).item() == 1.0
    assert global_mean(torch.tensor(7)).item() == 7.0


class ToyOutputs:
    """DenseOutputs' interface for one image, 2 locations, 2 classes."""

    centerness = None

    def __init__(self, logits, boxes, positives, valid=(True, True)):
        self.logits_flat = torch.tensor([logits], requires_grad=True)
        self.scores_flat = self.logits_flat.sigmoid()
        self.pred_boxes = torch.tensor([boxes], requires_grad=True)
        self.positive_mask = torch.tensor([positives])
        self.valid_mask = torch.tensor([valid])


def bckd_module():
    cfg = load_config(config_path("digits", "retinanet_R34-R18_bckd.yaml"))
    return BCKD(cfg, [], [])


def test_bckd_loss_on_toy_outputs():
    # p_S: (.5, .5), (.8, ~0); p_T: (.8, .5), (.8, 1).
    student = ToyOutputs([[0.0, 0.0], [math.log(4.0), -100.0]], [[0.0, 0, 1, 1], [0.0, 0, 2, 2]], [False, False])
    teacher = ToyOutputs([[math.log(4.0), 0.0], [math.log(4.0), 100.0]], [[2.0, 0, 3, 1], [0.0, 0, 2, 2]], [True, True])
    loss = bckd_module()(student, teacher)
    # cls: .3 log 2 + 0 + 0 + 100; zero student positives -> normaliser 1.
    assert loss["loss_distill_bckd_cls"].item() == pytest.approx(0.3 * LOG2 + 100.0, rel=1e-6)
    # loc: weights max|p_T - p_S| = .3 and 1; GIoU terms 4/3 and 0; weight 4.
    assert loss["loss_distill_bckd_loc"].item() == pytest.approx(4.0 * 0.3 * 4 / 3, rel=1e-6)
    assert torch.allclose(bckd_module().weights(student, teacher), torch.tensor([[0.3, 1.0]]), atol=1e-6)

    # Two student positives halve both terms; an invalid (padding) location counts nothing.
    student2 = ToyOutputs([[0.0, 0.0], [math.log(4.0), -100.0]], [[0.0, 0, 1, 1], [0.0, 0, 2, 2]],
                          [True, True], valid=(True, False))
    loss2 = bckd_module()(student2, teacher)
    assert loss2["loss_distill_bckd_cls"].item() == pytest.approx(0.3 * LOG2 / 2, rel=1e-6)
    assert loss2["loss_distill_bckd_loc"].item() == pytest.approx(4.0 * 0.3 * 4 / 3 / 2, rel=1e-6)
    # No gradient reaches the teacher.
    loss2["loss_distill_bckd_cls"].backward()
    assert student2.logits_flat.grad is not None and teacher.logits_flat.grad is None


def test_non_finite_student_boxes_stay_in_their_own_term():
    """A NaN box makes the localisation term NaN and leaves the classification term finite, so
    the trainer's non-finite error (tests/test_distill_errors.py) names the term that diverged."""
    student = ToyOutputs([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0, 1, 1], [float("nan"), 0, 2, 2]], [True, False])
    teacher = ToyOutputs([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0, 1, 1], [0.0, 0, 2, 2]], [True, False])
    losses = bckd_module()(student, teacher)  # no host read in the loss: the value is NaN
    assert math.isfinite(losses["loss_distill_bckd_cls"].item())
    assert math.isnan(losses["loss_distill_bckd_loc"].item())
