"""Pictures of what is distilled: per-level mask and value maps over the image,
teacher vs student detections, and training curves from metrics.json."""
import json
import os

import cv2
import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import Visualizer

from .losses.maps import unflatten_levels
from .losses.tbd import dense_harmony_score
from .modeling.dense_outputs import run_dense_detector

# Losses whose modules compute the maps; built with the model whatever the config trains.
VISUALIZED_LOSSES = ["TID", "TBD", "BCKD"]


@torch.no_grad()
def distill_maps(model, batched_inputs):
    """name -> L x (N, H, W) maps of one batch (the batch needs GT instances)."""
    gt = [x["instances"].to(model.device) for x in batched_inputs]
    student = run_dense_detector(model.student, batched_inputs, gt, model.fcos_thresholds)
    teacher = model.run_teacher(batched_inputs, gt)
    maps = {}
    losses = model.distill_losses
    if "TID" in losses:
        m = losses["TID"].masks(student, teacher)
        for name in ("key_area", "weak_area", "value"):
            maps[f"tid_{name}"] = unflatten_levels(getattr(m, name).float(), m.shapes)
    if "TBD" in losses:
        maps["tbd_harmony_teacher"] = teacher.to_maps(dense_harmony_score(teacher)[0])
        maps["tbd_harmony_student"] = student.to_maps(dense_harmony_score(student)[0])
        maps["tbd_tfd_cls"], maps["tbd_tfd_reg"] = losses["TBD"].tfd_masks(teacher)
    if "BCKD" in losses:
        maps["bckd_weight"] = student.to_maps(losses["BCKD"].weights(student, teacher))
    return maps


def image_rgb(batched_input, input_format):
    image = batched_input["image"].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return image[:, :, ::-1].copy() if input_format == "BGR" else image.copy()


def overlay(image_rgb, level_map, boxes, vmax=None):
    """The map resized to the image, as a JET heat map blended 50/50, with GT boxes in white."""
    h, w = image_rgb.shape[:2]
    values = level_map.float().cpu().numpy()
    vmax = vmax or max(float(values.max()), 1e-6)
    heat = cv2.resize(np.clip(values / vmax, 0, 1), (w, h), interpolation=cv2.INTER_NEAREST)
    colored = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    out = (0.5 * image_rgb + 0.5 * colored).astype(np.uint8)
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), (255, 255, 255), 1)
    return out


def save_png(path, image_rgb):
    cv2.imwrite(path, image_rgb[:, :, ::-1])


@torch.no_grad()
def visualize_batch(model, batched_inputs, output_dir, input_format, metadata_name=None):
    """Write per-level map overlays and teacher/student detections; returns the paths."""
    written = []
    maps = distill_maps(model, batched_inputs)
    was_training = model.training
    model.eval()
    student_dets = model.student(batched_inputs)
    teacher_dets = model.teacher(model.teacher_inputs(batched_inputs))
    model.train(was_training)
    metadata = MetadataCatalog.get(metadata_name) if metadata_name else None
    for i, inputs in enumerate(batched_inputs):
        stem = os.path.join(output_dir, str(inputs.get("image_id", i)))
        os.makedirs(stem, exist_ok=True)
        image = image_rgb(inputs, input_format)
        # Maps live in the network's input resolution, the same as the image tensor here.
        boxes = inputs["instances"].gt_boxes.tensor.tolist()
        for name, levels in maps.items():
            vmax = max(float(level[i].max()) for level in levels)
            for level, level_map in enumerate(levels):
                path = os.path.join(stem, f"{name}_p{level + 3}.png")
                save_png(path, overlay(image, level_map[i], boxes, vmax))
                written.append(path)
        panels = []
        for dets in (teacher_dets[i], student_dets[i]):
            instances = dets["instances"].to("cpu")
            instances = instances[instances.scores >= 0.3]
            panels.append(Visualizer(image, metadata).draw_instance_predictions(instances).get_image())
        path = os.path.join(stem, "detections_teacher_vs_student.png")
        save_png(path, np.concatenate(panels, axis=1))
        written.append(path)
    return written


def read_metrics(path):
    """detectron2's metrics.json (one JSON object per line) -> list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path, output_path):
    """Each loss term and AP over iterations, from a run's metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    losses = sorted({k for r in records for k in r if k.startswith("loss_") or k == "total_loss"})
    aps = sorted({k for r in records for k in r if k.endswith("/AP")})
    if not losses:
        raise ValueError(f"{metrics_path} has no loss entries: is it a detectron2 metrics.json?")
    fig, axes = plt.subplots(1, 2 if aps else 1, figsize=(11 if aps else 6, 3.8), dpi=100, squeeze=False)
    for key in losses:
        points = [(r["iteration"], r[key]) for r in records if key in r]
        axes[0, 0].plot(*zip(*points), label=key)
    axes[0, 0].set_xlabel("iteration")
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_title("losses")
    axes[0, 0].legend(fontsize=7)
    for key in aps:
        points = [(r["iteration"], r[key]) for r in records if key in r]
        axes[0, 1].plot(*zip(*points), marker="o", label=key)
    if aps:
        axes[0, 1].set_xlabel("iteration")
        axes[0, 1].set_title("AP")
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    fig.savefig(output_path)
    plt.close(fig)
    return output_path
