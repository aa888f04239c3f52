"""No host reads in the distillation step's masks and losses (each is a CUDA sync that stalls the
GPU), counted on the CPU by patching every Tensor method that reads values back to the host;
and the rewritten pieces give what they replaced."""
import math
import os
import sys

import pytest
import torch
from fvcore.nn import giou_loss as fvcore_giou_loss

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import d2_taskdistill
from d2_taskdistill.losses.box_ops import giou_loss
from d2_taskdistill.losses.maps import top_fraction_mask
from d2_taskdistill.modeling.dense_outputs import run_dense_detector
from conftest import every_loss_cfg

PACKAGE_DIR = os.path.dirname(os.path.abspath(d2_taskdistill.__file__))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
READS = ["item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__"]


def _caller_outside_torch():
    frame = sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(TORCH_DIR):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _is_bool_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@pytest.fixture
def host_reads(monkeypatch):
    """The list of host reads (the first caller outside torch of each) while the test runs."""
    reads = []

    def counting(name, original):
        def method(self, *args, **kwargs):
            reads.append((name, _caller_outside_torch()))
            return original(self, *args, **kwargs)
        return method

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", counting("torch.nonzero", torch.nonzero))
    for name in ("__getitem__", "__setitem__"):  # boolean-mask indexing reads the mask's count
        original = getattr(torch.Tensor, name)

        def indexing(self, index, *rest, _original=original, _name=name):
            if _is_bool_index(index):
                reads.append((f"{_name}[bool]", _caller_outside_torch()))
            return _original(self, index, *rest)
        monkeypatch.setattr(torch.Tensor, name, indexing)
    return reads


def distill_model(detector, teachers, tmp_path):
    return build_model(every_loss_cfg(detector, teachers[detector], tmp_path)).train()


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_masks_and_losses_read_nothing_back(detector, teachers, tiny_batch, tmp_path, host_reads):
    model = distill_model(detector, teachers, tmp_path)
    host_reads.clear()  # building reads the anchor layouts: once, not per step
    batch = tiny_batch[:2]
    gt = [x["instances"] for x in batch]
    sizes = model.image_sizes_on_device(batch)
    teacher = model.run_teacher(batch, gt, sizes)
    student = run_dense_detector(model.student, batch, gt, model.fcos_thresholds, sizes).to_float32()
    with EventStorage(0):  # iteration 0: no diagnostic is due (TBD.LOG_PERIOD 20)
        detector_losses = student.detector_losses()  # detectron2's own, with its own host reads
        assert host_reads and all(PACKAGE_DIR not in where for _, where in host_reads), host_reads
        host_reads.clear()
        losses = {}
        for name, loss in model.distill_losses.items():
            terms = loss(student, teacher)
            assert terms, name
            losses.update(terms)
    assert host_reads == []
    total = sum(losses.values()) + sum(detector_losses.values())
    total.backward()
    assert math.isfinite(total.item())


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_distillation_step_reads_back_only_in_detectron2(detector, teachers, tiny_batch, tmp_path, host_reads):
    """The whole forward: the host reads left are detectron2's own (its matcher's asserts, its
    loss normaliser's .item()), none in this project's code, but TBD's diagnostic every
    TBD.LOG_PERIOD (20) iterations. (detectron2's trainer reads every loss each step besides.)"""
    model = distill_model(detector, teachers, tmp_path)
    host_reads.clear()
    with EventStorage(0) as storage:
        for _ in range(2):
            model(tiny_batch[:2])
            storage.step()
    ours = [(name, where) for name, where in host_reads if PACKAGE_DIR in where]
    assert ours == []
    # At the end of a period (20) only TBD's diagnostic (harmonious_share, one read for each
    # model) reads back.
    host_reads.clear()
    with EventStorage(19):
        model(tiny_batch[:2])
    ours = sorted((os.path.basename(where.split(":")[0]), name) for name, where in host_reads if PACKAGE_DIR in where)
    assert ours == [("tbd.py", "item")] * 2, ours


def test_image_sizes_are_moved_once_and_shared(teachers, tiny_batch, tmp_path):
    model = distill_model("retinanet", teachers, tmp_path)
    batch = tiny_batch[:2]
    gt = [x["instances"] for x in batch]
    sizes = model.image_sizes_on_device(batch)
    assert sizes.tolist() == [list(x["image"].shape[-2:]) for x in batch]
    teacher = model.run_teacher(batch, gt, sizes)
    student = run_dense_detector(model.student, batch, gt, model.fcos_thresholds, sizes)
    assert teacher.image_sizes is sizes and student.image_sizes is sizes
    # The same mask as from the ImageList's sizes.
    reference = run_dense_detector(model.student, batch, gt, model.fcos_thresholds)
    assert torch.equal(student.valid_mask, reference.valid_mask)


def test_giou_matches_fvcore_without_its_host_reads():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(500, 2, generator=gen) * 50], dim=1)
    xy = torch.rand(500, 2, generator=gen) * 100
    targets = torch.cat([xy, xy + torch.rand(500, 2, generator=gen) * 50], dim=1)
    boxes[:5] = targets[:5]  # identical pairs: loss 0
    boxes[5] = torch.tensor([0.0, 0, 10, 10])
    targets[5] = torch.tensor([20.0, 20, 30, 30])  # disjoint: 1 - (0 - (900 - 200) / 900)
    ours_in = boxes.clone().requires_grad_()
    theirs_in = boxes.clone().requires_grad_()
    ours, theirs = giou_loss(ours_in, targets), fvcore_giou_loss(theirs_in, targets)
    assert torch.equal(ours, theirs)  # the same formula, bit for bit
    assert ours[5].item() == pytest.approx(1 + 700 / 900)
    assert torch.all(ours[:5].abs() < 1e-6)
    ours.sum().backward()
    theirs.sum().backward()
    # Gradients: equal wherever the boxes overlap or are apart by more than a rounding error.
    assert torch.allclose(ours_in.grad, theirs_in.grad, atol=1e-6)
    # Shape (N, R, 4) in, (N, R) out, as the losses use it.
    assert giou_loss(boxes.view(2, 250, 4), targets.view(2, 250, 4)).shape == (2, 250)


def test_top_fraction_mask_with_a_static_bound_equals_a_full_sort():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 20, (6, 301), generator=gen).float()  # many ties
    candidates = torch.rand(6, 301, generator=gen) > 0.3
    candidates[4] = False  # an image without candidates selects nothing
    candidates[5, 3:] = False  # fewer candidates than k
    for fraction in (0.01, 0.025, 0.05, 0.5, 1.0):
        mask = top_fraction_mask(values, fraction, candidates)
        for i in range(6):  # reference: a full sort, row by row
            cand = values[i][candidates[i]]
            if len(cand) == 0:
                assert not mask[i].any()
                continue
            # k rounded in float32, as the function does
            k = min(max(1, int((torch.tensor(float(len(cand))) * fraction).ceil())), len(cand))
            kth = cand.sort(descending=True).values[k - 1]
            assert torch.equal(mask[i], candidates[i] & (values[i] >= kth)), (fraction, i)
