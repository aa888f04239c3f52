#!/usr/bin/env python
"""The accuracy table: every method and the baseline, same schedule, several seeds, on the
embedded digits dataset. Writes benchmarks/accuracy.md and benchmarks/accuracy.json.

    python tools/bench_accuracy.py                       # the full table (make bench-accuracy)
    python tools/bench_accuracy.py --detectors retinanet --seeds 1 --methods baseline tid
    python tools/bench_accuracy.py --detectors retinanet --seeds 1 --eval-dataset digits_det_tune \
        --methods baseline tbd tbd_learned tbd_gt_box tbd_hd tbd_tfd --output benchmarks/tbd_choices

Teachers are trained once into their configs' OUTPUT_DIR (shared with the demo) and reused;
runs already finished in --work-dir are reused (delete it to start over).
"""
import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

import d2_taskdistill  # noqa: F401
from detectron2.utils.logger import setup_logger

from d2_taskdistill.experiments import METRICS, digits_config, digits_teacher_dir, train_and_evaluate
from d2_taskdistill.report import bar_chart, markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["baseline", "fitnet", "fgfi", "tid", "tbd", "bckd"]
TASK_AWARE = ["tid", "tbd", "bckd"]
SEEDS = {"retinanet": 3, "fcos": 2}
DEFAULT_EVAL_DATASET = "digits_det_val"
# TBD's open choices (a reconstruction: see d2_taskdistill/losses/tbd.py), compared on the tune split.
VARIANTS = {
    "tbd_learned": ("tbd", ["DISTILL.TBD.BALANCE", "learned"]),
    "tbd_gt_box": ("tbd", ["DISTILL.TBD.BOX_TARGET", "gt"]),
    "tbd_hd": ("tbd", ["DISTILL.TBD.COMPONENTS", "hd"]),
    "tbd_tfd": ("tbd", ["DISTILL.TBD.COMPONENTS", "tfd"]),
}


def config(name):
    return digits_config(ROOT, name)


def _init_worker(threads):
    torch.set_num_threads(threads)
    setup_logger(name="detectron2")
    if sys.platform.startswith("linux"):  # stopping the script stops its runs too
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def summarize(results):
    """[metrics dict per seed] -> (mean, sample std) per metric."""
    mean = {m: statistics.fmean(r[m] for r in results) for m in METRICS}
    std = {m: statistics.stdev([r[m] for r in results]) if len(results) > 1 else 0.0 for m in METRICS}
    return mean, std


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["retinanet", "fcos"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=None, help="seeds per detector (default 3 RetinaNet, 2 FCOS)")
    parser.add_argument("--eval-dataset", default=DEFAULT_EVAL_DATASET,
                        help="registered dataset the students are evaluated on (choices: digits_det_tune)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "output", "bench_accuracy"))
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "accuracy"))
    args = parser.parse_args()
    setup_logger(name="detectron2")
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    start = time.perf_counter()
    report = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads", "eval_dataset": args.eval_dataset,
              "detectors": {}}
    work_dir = args.work_dir if args.eval_dataset == DEFAULT_EVAL_DATASET else f"{args.work_dir}_{args.eval_dataset}"

    teachers, specs = {}, []
    for det in args.detectors:
        teacher_dir = digits_teacher_dir(ROOT, det)
        teachers[det] = train_and_evaluate(config(f"{det}_R34_FPN_teacher.yaml"), teacher_dir)
        print(f"[bench] {det} teacher AP {teachers[det]['metrics']['AP']:.1f}", flush=True)
        for method in args.methods:
            for seed in range(args.seeds or SEEDS[det]):
                base_method, variant_opts = VARIANTS.get(method, (method, []))
                if method == "baseline":
                    cfg_file, opts = config(f"{det}_R18_FPN_student.yaml"), []
                else:
                    cfg_file = config(f"{det}_R34-R18_{base_method}.yaml")
                    opts = ["DISTILL.TEACHER.WEIGHTS", os.path.join(teacher_dir, "model_final.pth"),
                            "DISTILL.TEACHER.EVAL_AT_START", False, *variant_opts]
                opts += ["DATASETS.TEST", (args.eval_dataset,)]
                specs.append((det, method, seed, cfg_file, os.path.join(work_dir, det, f"{method}_seed{seed}"),
                              ["SEED", seed, *opts]))

    def progress(spec, run):
        det, method, seed = spec[:3]
        print(f"[bench] {det} {method} seed {seed}: AP {run['metrics']['AP']:.2f} "
              f"({run['seconds']} s{', reused' if run['reused'] else ''}); "
              f"{time.perf_counter() - start:.0f} s so far", flush=True)

    results = [None] * len(specs)
    if args.jobs == 1:
        for i, spec in enumerate(specs):
            results[i] = train_and_evaluate(*spec[3:])
            progress(spec, results[i])
    else:
        # Separate processes with a share of the cores each: small convolutions use two
        # threads poorly (measured: 2 processes x 1 thread gave 12 % more iterations/s here).
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        report["machine"] += f"; {args.jobs} runs at a time, {threads} thread(s) each"
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(train_and_evaluate, *spec[3:]): i for i, spec in enumerate(specs)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                progress(specs[i], results[i])
    runs = {det: {} for det in args.detectors}
    for (det, method, *_), run in zip(specs, results):
        runs[det].setdefault(method, []).append(run)

    for det in args.detectors:
        summary = {}
        for method, method_runs in runs[det].items():
            mean, std = summarize([r["metrics"] for r in method_runs])
            summary[method] = {"mean": mean, "std": std, "seeds": len(method_runs),
                               "runs": [r["metrics"] for r in method_runs],
                               "config": os.path.relpath(method_runs[0]["config_file"], ROOT),
                               "opts": [str(o) for o in VARIANTS.get(method, (None, []))[1]],
                               "iterations": method_runs[0]["iterations"]}
        if "baseline" in summary:
            for method in summary:
                summary[method]["gain_AP"] = summary[method]["mean"]["AP"] - summary["baseline"]["mean"]["AP"]
        teacher = teachers[det]
        report["detectors"][det] = {"teacher": teacher["metrics"], "methods": summary,
                                    "teacher_config": os.path.relpath(teacher["config_file"], ROOT),
                                    "teacher_iterations": teacher["iterations"],
                                    "teacher_seconds": teacher["seconds"]}
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_report(report, args.output)


def rewrite_report(output):
    """Write the markdown (and chart) again from a saved JSON report."""
    with open(output + ".json") as f:
        write_report(json.load(f), output)
    return 0


def write_report(report, output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output + ".json", "w") as f:
        json.dump(report, f, indent=1)
    lines = ["# Accuracy on the embedded digits dataset", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Wall time: {report['wall_seconds'] / 60:.1f} min  ",
             f"Students evaluated on: `{report.get('eval_dataset', DEFAULT_EVAL_DATASET)}`", ""]
    partial = [f"{det}: {v['seeds']} of {SEEDS[det]} seeds" for det, d in report["detectors"].items()
               for v in list(d["methods"].values())[:1] if v["seeds"] < SEEDS[det]]
    missing = [det for det in SEEDS if det not in report["detectors"]]
    students_on_val = report.get("eval_dataset", DEFAULT_EVAL_DATASET) == DEFAULT_EVAL_DATASET
    if (partial or missing) and students_on_val:
        lines += ["**Partial run** (the full table is `make bench-accuracy`): "
                  + "; ".join(partial + [f"{det}: not run" for det in missing]) + ".", ""]
    for det, d in report["detectors"].items():
        methods = d["methods"]
        # The teacher's own evaluation is on the val split, whatever the students are evaluated on.
        rows = [("teacher R34" + ("" if students_on_val else " (on val)"), d["teacher"], None)]
        rows += [(("student R18" if m == "baseline" else f"R18 + {m.upper()}") + f" ({v['seeds']} seed"
                  f"{'s' if v['seeds'] > 1 else ''})", v["mean"], v["std"] if v["seeds"] > 1 else None)
                 for m, v in methods.items()]
        chart = bar_chart(rows, f"{output}_{det}.png", title=f"{det}: COCO metrics on digits_det_val")
        lines += [f"## {det}", "", f"Teacher: `{d['teacher_config']}`, {d['teacher_iterations']} iterations. "
                  f"Students: {next(iter(methods.values()))['iterations']} iterations each; mean ± std over seeds.",
                  "", markdown_table(rows), ""]
        lines += [f"- {m.upper()}: {v['config']} with `{' '.join(v['opts'])}`" for m, v in methods.items() if v.get("opts")]
        lines += ["", f"![{det}]({os.path.basename(chart)})", ""]
        if "baseline" in methods:
            lines += ["| method | gain over baseline (AP) | beats baseline by >= 2 AP | beats FITNET |",
                      "|---|---|---|---|"]
            fitnet = methods.get("fitnet", {}).get("mean", {}).get("AP")
            for m, v in methods.items():
                if m == "baseline":
                    continue
                beats_fitnet = "-" if fitnet is None or m == "fitnet" else ("yes" if v["mean"]["AP"] > fitnet else "no")
                lines.append(f"| {m.upper()} | {v['gain_AP']:+.2f} | {'yes' if v['gain_AP'] >= 2 else 'no'} | {beats_fitnet} |")
            lines.append("")
    with open(output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
