"""FGD, PKD and CWD (feature-distillation baselines): hand-computed values, builds from the
digits configs with unequal FPN widths, and real training steps."""
import math

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from d2_taskdistill import load_config
from d2_taskdistill.losses import (
    CWD,
    FGD,
    PKD,
    FeatureAdapter,
    build_distill_loss,
    channel_wise_divergence,
    fgd_attention,
    gt_scale_masks,
    standardize,
)
from d2_taskdistill.losses.maps import padded_gt_boxes
from conftest import config_path

LN3 = math.log(3.0)


def instances(boxes, image_size=(16, 40)):
    gt = Instances(image_size)
    gt.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    gt.gt_classes = torch.zeros(len(gt.gt_boxes), dtype=torch.long)
    return gt


class FeatureOutputs:
    """The parts of DenseOutputs the feature losses read."""

    def __init__(self, features, gt_instances=(), strides=(8, 16, 32, 64, 128)):
        self.features = features
        self.gt_instances = list(gt_instances)
        self.feature_strides = list(strides)


def loss_module(cls, config, channels=2, levels=1, **overrides):
    """``cls`` built from a digits config with equal widths (no adapter) and ``overrides``."""
    cfg = load_config(config_path("digits", config))
    for key, value in overrides.items():
        setattr(cfg.DISTILL[cls.__name__], key, value)
    return cls(cfg, [ShapeSpec(channels=channels)] * levels, [ShapeSpec(channels=channels)] * levels)


# --- FGD -------------------------------------------------------------------------------------

def test_fgd_scale_masks_overlap_and_box_off_the_level():
    # Stride 8 on a 2 x 5 map. Boxes scaled by 1/8:
    #   A (0, 0, 16, 8) -> (0, 0, 2, 1): cells x 0..1, y 0     -> 2 cells, 1/2;
    #   B (4, 0, 12, 16) -> (.5, 0, 1.5, 2): cells x 0..1, y 0..1 -> 4 cells, 1/4
    #     (overlaps A on row 0: the larger weight, 1/2, wins);
    #   C (28, 4, 48, 12) -> (3.5, .5, 6, 1.5): cells x 3..5, y 0..1 -> 6 cells, 1/6,
    #     of which x 5 is off the map: the 4 cells on it keep 1/6.
    # Background: column 2, two positions, 1/2 each. The second image has no box: 1/10 each.
    boxes, valid = padded_gt_boxes(
        [instances([[0, 0, 16, 8], [4, 0, 12, 16], [28, 4, 48, 12]]), instances([])], torch.device("cpu"))
    fg, bg = gt_scale_masks(boxes, valid, 8, (2, 5))
    expected_fg = torch.tensor([[1 / 2, 1 / 2, 0, 1 / 6, 1 / 6],
                                [1 / 4, 1 / 4, 0, 1 / 6, 1 / 6]])
    assert torch.allclose(fg[0], expected_fg)
    assert torch.allclose(bg[0], torch.tensor([[0, 0, 0.5, 0, 0], [0, 0, 0.5, 0, 0]]))
    assert torch.equal(fg[1], torch.zeros(2, 5))
    assert torch.allclose(bg[1], torch.full((2, 5), 0.1))

    # Stride 16 on a 1 x 3 map: A -> (0, 0, 1, .5) and B -> (.25, 0, .75, 1) cover one cell each
    # (weight 1); C -> (1.75, .25, 3, .75) covers x 1..2 (1/2). No background left: 0, not NaN.
    fg, bg = gt_scale_masks(boxes, valid, 16, (1, 3))
    assert torch.allclose(fg[0], torch.tensor([[1.0, 0.5, 0.5]]))
    assert torch.equal(bg[0], torch.zeros(1, 3))


# Teacher features (N=1, C=2, H=1, W=2): channel 0 = [1, -3], channel 1 = [1, 1].
TEACHER = torch.tensor([[[[1.0, -3.0]], [[1.0, 1.0]]]])


def test_fgd_attention_with_temperature():
    # mean_c |F| = [1, 2] per position, mean_hw |F| = [2, 1] per channel.
    # T = .5 doubles them: softmax([2, 4]) = [a, 1 - a] with a = 1 / (1 + e^2); times H W = 2.
    a = 1 / (1 + math.e ** 2)
    spatial, channel = fgd_attention(TEACHER, 0.5)
    assert torch.allclose(spatial, torch.tensor([[[2 * a, 2 * (1 - a)]]]))
    assert torch.allclose(channel, torch.tensor([[2 * (1 - a), 2 * a]]))  # times C = 2
    # T = 1: softmax([1, 2]) = [b, 1 - b] with b = 1 / (1 + e): a higher T flattens the maps.
    b = 1 / (1 + math.e)
    spatial, channel = fgd_attention(TEACHER, 1.0)
    assert torch.allclose(spatial, torch.tensor([[[2 * b, 2 * (1 - b)]]]))
    assert torch.allclose(channel, torch.tensor([[2 * (1 - b), 2 * b]]))


def test_fgd_terms_hand_values():
    fgd = loss_module(FGD, "retinanet_R34-R18_fgd.yaml")  # T .5, alpha 1e-3, beta 5e-4, gamma 5e-4, lambda 5e-6
    student_features = torch.zeros(1, 2, 1, 2, requires_grad=True)
    gt = [instances([[0, 0, 8, 8]])]  # stride 8: the first position only -> M_fg = [1, 0], M_bg = [0, 1]
    student = FeatureOutputs([student_features], gt)
    teacher = FeatureOutputs([TEACHER], gt)
    losses = fgd(student, teacher)
    assert set(losses) == {f"loss_distill_fgd_{t}" for t in ("fg", "bg", "attention", "global")}

    # Teacher attention (T = .5): A^S = [2a, 2(1-a)], A^C = [2(1-a), 2a]; the student is 0, so
    # the squared errors are F_T^2: channel 0 [1, 9], channel 1 [1, 1]. Summed over channels:
    #   position 0: 1 * 2a * 2(1-a) + 1 * 2a * 2a = 4a;
    #   position 1: 9 * 2(1-a) * 2(1-a) + 1 * 2(1-a) * 2a = 36(1-a)^2 + 4a(1-a).
    a = 1 / (1 + math.e ** 2)
    assert losses["loss_distill_fgd_fg"].item() == pytest.approx(1e-3 * 4 * a, rel=1e-5)
    assert losses["loss_distill_fgd_bg"].item() == pytest.approx(5e-4 * (36 * (1 - a) ** 2 + 4 * a * (1 - a)), rel=1e-5)
    # The student's zero features give uniform attention, all ones: L1 = 2 |1 - 2(1-a)| + 2 |1 - 2a| = 4(1 - 2a).
    assert losses["loss_distill_fgd_attention"].item() == pytest.approx(5e-4 * 4 * (1 - 2 * a), rel=1e-5)
    # The GcBlocks start as identities: sum F_T^2 = 1 + 9 + 1 + 1 = 12.
    assert losses["loss_distill_fgd_global"].item() == pytest.approx(5e-6 * 12, rel=1e-5)
    sum(losses.values()).backward()
    assert student_features.grad.abs().sum() > 0

    # A student block adding b = (1, 1) at every position: sum (b - F_T)^2 = 0 + 16 + 0 + 0.
    with torch.no_grad():
        fgd.student_context[0].transform[-1].bias.fill_(1.0)
    assert fgd(student, teacher)["loss_distill_fgd_global"].item() == pytest.approx(5e-6 * 16, rel=1e-5)


def test_fgd_global_context_pooling_and_switch():
    block = loss_module(FGD, "retinanet_R34-R18_fgd.yaml").teacher_context[0]
    with torch.no_grad():
        block.context_logits.weight.copy_(torch.tensor([-LN3 / 4, 0.0]).view(1, 2, 1, 1))
        block.context_logits.bias.zero_()
    # Logits -ln3/4 * [1, -3] = [-ln3/4, 3 ln3/4]: softmax [1/4, 3/4] (they differ by ln 3).
    # Context: channel 0 1/4 * 1 + 3/4 * (-3) = -2; channel 1: 1.
    assert torch.allclose(block.context(TEACHER), torch.tensor([[-2.0, 1.0]]))
    assert torch.equal(block(TEACHER), TEACHER)  # last layer zero: the block starts as x

    local = loss_module(FGD, "retinanet_R34-R18_fgd.yaml", GLOBAL=False)
    assert not hasattr(local, "student_context")
    gt = [instances([[0, 0, 8, 8]])]
    losses = local(FeatureOutputs([torch.zeros(1, 2, 1, 2)], gt), FeatureOutputs([TEACHER], gt))
    assert "loss_distill_fgd_global" not in losses and "loss_distill_fgd_fg" in losses


# --- PKD -------------------------------------------------------------------------------------

def test_pkd_standardization_and_pearson_value():
    # Per channel over (N, H, W), unbiased std: two values +-d standardise to +-1/sqrt(2).
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 10.0]]]])
    assert torch.allclose(standardize(x, (0, 2, 3)), torch.tensor([[[[-1.0, 1.0]], [[-1.0, 1.0]]]]) / math.sqrt(2),
                          atol=1e-6)
    # Channel 0 agrees up to shift and scale (r = 1, error 0); channel 1 is mirrored (r = -1):
    # (z_S - z_T)^2 = 2 on both positions. Mean over 4 entries 1, halved: 0.5. Times WEIGHT 10.
    pkd = loss_module(PKD, "retinanet_R34-R18_pkd.yaml")
    teacher = torch.tensor([[[[1.0, 3.0]], [[1.0, 3.0]]]])
    student = torch.tensor([[[[0.0, 2.0]], [[3.0, 1.0]]]])
    loss = pkd(FeatureOutputs([student]), FeatureOutputs([teacher]))["loss_distill_pkd"]
    assert loss.item() == pytest.approx(10 * 0.5, rel=1e-5)


def test_pkd_constant_channel_is_zero_not_nan():
    # A constant student channel standardises to 0 (deviation 0 over std 1e-6 + 1e-6), so its
    # error is z_T^2 = 1/2 on both positions; channel 0 matches. Mean (1/2 + 1/2) / 4, halved: 1/8.
    pkd = loss_module(PKD, "retinanet_R34-R18_pkd.yaml", WEIGHT=1.0)
    student = torch.tensor([[[[0.0, 2.0]], [[2.0, 2.0]]]], requires_grad=True)
    teacher = torch.tensor([[[[1.0, 3.0]], [[1.0, 3.0]]]])
    loss = pkd(FeatureOutputs([student]), FeatureOutputs([teacher]))["loss_distill_pkd"]
    assert loss.item() == pytest.approx(1 / 8, rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_pkd_normalization_axes_and_levels():
    # N = 2, C = 1, W = 2: the student misses the second image's offset of 10.
    teacher = torch.tensor([[[[0.0, 2.0]]], [[[10.0, 12.0]]]])
    student = torch.tensor([[[[0.0, 2.0]]], [[[0.0, 2.0]]]])
    # Per sample ("hw") both images correlate perfectly: 0.
    per_sample = loss_module(PKD, "retinanet_R34-R18_pkd.yaml", WEIGHT=1.0, NORMALIZE_OVER="hw", channels=1)
    assert per_sample(FeatureOutputs([student]), FeatureOutputs([teacher]))["loss_distill_pkd"].item() == \
        pytest.approx(0.0, abs=1e-6)
    # Over the batch (public code): centred S = [-1, 1, -1, 1], T = [-6, -4, 4, 6];
    # r = 4 / (2 sqrt(104)); mean (z_S - z_T)^2 / 2 = (n - 1) / n (1 - r) with n = 4.
    pooled = loss_module(PKD, "retinanet_R34-R18_pkd.yaml", WEIGHT=1.0, channels=1)
    r = 4 / (2 * math.sqrt(104))
    assert pooled(FeatureOutputs([student]), FeatureOutputs([teacher]))["loss_distill_pkd"].item() == \
        pytest.approx(0.75 * (1 - r), rel=1e-5)
    # Levels are summed; NUM_LEVELS 1 keeps the finest only (the default 4 exceeds the 2 given: all).
    two_levels = loss_module(PKD, "retinanet_R34-R18_pkd.yaml", WEIGHT=1.0, channels=1, levels=2)
    first_only = loss_module(PKD, "retinanet_R34-R18_pkd.yaml", WEIGHT=1.0, channels=1, levels=2, NUM_LEVELS=1)
    s, t = FeatureOutputs([student, student]), FeatureOutputs([teacher, teacher])
    assert two_levels(s, t)["loss_distill_pkd"].item() == pytest.approx(1.5 * (1 - r), rel=1e-5)
    assert first_only(s, t)["loss_distill_pkd"].item() == pytest.approx(0.75 * (1 - r), rel=1e-5)
    with pytest.raises(ValueError, match=r"PKD\(normalize_over='nhw'\)"):
        loss_module(PKD, "retinanet_R34-R18_pkd.yaml", NORMALIZE_OVER="nhw")


# --- CWD -------------------------------------------------------------------------------------

# (N=1, C=2, H=1, W=3): the teacher's channel 0 peaks at position 1, all else 0.
CWD_TEACHER = torch.tensor([[[[0.0, LN3, 0.0]], [[0.0, 0.0, 0.0]]]])
CWD_STUDENT = torch.zeros(1, 2, 1, 3)
# Channel 0 at tau 1: p_T = [1, 3, 1] / 5, p_S = 1/3 each; channel 1 agrees (KL 0).
KL_CHANNEL = 2 * 0.2 * math.log(0.2 * 3) + 0.6 * math.log(0.6 * 3)
# Position 1 over the 2 channels: p_T = [3/4, 1/4], p_S = [1/2, 1/2]; the others agree.
KL_POSITION = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_cwd_hand_values_and_normalization():
    # KL summed over positions, divided by N * C = 2 distributions.
    assert channel_wise_divergence(CWD_STUDENT, CWD_TEACHER, 1.0).item() == pytest.approx(KL_CHANNEL / 2, rel=1e-5)
    # "spatial": softmax over channels per position, divided by N * H * W = 3.
    assert channel_wise_divergence(CWD_STUDENT, CWD_TEACHER, 1.0, "spatial").item() == \
        pytest.approx(KL_POSITION / 3, rel=1e-5)
    assert channel_wise_divergence(CWD_TEACHER, CWD_TEACHER, 1.0).item() == pytest.approx(0.0, abs=1e-7)

    cwd = loss_module(CWD, "retinanet_R34-R18_cwd.yaml")  # WEIGHT 5, tau 1
    assert cwd(FeatureOutputs([CWD_STUDENT]), FeatureOutputs([CWD_TEACHER]))["loss_distill_cwd"].item() == \
        pytest.approx(5 * KL_CHANNEL / 2, rel=1e-5)
    with pytest.raises(ValueError, match=r"CWD\(normalize='pixel'\)"):
        loss_module(CWD, "retinanet_R34-R18_cwd.yaml", NORMALIZE="pixel")


def test_cwd_temperature_scaling():
    # Teacher logits times tau give, at temperature tau, the same distributions as at 1:
    # only the tau^2 factor remains.
    for tau in (2.0, 4.0):
        value = channel_wise_divergence(CWD_STUDENT, tau * CWD_TEACHER, tau).item()
        assert value == pytest.approx(tau ** 2 * KL_CHANNEL / 2, rel=1e-5)
    # A higher temperature flattens p_T towards the student's uniform p_S: a smaller KL before tau^2.
    assert channel_wise_divergence(CWD_STUDENT, CWD_TEACHER, 2.0).item() / 4 < KL_CHANNEL / 2


# --- builds and training ---------------------------------------------------------------------

CONFIGS = [f"{detector}_R34-R18_{method}.yaml" for detector in ("retinanet", "fcos") for method in ("fgd", "pkd", "cwd")]


@pytest.mark.parametrize("config", CONFIGS)
def test_builds_with_unequal_widths_and_trains_student_features(config):
    cfg = load_config(config_path("digits", config))
    (name,) = cfg.DISTILL.LOSSES
    loss = build_distill_loss(name, cfg, [ShapeSpec(channels=4)] * 5, [ShapeSpec(channels=6)] * 5)
    assert isinstance(loss.adapter, FeatureAdapter)
    torch.manual_seed(0)
    sizes = [8, 4, 2, 1, 1]  # a 64 px batch at strides 8 .. 128
    student_features = [torch.randn(2, 4, s, s, requires_grad=True) for s in sizes]
    teacher_features = [torch.randn(2, 6, s, s) for s in sizes]
    gt = [instances([[4, 4, 30, 20], [20, 10, 60, 60]], (64, 64)), instances([[0, 0, 9, 9]], (64, 64))]
    losses = loss(FeatureOutputs(student_features, gt), FeatureOutputs(teacher_features, gt))
    assert losses and all(k.startswith(f"loss_distill_{name.lower()}") for k in losses)
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    grad = student_features[0].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
