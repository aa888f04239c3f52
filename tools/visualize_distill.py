#!/usr/bin/env python
"""Draw what a distillation run teaches: for each image one figure (input with ground truth,
teacher and student detections, and the maps of the run's losses on the FPN level where the
student has the most positives, each titled with a colour bar), and every map on every level
under <output>/<image_id>/levels/.

    python tools/visualize_distill.py --run output/demo/retinanet_bckd_tid --output vis/
    python tools/visualize_distill.py --run output/parts/bckd_tid --dataset parts_val --num 4 --output vis/
    python tools/visualize_distill.py --config-file configs/digits/retinanet_R34-R18_tid.yaml \
        --weights student.pth --input image.png --output vis/ [KEY VALUE ...]

Maps exist for TID (key area, weak area, value), TBD (Harmony Scores, TFD masks) and BCKD
(localisation weight); other losses' runs get the detections. With --input the image has no
ground truth, so the maps built on it (TID's value, the Harmony Scores' IoU) are empty.
"""
import argparse
import os
import sys

import d2_taskdistill  # noqa: F401
from detectron2.utils.logger import setup_logger

from d2_taskdistill.modeling.teacher import run_files
from d2_taskdistill.visualize import MAP_NOTES, explain_run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a distillation run's OUTPUT_DIR: its config.yaml and last checkpoint")
    parser.add_argument("--config-file", help="a distillation config, yaml or .py (default: the run's config.yaml)")
    parser.add_argument("--weights", help="the distillation checkpoint (default: the run's last)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", help="an image file")
    source.add_argument("--dataset", help="a registered dataset (default: the config's first test set)")
    parser.add_argument("--num", type=int, default=2, help="images of the dataset")
    parser.add_argument("--output", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE (yaml) or key=value (.py) overrides")
    args = parser.parse_args()
    setup_logger(name="d2_taskdistill", abbrev_name="d2td")
    if args.run:
        run_config, run_weights = run_files(args.run, "--run")
        args.config_file = args.config_file or run_config
        args.weights = args.weights or run_weights
    if not args.config_file:
        parser.error("give --run DIR, or --config-file (with --weights for a trained student)")
    try:
        figures = explain_run(args.config_file, args.weights, args.output, args.dataset, args.num, args.input,
                              args.opts)
    except (ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"visualize_distill: {e}")
    for figure in figures:
        drawn = ", ".join(MAP_NOTES[name][0] for name in figure["maps"]) or "detections only"
        print(f"{figure['figure']}: {drawn} (P{figure['level']}); every level under "
              f"{os.path.join(args.output, figure['image_id'], 'levels')}")


if __name__ == "__main__":
    main()
