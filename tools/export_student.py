#!/usr/bin/env python
"""Write a distilled student as a plain detectron2 checkpoint + config.

    python tools/export_student.py --run output/digits/retinanet_R34-R18_fitnet --output exported/
    python tools/export_student.py --config-file configs/digits/retinanet_R34-R18_fitnet.yaml \
        --weights output/digits/retinanet_R34-R18_fitnet/model_final.pth --output exported/

    python tools/export_student.py --config-file configs/digits/retinanet_R34-R18_tid.py \
        --weights output/digits/retinanet_R34-R18_tid/model_final.pth --output exported/

With --run (a train_net.py OUTPUT_DIR) the run's own config.yaml and last checkpoint are used;
--weights alone takes the config.yaml beside it. The weights must fit the config exactly.
A LazyConfig (.py) exports as a LazyConfig whose `model` is the student; a yaml one as yaml.
"""
import argparse
import os
import sys

import d2_taskdistill  # noqa: F401
from d2_taskdistill import load_config
from d2_taskdistill.config import is_lazy_config_file
from d2_taskdistill.export import export_lazy_student, export_student
from d2_taskdistill.lazy_engine import load_lazy_config
from d2_taskdistill.modeling.teacher import run_files


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a distillation run's OUTPUT_DIR: its config.yaml and last checkpoint")
    parser.add_argument("--config-file", help="the distillation config (default: the run's config.yaml)")
    parser.add_argument("--weights", help="a TaskDistillDetector checkpoint (default: the run's last)")
    parser.add_argument("--output", required=True, help="directory for model_final.pth and config.yaml")
    parser.add_argument("--device", default="cpu",
                        help="MODEL.DEVICE of the exported config (default cpu; e.g. cuda)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE (yaml) or key=value (.py) overrides")
    args = parser.parse_args()
    if args.run:
        run_config, run_weights = run_files(args.run, "--run")
        args.config_file = args.config_file or run_config
        args.weights = args.weights or run_weights
    if not args.weights:
        parser.error("give --run DIR, or --weights (and --config-file unless config.yaml lies beside them)")
    if not args.config_file:
        beside = os.path.join(os.path.dirname(args.weights), "config.yaml")
        if not os.path.isfile(beside):
            parser.error(f"--config-file: no config.yaml beside {args.weights}; name the config the weights were trained with")
        args.config_file = beside
    try:
        if is_lazy_config_file(args.config_file):
            weights, config, metadata = export_lazy_student(load_lazy_config(args.config_file, args.opts),
                                                            args.weights, args.output, device=args.device)
        else:
            weights, config, metadata = export_student(load_config(args.config_file, args.opts), args.weights,
                                                       args.output, device=args.device)
    except (ValueError, KeyError) as e:
        sys.exit(f"export_student: {e}")
    print(f"config used:     {args.config_file}\nstudent weights: {weights}\nstudent config:  {config}\n"
          f"class names:     {metadata}")


if __name__ == "__main__":
    main()
