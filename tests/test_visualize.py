"""The visualisation command and the metrics plot, on generated data with known GT."""
import math
import os
import subprocess
import sys

import cv2
import torch

from detectron2.modeling import build_model

from d2_taskdistill.engine import DistillTrainer
from d2_taskdistill.visualize import VISUALIZED_LOSSES, distill_maps, plot_metrics, read_metrics, visualize_batch
from conftest import ROOT, config_path, distill_cfg, TEST_DEVICE, without_checkpoints_or_evaluation

MAPS = ["tid_key_area", "tid_weak_area", "tid_value", "tbd_harmony_teacher", "tbd_harmony_student",
        "tbd_tfd_cls", "tbd_tfd_reg", "bckd_weight"]


def test_visualize_batch_files_and_value_maps(teachers, tiny_batch, tmp_path):
    teacher = teachers["retinanet"]
    cfg = distill_cfg("retinanet_R34-R18_tid.yaml", teacher, tmp_path, opts=["DISTILL.LOSSES", VISUALIZED_LOSSES])
    model = build_model(cfg)
    batch = tiny_batch[:2]
    written = visualize_batch(model, batch, str(tmp_path / "vis"), "BGR")
    h, w = batch[0]["image"].shape[1:]
    for i, inputs in enumerate(batch):
        stem = tmp_path / "vis" / str(inputs["image_id"])
        for name in MAPS:
            for level in range(3, 8):
                image = cv2.imread(str(stem / f"{name}_p{level}.png"))
                assert image.shape == (h, w, 3), (name, level)
        assert cv2.imread(str(stem / "detections_teacher_vs_student.png")).shape == (h, 2 * w, 3)
    assert len(written) == 2 * (len(MAPS) * 5 + 1)

    # TID's value map: non-zero at positions inside a GT box, zero beyond the band around all boxes.
    maps = distill_maps(model.train(), batch)
    p3 = maps["tid_value"][0]  # (N, 16, 16), stride 8; detectron2 anchor centres at (8x, 8y)
    ys, xs = torch.meshgrid(torch.arange(p3.shape[1]) * 8.0, torch.arange(p3.shape[2]) * 8.0, indexing="ij")
    far_positions = 0
    for i, inputs in enumerate(batch):
        boxes = inputs["instances"].gt_boxes.tensor
        inside = torch.zeros_like(xs, dtype=torch.bool)
        far = torch.ones_like(xs, dtype=torch.bool)
        for x0, y0, x1, y1 in boxes.tolist():
            inside |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            band = 0.5 * math.sqrt((x1 - x0) * (y1 - y0))
            dx = torch.clamp(torch.maximum(x0 - xs, xs - x1), min=0)
            dy = torch.clamp(torch.maximum(y0 - ys, ys - y1), min=0)
            far &= torch.sqrt(dx ** 2 + dy ** 2) >= band
        assert inside.any()
        assert (p3[i][inside] > 0).all()
        assert (p3[i][far] == 0).all()
        far_positions += int(far.sum())
    assert far_positions > 0  # large digits' bands can cover a whole 128 px image, not both


def test_visualize_command_on_an_image(teachers, tiny_digits, tmp_path):
    teacher = teachers["fcos"]
    image = os.path.join(tiny_digits[1], "000001.png")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "visualize_distill.py"),
           "--config-file", config_path("digits", "fcos_R34-R18_bckd.yaml"), "--input", image,
           "--output", str(tmp_path / "vis"), "MODEL.DEVICE", TEST_DEVICE, "DISTILL.TEACHER.WEIGHTS", teacher,
           "DISTILL.TEACHER.OPTS", "['MODEL.RESNETS.DEPTH', 34, 'MODEL.FPN.OUT_CHANNELS', 96]",
           "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote 41 PNGs" in out.stdout
    assert cv2.imread(str(tmp_path / "vis" / "000001" / "bckd_weight_p3.png")).shape == (128, 128, 3)


def test_plot_reads_real_metrics(teachers, tiny_dataset, tmp_path):
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teachers["retinanet"], tmp_path)
    without_checkpoints_or_evaluation(DistillTrainer(cfg)).train()
    metrics = str(tmp_path / "metrics.json")
    records = read_metrics(metrics)
    assert any("loss_distill_fitnet" in r for r in records)
    path = plot_metrics(metrics, str(tmp_path / "curves.png"))
    image = cv2.imread(path)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
