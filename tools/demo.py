#!/usr/bin/env python
"""The embedded default pipeline: teacher, student baseline and distilled student on the
digits dataset, evaluated with COCO metrics, reported as a table, a bar chart and one figure per
validation image of what the student is taught: report.html (one self-contained page) and report.md.

    python tools/demo.py [--detector retinanet|fcos] [--method tid] [--student-init neck+head] [--output output/demo]

The teacher is trained into its config's OUTPUT_DIR (output/digits/<detector>_R34_FPN_teacher)
and reused from there when its checkpoint and evaluation exist.
"""
import argparse
import glob
import json
import os
import sys
import time

import torch

import d2_taskdistill  # noqa: F401
from detectron2.utils.logger import setup_logger

from d2_taskdistill import load_config
from harness.experiments import digits_config, digits_teacher_dir, train_and_evaluate
from harness.report import bar_chart, embedded_image, html_page, markdown_table, method_label, metrics_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The best RetinaNet row of benchmarks/accuracy_trained.md (BCKD+TID 41.9 AP over 3 seeds; TBD
# 40.1, FGFI 39.5, PKD 36.7; student 21.0, teacher 40.9); on FCOS 0.2 AP behind TID.
DEFAULT_METHOD = "bckd_tid"


def write_maps(config_file, opts, run_dir, output_dir, num_images=2):
    """One figure per validation image of the trained distilled student (``config_file`` with
    ``opts``, which name the teacher's weights): visualize.explain_run, the losses of the run only."""
    from d2_taskdistill.visualize import explain_run

    return explain_run(config_file, os.path.join(run_dir, "model_final.pth"), output_dir,
                       num_images=num_images, opts=opts)


def figure_notes(figure, method_name):
    """What to look for in a demo figure: one sentence for the detections, one per map."""
    from d2_taskdistill.visualize import MAP_NOTES

    notes = [f"Top row: the image with its ground truth, then the teacher's and the {method_name} student's "
             "detections: the digits the student misses or boxes badly are where the maps below should be hot."]
    if figure["maps"]:
        notes.append(f"Below, on P{figure['level']} (the level where this image has the most positive locations, "
                     "ground-truth boxes in white):")
    return notes + [MAP_NOTES[name][1] for name in figure["maps"]]


def write_html_report(path, title, intro, table_html, chart, runs_html, figures, method_name, elapsed):
    import html

    parts = [f"<p>{html.escape(intro)}</p>", table_html, embedded_image(chart, "COCO metrics of the three runs"),
             runs_html, f"<p>Wall time of this demo: {elapsed:.0f} s.</p>", "<h2>Where the student is taught</h2>"]
    for figure in figures:
        notes = figure_notes(figure, method_name)
        maps = notes[2:] if figure["maps"] else []
        parts.append(f"<figure>{embedded_image(figure['figure'], 'image ' + figure['image_id'])}<figcaption><p>"
                     f"<b>Validation image {html.escape(figure['image_id'])}.</b> {html.escape(notes[0])}"
                     + (f" {html.escape(notes[1])}</p><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in maps)
                        + "</ul>" if maps else "</p>") + "</figcaption></figure>")
    with open(path, "w") as f:
        f.write(html_page(title, "\n".join(parts)))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="retinanet", choices=["retinanet", "fcos"])
    # Every method with a digits config (each has one per detector), e.g. tid, pkd_bckd.
    methods = sorted({os.path.basename(p)[len("retinanet_R34-R18_"):-len(".yaml")]
                      for p in glob.glob(digits_config(ROOT, "retinanet_R34-R18_*.yaml"))})
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=methods,
                        help="configs/digits/<detector>_R34-R18_<method>.yaml")
    parser.add_argument("--student-init", default="none", choices=["none", "neck", "head", "neck+head"],
                        help="DISTILL.STUDENT_INIT of the distilled student; both students then take the "
                             "teacher's FPN width, so that the baseline differs from it by distillation and "
                             "inheritance only")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    args = parser.parse_args()
    setup_logger(name="detectron2")
    setup_logger(name="d2_taskdistill")
    out = os.path.abspath(args.output)
    det = args.detector
    teacher_dir = digits_teacher_dir(ROOT, det)
    teacher_config = digits_config(ROOT, f"{det}_R34_FPN_teacher.yaml")
    inherit = args.student_init != "none"
    width = ["MODEL.FPN.OUT_CHANNELS", load_config(teacher_config).MODEL.FPN.OUT_CHANNELS] if inherit else []
    method_name = method_label(args.method)
    suffix = f"_init_{args.student_init.replace('+', '_')}" if inherit else ""
    # The configs say cuda; said once here instead of a warning per stage on a machine without a GPU.
    device = ["MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu"]
    if device[1] == "cpu":
        print("No GPU here: every stage trains on the CPU (MODEL.DEVICE cpu).", flush=True)
    stages = [
        ("teacher", teacher_config, teacher_dir, device),
        ("student", digits_config(ROOT, f"{det}_R18_FPN_student.yaml"),
         os.path.join(out, f"{det}_student{'_wide' if inherit else ''}"), [*device, *width]),
        (f"student + {method_name}" + (f" ({args.student_init} from teacher)" if inherit else ""),
         digits_config(ROOT, f"{det}_R34-R18_{args.method}.yaml"), os.path.join(out, f"{det}_{args.method}{suffix}"),
         [*device, "DISTILL.TEACHER.WEIGHTS", os.path.join(teacher_dir, "model_final.pth"),
          "DISTILL.TEACHER.EVAL_AT_START", False, *width,
          *(["DISTILL.STUDENT_INIT", args.student_init] if inherit else [])]),
    ]
    start = time.perf_counter()
    results = []
    for i, (name, config, output_dir, opts) in enumerate(stages, 1):
        print(f"\n=== [{i}/{len(stages)}] {name}: {os.path.relpath(config, ROOT)} -> {output_dir}", flush=True)
        result = train_and_evaluate(config, output_dir, opts, reuse=(name == "teacher"))
        print(f"=== [{i}/{len(stages)}] {name}: AP {result['metrics']['AP']:.1f}"
              f"{' (reused)' if result['reused'] else ''}; {time.perf_counter() - start:.0f} s so far", flush=True)
        results.append((name, result))
    elapsed = time.perf_counter() - start

    rows = [(name, r["metrics"], None) for name, r in results]
    table = metrics_table(rows)
    chart = bar_chart(rows, os.path.join(out, "accuracy.png"))
    gain = results[2][1]["metrics"]["AP"] - results[1][1]["metrics"]["AP"]
    title = f"d2-taskdistill demo: {det}, {method_name}"
    intro = (f"Teacher R34-FPN, student R18-FPN, {det} on the embedded digits dataset (COCO metrics on "
             f"digits_det_val). Distillation gain over the student baseline: {gain:+.1f} AP.")
    runs = (["run", "config", "iterations", "seconds"], [
        [name, os.path.relpath(r["config_file"], ROOT), r["iterations"],
         f"{r['seconds']}{' (reused)' if r['reused'] else ''}"] for name, r in results])
    _, distilled_config, distilled_dir, distilled_opts = stages[2]
    figures = write_maps(distilled_config, distilled_opts, distilled_dir, os.path.join(out, "maps"))
    report = "\n".join([f"# {title}", "", intro, "", table, "", f"![accuracy]({os.path.basename(chart)})", "",
                         markdown_table(*runs), "", f"Wall time of this demo: {elapsed:.0f} s.", "",
                         "## Where the student is taught", ""])
    for figure in figures:
        relative = os.path.relpath(figure["figure"], out)
        notes = figure_notes(figure, method_name)
        report += "\n".join([f"![image {figure['image_id']}]({relative})", "", notes[0], "",
                              *[f"- {n}" for n in notes[1:]], "",
                              f"Every map on every level: `{os.path.relpath(os.path.dirname(figure['levels'][0]), out)}/`"
                              if figure["levels"] else "", "", ""])
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report + "\n")
    html_report = write_html_report(os.path.join(out, "report.html"), title, intro, metrics_table(rows, tablefmt="html"),
                                    chart, markdown_table(*runs, tablefmt="html"), figures, method_name, elapsed)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({name: r for name, r in results}, f, indent=1)
    print("\n" + table)
    print(f"\nDistillation gain: {gain:+.1f} AP. Report: {html_report} (one page, open it in a browser) and "
          f"{os.path.join(out, 'report.md')}; wall time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
