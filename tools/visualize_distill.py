#!/usr/bin/env python
"""Write PNGs of what a distillation config teaches: per FPN level, TID's key area, weak
area and value map, TBD's harmony-score maps (teacher, student) and TFD masks, BCKD's
per-location weights, GT boxes drawn; and teacher vs student detections side by side.

    python tools/visualize_distill.py --config-file configs/digits/retinanet_R34-R18_tid.yaml \
        --dataset digits_det_val --num 2 --output vis/ [MODEL.WEIGHTS student.pth] [KEY VALUE ...]
    python tools/visualize_distill.py --config-file CFG --input image.png --output vis/

With --input the image has no GT, so the GT-based maps (TID value, harmony) are zero.
"""
import argparse
import os
import sys

import d2_taskdistill  # noqa: F401
import detectron2.data.transforms as T
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
import torch

from d2_taskdistill import load_config
from d2_taskdistill.engine import resolve_device
from d2_taskdistill.visualize import VISUALIZED_LOSSES, visualize_batch


def inputs_from_dataset(cfg, name, num):
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)])
    dicts = DatasetCatalog.get(name)
    if not dicts:
        raise ValueError(f"dataset {name!r} is empty")
    return [mapper(d) for d in dicts[:num]]


def inputs_from_image(cfg, path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path!r}: no such image")
    image = read_image(path, format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST).get_transform(image)
    image = resize.apply_image(image)
    instances = Instances(image.shape[:2])
    instances.gt_boxes = Boxes(torch.zeros(0, 4))
    instances.gt_classes = torch.zeros(0, dtype=torch.long)
    stem = os.path.splitext(os.path.basename(path))[0]
    return [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "instances": instances, "image_id": stem}]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a distillation config (TaskDistillDetector)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="an image file")
    source.add_argument("--dataset", help="a registered dataset name")
    parser.add_argument("--num", type=int, default=4, help="images of --dataset")
    parser.add_argument("--output", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()

    cfg = resolve_device(load_config(args.config_file, args.opts))
    if cfg.MODEL.META_ARCHITECTURE != "TaskDistillDetector":
        sys.exit(f"{args.config_file}: MODEL.META_ARCHITECTURE must be TaskDistillDetector")
    cfg.DISTILL.LOSSES = list(dict.fromkeys([*cfg.DISTILL.LOSSES, *VISUALIZED_LOSSES]))
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    if args.dataset:
        batch = inputs_from_dataset(cfg, args.dataset, args.num)
    else:
        batch = inputs_from_image(cfg, args.input)
    written = visualize_batch(model, batch, args.output, cfg.INPUT.FORMAT,
                              cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    print(f"wrote {len(written)} PNGs under {args.output}")


if __name__ == "__main__":
    main()
