"""Pictures of what is distilled: per-level mask and value maps over the image,
teacher vs student detections, and training curves from metrics.json."""
import json
import logging
import os

import cv2
import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer

from .losses.maps import unflatten_levels
from .losses.tbd import dense_harmony_score
from .modeling.dense_outputs import run_dense_detector
from .modeling.rcnn_outputs import is_rcnn

logger = logging.getLogger(__name__)

# Losses whose modules compute per-location maps that can be drawn.
VISUALIZED_LOSSES = ["TID", "TBD", "BCKD"]

# Each map's title in the figures, and what to look for in it (the demo report's sentences).
MAP_NOTES = {
    "tid_key_area": ("TID key area", "TID's key area: the positions where the teacher's dual-task score "
                     "(classification x localisation) is highest. It should sit on the objects the teacher finds."),
    "tid_weak_area": ("TID weak area", "TID's weak area: where the teacher's score most exceeds the student's, "
                      "local maxima only. It marks objects the student still misses or places badly, often "
                      "small ones."),
    "tid_value": ("TID value (imitation weight)", "TID's value map, the weight of its feature imitation: high on "
                  "key and weak areas within a band around each box, zero far from every box."),
    "tbd_harmony_teacher": ("TBD harmony score, teacher", "The teacher's Harmony Score 2su/(s+u) of class score s "
                            "and IoU u: high only where classification and localisation agree."),
    "tbd_harmony_student": ("TBD harmony score, student", "The student's Harmony Score: where it is weaker than the "
                            "teacher's, TBD's harmony distillation pulls it up."),
    "tbd_tfd_cls": ("TBD classification mask", "TBD's classification mask, the teacher's top class score: where "
                    "classification features are imitated."),
    "tbd_tfd_reg": ("TBD regression mask", "TBD's regression mask, the teacher's IoU with the ground truth: where "
                    "box-regression features are imitated, the whole extent of each object."),
    "bckd_weight": ("BCKD localisation weight", "BCKD's localisation weight, the largest gap between teacher and "
                    "student class scores: where the student's boxes are pulled to the teacher's. Hot spots away "
                    "from the boxes are the student's false positives."),
}
# Detections drawn in the figures: the score detectron2's demo uses.
SCORE_THRESHOLD = 0.3
# 128 px digits upscaled so that labels can be read at 100 % zoom.
PANEL_PIXELS = 400


@torch.no_grad()
def distill_maps(model, batched_inputs):
    """name -> L x (N, H, W) maps of one batch (the batch needs GT instances), for the losses the
    model has among VISUALIZED_LOSSES; and the student's outputs (its positives choose a level)."""
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
    maps["positives"] = student.to_maps(student.positive_mask.float())
    return maps


def losses_without_maps(model):
    """The model's distillation losses that have no map to draw (FitNet imitates every location)."""
    return [name for name in model.distill_losses if name.split("_")[0] not in VISUALIZED_LOSSES]


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


def busiest_level(positives, i):
    """The FPN level (index) where the student has the most positive locations in image ``i``."""
    return int(np.argmax([float(level[i].sum()) for level in positives]))


def _visualizer(image, metadata):
    """detectron2's Visualizer drawing the image on a white margin (labels of boxes at the border
    stay whole), upscaled to PANEL_PIXELS, its labels readable; and the margin in input pixels."""
    margin = max(4, round(0.08 * max(image.shape[:2])))
    padded = cv2.copyMakeBorder(image, margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    scale = PANEL_PIXELS / max(padded.shape[:2])
    visualizer = Visualizer(padded, metadata, scale=scale)
    visualizer._default_font_size = 13 / scale  # 13 px labels in the output, whatever the input size
    return visualizer, margin


def detection_panel(image, instances, metadata=None):
    visualizer, margin = _visualizer(image, metadata)
    shifted = Instances((image.shape[0] + 2 * margin, image.shape[1] + 2 * margin), **instances.get_fields())
    shifted.pred_boxes = Boxes(instances.pred_boxes.tensor + margin)
    return visualizer.draw_instance_predictions(shifted).get_image()


def ground_truth_panel(image, boxes, classes, metadata=None):
    visualizer, margin = _visualizer(image, metadata)
    names = metadata.get("thing_classes", None) if metadata is not None else None
    labels = [names[c] if names else str(c) for c in classes]
    return visualizer.overlay_instances(
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4) + margin, labels=labels,
        assigned_colors=[(0.1, 0.9, 0.1)] * len(boxes)).get_image()


def explain_image(path, image, gt_boxes, gt_classes, teacher_instances, student_instances, maps, i, metadata=None):
    """One figure for image ``i``: the input with its ground truth, the teacher's and the student's
    detections (score >= SCORE_THRESHOLD), and each map on the level where the student has the most
    positives, titled, with a colour bar and the ground-truth boxes. Returns the level drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    level = busiest_level(maps["positives"], i)
    drawn = [name for name in maps if name in MAP_NOTES]
    columns = 3 if not drawn else max(3, min(4, len(drawn)))
    rows = 1 + -(-len(drawn) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.3 * rows), dpi=100, squeeze=False)
    panels = [("input and ground truth", ground_truth_panel(image, gt_boxes, gt_classes, metadata)),
              (f"teacher (score >= {SCORE_THRESHOLD})", detection_panel(image, teacher_instances, metadata)),
              (f"student (score >= {SCORE_THRESHOLD})", detection_panel(image, student_instances, metadata))]
    for ax, (title, picture) in zip(axes[0], panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=11)
    h, w = image.shape[:2]
    for k, name in enumerate(drawn):
        ax = axes[1 + k // columns, k % columns]
        values = maps[name][level][i].float().cpu().numpy()
        ax.imshow(image, extent=(0, w, h, 0))
        heat = ax.imshow(values, cmap="jet", alpha=0.55, extent=(0, w, h, 0), interpolation="nearest",
                         vmin=0, vmax=max(float(values.max()), 1e-6))
        for x0, y0, x1, y1 in gt_boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2))
        ax.set_title(f"{MAP_NOTES[name][0]}, P{level + 3}", fontsize=11)
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.03)
    if drawn and columns > 3:  # the top row's free slot says how to read the maps
        axes[0, 3].text(0.02, 0.5, f"Maps below: FPN level P{level + 3}\n(stride {2 ** (level + 3)} px), where the "
                        "student\nhas the most positive locations\nin this image.\n\nWhite boxes: ground truth.\n"
                        "Colour: the map's value\n(its own scale, bar at right).", fontsize=11, va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return level


@torch.no_grad()
def detections_at_input_size(model, batched_inputs):
    """(teacher's, student's) detections per image, in the pixels of the input tensor the figures
    draw: a detector rescales its boxes to the record's "height" and "width", the image's size
    before the mapper resized it."""
    inputs = [dict(x, height=x["image"].shape[1], width=x["image"].shape[2]) for x in batched_inputs]
    was_training = model.training
    model.eval()
    student = model.student(inputs)
    teacher = model.teacher(model.teacher_inputs(inputs))
    model.train(was_training)
    return ([d["instances"].to("cpu") for d in teacher], [d["instances"].to("cpu") for d in student])


@torch.no_grad()
def visualize_batch(model, batched_inputs, output_dir, input_format, metadata_name=None):
    """For each image: one figure ``<image_id>.png`` (see explain_image) and, under
    ``<image_id>/levels/``, each map on every FPN level. Returns [{"image_id", "figure", "level",
    "maps", "levels"}], one per image."""
    if is_rcnn(model.student):
        raise ValueError("The figures are drawn for RetinaNet and FCOS students (their maps and positives are "
                         "per location); this run's student is a GeneralizedRCNN, whose figures are not built yet "
                         "(docs/two_stage.md).")
    maps = distill_maps(model, batched_inputs)
    teacher_dets, student_dets = detections_at_input_size(model, batched_inputs)
    metadata = MetadataCatalog.get(metadata_name) if metadata_name else None
    figures = []
    for i, inputs in enumerate(batched_inputs):
        image_id = str(inputs.get("image_id", i))
        level_dir = os.path.join(output_dir, image_id, "levels")
        os.makedirs(level_dir, exist_ok=True)
        image = image_rgb(inputs, input_format)
        # Maps live in the network's input resolution, the same as the image tensor here.
        gt = inputs["instances"]
        boxes = gt.gt_boxes.tensor.tolist()
        level_files = []
        for name, levels in maps.items():
            if name not in MAP_NOTES:
                continue
            vmax = max(float(level[i].max()) for level in levels)
            for level, level_map in enumerate(levels):
                path = os.path.join(level_dir, f"{name}_p{level + 3}.png")
                save_png(path, overlay(image, level_map[i], boxes, vmax))
                level_files.append(path)
        detections = [d[d.scores >= SCORE_THRESHOLD] for d in (teacher_dets[i], student_dets[i])]
        figure = os.path.join(output_dir, f"{image_id}.png")
        level = explain_image(figure, image, boxes, gt.gt_classes.tolist(), *detections, maps, i, metadata)
        figures.append({"image_id": image_id, "figure": figure, "level": level + 3,
                        "maps": [n for n in maps if n in MAP_NOTES], "levels": level_files})
    return figures


def explain_run(config_file, weights, output_dir, dataset=None, num_images=2, image_path=None, opts=()):
    """Figures (visualize_batch) of the distillation model of ``config_file`` (yaml or LazyConfig
    .py, with ``opts``) loaded with ``weights``, on the first ``num_images`` of ``dataset``
    (default: the config's first test set) or on the image at ``image_path`` (no ground truth:
    the ground-truth based maps are then empty). Builds only the losses the config trains."""
    from detectron2.checkpoint import DetectionCheckpointer

    model, mapper, input_format, test_sets = _model_and_mapper(config_file, opts)
    if weights:
        DetectionCheckpointer(model).load(weights, checkpointables=[])
    skipped = losses_without_maps(model)
    if skipped:
        logger.info("%s: no per-location map to draw (they weigh every location alike or by the ground truth "
                    "alone); the figures show their detections.", ", ".join(skipped))
    if image_path:
        if not os.path.isfile(image_path):
            raise FileNotFoundError(f"--input {image_path!r}: no such image")
        from PIL import Image

        with Image.open(image_path) as image:
            width, height = image.size
        records = [{"file_name": image_path, "height": height, "width": width, "annotations": [],
                    "image_id": os.path.splitext(os.path.basename(image_path))[0]}]
        dataset = None
    else:
        from detectron2.data import DatasetCatalog

        dataset = dataset or (test_sets[0] if test_sets else None)
        if not dataset:
            raise ValueError(f"{config_file}: no test set to draw images from; give --dataset or --input")
        records = DatasetCatalog.get(dataset)[:num_images]
        if not records:
            raise ValueError(f"dataset {dataset!r} is empty")
    batch = [mapper(dict(r)) for r in records]
    return visualize_batch(model, batch, output_dir, input_format, dataset)


def _model_and_mapper(config_file, opts):
    """(model, a mapper keeping the ground truth at the test resolution, input format, test sets)."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetMapper

    from .config import is_lazy_config_file, load_config
    from .hooks import is_distill_model

    if is_lazy_config_file(config_file):
        from detectron2.config import instantiate

        from .lazy_engine import build_model, dataset_names, load_lazy_config, resolve_device

        cfg = resolve_device(load_lazy_config(config_file, list(opts)))
        model = build_model(cfg)
        mapper = instantiate(cfg.dataloader.test.mapper)
        mapper.is_train = True  # the test resolution, with the ground truth the maps need
        input_format, test_sets = mapper.image_format, dataset_names(cfg.dataloader.test)
    else:
        from detectron2.modeling import build_model

        from .engine import resolve_device

        cfg = resolve_device(load_config(config_file, list(opts)))
        model = build_model(cfg)
        mapper = DatasetMapper(cfg, is_train=True, augmentations=[
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)])
        input_format, test_sets = cfg.INPUT.FORMAT, list(cfg.DATASETS.TEST)
    if not is_distill_model(model):
        raise ValueError(f"{config_file}: its model is a {type(model).__name__}; the maps need a distillation "
                         "model (TaskDistillDetector) with its teacher")
    return model, mapper, input_format, test_sets


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
