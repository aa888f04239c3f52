#!/usr/bin/env python
"""Where FGFI imitates, against where the detector itself learns: for RetinaNet and FCOS
students on a config's training images, the FGFI imitation positions per GT box and the
detector's own positive positions per GT box, per FPN level, and the share of the positives
that lie inside the FGFI region. Writes benchmarks/fgfi_regions.md and .json.

    python tools/fgfi_regions.py
    python tools/fgfi_regions.py --images 256 --config-dir configs/digits

FGFI's region is defined by anchor IoU. FCOS has no anchors: detectron2 gives it stride-sized
point boxes, whose IoU with a GT box peaks at the level whose stride matches the box, while
FCOS assigns the box to a level by its regression range. Whether the two agree is what this
measures. No training, no teacher: masks depend on the student's anchors and the GT only.
"""
import argparse
import os
import sys

import torch

import d2_taskdistill  # noqa: F401  (registers the project; Pillow alias on v0.6)
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model

from d2_taskdistill import load_config
from d2_taskdistill.losses import imitation_mask
from d2_taskdistill.modeling.dense_outputs import run_dense_detector
from harness.report import markdown_table, write_report_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_gt(level_masks, num_gt):
    return [round(float(m.sum()) / num_gt, 2) for m in level_masks]


def measure(config_file, num_images):
    cfg = load_config(config_file, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:num_images]
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in dicts]
    gt_instances = [x["instances"] for x in batch]
    with torch.no_grad():
        outputs = run_dense_detector(model, batch, gt_instances)
    # Exactly what losses/fgfi.py distils, per position (max over a position's anchors).
    fgfi = [m.bool() for m in outputs.to_maps((imitation_mask(outputs, cfg.DISTILL.FGFI.THRESH_RATIO)
                                                 & outputs.valid_mask).float())]
    positives = [m.bool() for m in outputs.to_maps(outputs.positive_mask.float())]
    num_gt = sum(len(g) for g in gt_instances)
    box_sizes = torch.cat([g.gt_boxes.area().sqrt() for g in gt_instances])
    inside = sum(float((f & p).sum()) for f, p in zip(fgfi, positives))
    return {
        "config": os.path.relpath(config_file, ROOT), "images": len(batch), "gt_boxes": num_gt,
        "image_size": list(batch[0]["image"].shape[1:]), "gt_sqrt_area_median": round(float(box_sizes.median()), 1),
        "strides": [s.stride for s in model.backbone.output_shape().values()],
        "anchors_per_position": outputs.num_anchors,
        "fgfi_positions_per_gt": per_gt(fgfi, num_gt), "positive_positions_per_gt": per_gt(positives, num_gt),
        "positives_inside_fgfi": round(inside / max(1.0, sum(float(p.sum()) for p in positives)), 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", default=os.path.join(ROOT, "configs", "digits"))
    parser.add_argument("--images", type=int, default=64, help="training images measured")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "fgfi_regions"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {det: measure(os.path.join(args.config_dir, f"{det}_R18_FPN_student.yaml"), args.images)
               for det in ("retinanet", "fcos")}
    some = next(iter(results.values()))
    lines = ["# FGFI's imitation region against the detector's own positives", "",
             f"Command: `python {' '.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])}`  ",
             f"{some['images']} training images of {some['image_size']} px, {some['gt_boxes']} GT boxes "
             f"(median sqrt(area) {some['gt_sqrt_area_median']} px); FPN strides {some['strides']}.", "",
             markdown_table(["detector", "anchors / position", "FGFI positions per GT, per level", "total",
                             "detector's positive positions per GT, per level", "total",
                             "positives inside the FGFI region"],
                            [[det, r["anchors_per_position"], r["fgfi_positions_per_gt"],
                              f"{sum(r['fgfi_positions_per_gt']):.2f}", r["positive_positions_per_gt"],
                              f"{sum(r['positive_positions_per_gt']):.2f}", f"{100 * r['positives_inside_fgfi']:.0f} %"]
                             for det, r in results.items()])]
    write_report_files(args.output, results, lines)


if __name__ == "__main__":
    main()
