"""CUDA paths: SOLVER.AMP.ENABLED (detectron2's AMPTrainer, float16) with every method, the
teacher in float16 under DISTILL.TEACHER.AMP, and the speed benchmark's CUDA measurements.
Skipped where torch sees no GPU (the CPU runs the same code with bfloat16 in
tests/test_mixed_precision.py)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, distill_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

# BCKD+TID (a head and a feature method) is the representative that the GPU check runs first
# (its part a); the other methods' AMP runs come with the suite (part c).
REPRESENTATIVE = "bckd_tid"
OTHER_METHODS = ["fitnet", "fgfi", "tid", "tbd", "bckd", "fgd", "pkd", "cwd"]


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_amp_training(detector, teachers, tiny_dataset, tmp_path):
    check_amp_training(detector, REPRESENTATIVE, teachers[detector], tmp_path)


@pytest.mark.parametrize("method", OTHER_METHODS)
@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_amp_training_every_method(detector, method, teachers, tiny_dataset, tmp_path):
    check_amp_training(detector, method, teachers[detector], tmp_path)


@pytest.mark.parametrize("method", ["pkd_bckd", "roi_kd"])
def test_amp_training_faster_rcnn(method, rcnn_teacher, tiny_dataset, tmp_path):
    """Two Faster R-CNNs: PKD on the features with BCKD on the RPN, and ROI_KD on the box head."""
    check_amp_training("faster_rcnn", method, rcnn_teacher, tmp_path)


def check_amp_training(detector, method, teacher, tmp_path):
    from detectron2.engine import AMPTrainer

    from d2_taskdistill.engine import DistillTrainer
    from d2_taskdistill.hooks import GradScalerMonitor

    cfg = distill_cfg(f"{detector}_R34-R18_{method}.yaml", teacher, tmp_path,
                      opts=["MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", True, "DISTILL.TEACHER.AMP", True])
    trainer = DistillTrainer(cfg)
    assert isinstance(trainer._trainer, AMPTrainer)
    monitor = next(h for h in trainer._hooks if isinstance(h, GradScalerMonitor))
    monitor.period = 1  # a value each iteration (the default writes every 20)
    teacher_dtypes = []
    trainer.model.teacher.backbone.register_forward_hook(
        lambda module, args, out: teacher_dtypes.extend(v.dtype for v in out.values()))
    trainer.train()
    history = trainer.storage.histories()
    losses = [k for k in history if k.startswith("loss_")]
    assert any(k.startswith("loss_distill") for k in losses)
    for k in losses:
        assert all(math.isfinite(v) for v, _ in history[k].values()), k
    # The grad scaler is logged every iteration; a step counts as skipped exactly where the
    # scale fell (from AMPTrainer's GradScaler default of 2**16 at the start).
    scales = [v for v, _ in history["amp/grad_scale"].values()]
    assert len(scales) == cfg.SOLVER.MAX_ITER
    fell = [s < before for s, before in zip(scales, [2.0**16] + scales[:-1])]
    assert [v for v, _ in history["amp/skipped_steps"].values()] == [sum(fell[: i + 1]) for i in range(len(fell))]
    # DISTILL.TEACHER.AMP: the teacher's features come out in float16 on CUDA.
    assert teacher_dtypes and set(teacher_dtypes) == {torch.float16}


def test_speed_benchmark_cuda_path(tmp_path):
    out = tmp_path / "speed"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_speed.py"), "--device", "cuda:0", "--no-scaling",
           "--rounds", "2", "--iters", "2", "--warmup", "1", "--size", "128", "--methods", "TID",
           "--precision", "fp32", "amp", "--output", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, TMPDIR=str(tmp_path)))
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["device"] == torch.cuda.get_device_name(0)
    for precision in ("fp32", "amp"):
        res = report["detectors"]["retinanet"]["precision"][precision]
        # Peak memory from torch.cuda.max_memory_allocated: at least the weights of the models.
        assert all(p["peak_mb"] > 1 for p in res["profiles"].values())
        assert res["methods"]["TID"]["ratio"]["median"] > 0


def test_model_built_on_the_cpu_moves_with_its_teacher(teachers, tiny_dataset, tmp_path):
    """What LazyConfig training does: instantiate, then model.to(device)."""
    from detectron2.modeling import build_model

    cfg = distill_cfg("retinanet_R34-R18_tid.yaml", teachers["retinanet"], tmp_path, device="cpu")
    model = build_model(cfg).to("cuda")
    assert {p.device.type for p in model.teacher.parameters()} == {"cuda"}
    assert {b.device.type for b in model.teacher.buffers()} == {"cuda"}
    assert model.device.type == "cuda"


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_lazy_config_trains_with_amp_on_cuda(detector, teachers, tiny_dataset, tmp_path):
    """The .py path on the GPU: the model moved by train.device takes its teacher along; AMP
    through AMPTrainer, with the grad-scaler monitor hook."""
    from detectron2.engine import AMPTrainer

    from d2_taskdistill.hooks import GradScalerMonitor
    from d2_taskdistill.lazy_engine import LazyDistillTrainer
    from conftest import lazy_cfg

    cfg = lazy_cfg(f"{detector}_R34-R18_bckd_tid.py", teachers[detector], tmp_path, max_iter=3,
                   overrides=["train.device=cuda", "train.amp.enabled=True"])
    trainer = LazyDistillTrainer(cfg)
    assert isinstance(trainer._trainer, AMPTrainer)
    assert any(isinstance(h, GradScalerMonitor) for h in trainer._trainer._hooks)
    assert next(trainer.unwrapped_model.teacher.parameters()).is_cuda
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = trainer.storage.histories()
    assert any(k.startswith("loss_distill") for k in history)
    for k in (k for k in history if k.startswith("loss_")):
        assert all(math.isfinite(v) for v, _ in history[k].values()), k
    assert len(history["amp/grad_scale"].values()) == 1  # read at the last iteration
