#!/usr/bin/env python
"""Plot each loss term and AP over iterations from a run's metrics.json.

    python tools/plot_metrics.py output/digits/retinanet_R34-R18_tid/metrics.json --output curves.png
"""
import argparse

from d2_taskdistill.visualize import plot_metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.json written by detectron2's JSONWriter")
    parser.add_argument("--output", required=True, help="PNG path")
    args = parser.parse_args()
    print(plot_metrics(args.metrics, args.output))


if __name__ == "__main__":
    main()
