#!/usr/bin/env python
"""Write a distilled student as a plain detectron2 checkpoint + config.

    python tools/export_student.py --config-file configs/digits/retinanet_R34-R18_fitnet.yaml \
        --weights output/digits/retinanet_R34-R18_fitnet/model_final.pth --output exported/
"""
import argparse

import d2_taskdistill  # noqa: F401
from d2_taskdistill import load_config
from d2_taskdistill.export import export_student


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the distillation config")
    parser.add_argument("--weights", required=True, help="a TaskDistillDetector checkpoint")
    parser.add_argument("--output", required=True, help="directory for model_final.pth and config.yaml")
    parser.add_argument("--device", default="cpu",
                        help="MODEL.DEVICE of the exported config (default cpu; e.g. cuda)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    weights, config, metadata = export_student(load_config(args.config_file, args.opts), args.weights,
                                               args.output, device=args.device)
    print(f"student weights: {weights}\nstudent config:  {config}\nclass names:     {metadata}")


if __name__ == "__main__":
    main()
