"""The visualisation command and the metrics plot, on generated data with known GT."""
import logging
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
    figures = visualize_batch(model, batch, str(tmp_path / "vis"), "BGR")
    h, w = batch[0]["image"].shape[1:]
    for i, inputs in enumerate(batch):
        levels = tmp_path / "vis" / str(inputs["image_id"]) / "levels"
        for name in MAPS:
            for level in range(3, 8):
                image = cv2.imread(str(levels / f"{name}_p{level}.png"))
                assert image.shape == (h, w, 3), (name, level)
        figure = figures[i]
        assert figure["figure"] == str(tmp_path / "vis" / f"{inputs['image_id']}.png")
        assert figure["maps"] == MAPS and len(figure["levels"]) == len(MAPS) * 5
        # 3 detection panels over 4 columns, then the 8 maps in 2 rows of 4: 1680 x 1290 px at 100 dpi.
        assert cv2.imread(figure["figure"]).shape == (1290, 1680, 3)
        # The level drawn is the one with the most of the student's positive locations.
        positives = distill_maps(model, batch)["positives"]
        counts = [float(level[i].sum()) for level in positives]
        assert figure["level"] == 3 + counts.index(max(counts)) and max(counts) > 0

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


def test_detections_are_drawn_in_the_pixels_of_the_resized_image(teachers, tiny_batch, tmp_path):
    """A mapper that resized the image leaves the original size in "height"/"width", which the
    detectors rescale their boxes to: the figures need them in the input tensor's pixels."""
    from d2_taskdistill.visualize import detections_at_input_size

    keep_all = ["MODEL.RETINANET.SCORE_THRESH_TEST", -1.0]  # untrained: every candidate, so that there are boxes
    model = build_model(distill_cfg("retinanet_R34-R18_tid.yaml", teachers["retinanet"], tmp_path, opts=keep_all,
                                    teacher_opts=keep_all))
    batch = tiny_batch[:2]
    as_drawn = detections_at_input_size(model, batch)
    # The same tensors, as if resized from 256 x 384 px originals.
    from_larger = detections_at_input_size(model, [dict(x, height=256, width=384) for x in batch])
    for drawn, larger in zip(as_drawn, from_larger):
        for a, b, x in zip(drawn, larger, batch):
            assert len(a) > 0 and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
            assert a.image_size == tuple(x["image"].shape[1:])


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
    assert f"{tmp_path / 'vis' / '000001.png'}: BCKD localisation weight (P" in out.stdout
    assert cv2.imread(str(tmp_path / "vis" / "000001" / "levels" / "bckd_weight_p3.png")).shape == (128, 128, 3)
    assert cv2.imread(str(tmp_path / "vis" / "000001.png")).shape[1] == 1260  # 3 panels of 4.2 in at 100 dpi


def test_the_maps_of_a_distilled_run_load_without_warnings(teachers, tiny_dataset, tmp_path, caplog):
    """The maps step builds the losses the run trained, nothing else: every tensor of the
    checkpoint loads and nothing is missing (no "not found in the checkpoint" warning)."""
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_taskdistill.visualize import explain_run

    cfg = distill_cfg("retinanet_R34-R18_bckd_tid.yaml", teachers["retinanet"], tmp_path)
    DetectionCheckpointer(build_model(cfg), str(tmp_path)).save("model_final")
    (tmp_path / "config.yaml").write_text(cfg.dump())
    with caplog.at_level("INFO"):
        figures = explain_run(str(tmp_path / "config.yaml"), str(tmp_path / "model_final.pth"), str(tmp_path / "vis"),
                              num_images=1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert figures[0]["maps"] == ["tid_key_area", "tid_weak_area", "tid_value", "bckd_weight"]
    # A run whose loss has no map says so in one line and still draws its detections.
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teachers["retinanet"], tmp_path / "fitnet")
    (tmp_path / "fitnet" / "config.yaml").parent.mkdir(exist_ok=True)
    (tmp_path / "fitnet" / "config.yaml").write_text(cfg.dump())
    caplog.clear()
    with caplog.at_level("INFO"):
        figures = explain_run(str(tmp_path / "fitnet" / "config.yaml"), None, str(tmp_path / "vis_fitnet"),
                              num_images=1)
    assert figures[0]["maps"] == [] and cv2.imread(figures[0]["figure"]).shape[1] == 1260
    assert "FITNET: no per-location map to draw" in caplog.text


def test_the_demo_report_is_one_page_whose_images_all_load(tmp_path):
    """report.html holds its images (base64 PNGs): each decodes, none is a link to a missing file."""
    import base64
    import re

    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from demo import write_html_report

    pictures = []
    for name, size in (("chart", (360, 800)), ("1", (430, 1680))):
        path = str(tmp_path / f"{name}.png")
        cv2.imwrite(path, np.full((*size, 3), 200, np.uint8))
        pictures.append(path)
    figure = {"image_id": "1", "figure": pictures[1], "level": 4, "maps": ["tid_value", "bckd_weight"]}
    path = write_html_report(str(tmp_path / "report.html"), "demo", "intro", "<table></table>", pictures[0],
                             "<table></table>", [figure], "BCKD+TID", 12.0)
    page = open(path).read()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    shapes = [cv2.imdecode(np.frombuffer(base64.b64decode(s.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR).shape
              for s in sources]
    assert shapes == [(360, 800, 3), (430, 1680, 3)]
    assert "on P4 (the level where this image has the most positive locations" in page
    assert "TID&#x27;s value map, the weight of its feature imitation" in page


def test_plot_reads_real_metrics(teachers, tiny_dataset, tmp_path):
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teachers["retinanet"], tmp_path)
    without_checkpoints_or_evaluation(DistillTrainer(cfg)).train()
    metrics = str(tmp_path / "metrics.json")
    records = read_metrics(metrics)
    assert any("loss_distill_fitnet" in r for r in records)
    path = plot_metrics(metrics, str(tmp_path / "curves.png"))
    image = cv2.imread(path)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
