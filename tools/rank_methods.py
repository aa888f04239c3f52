#!/usr/bin/env python
"""Rank distillation methods on your own data: the same distillation config with each method in
turn, and the student alone, several seeds, evaluated on the split you name.

    python tools/rank_methods.py --config-file my_distill.yaml --eval-dataset my_val \
        --methods TID TBD BCKD BCKD+TID FITNET PKD --seeds 2
    python tools/rank_methods.py ... --probe-iters 500     # a short probe: read its caveat

--config-file is a distillation config as train_net.py takes it (your datasets, student and
teacher, e.g. DISTILL.TEACHER.RUN <your teacher run>); its DISTILL.LOSSES is replaced by each
method ("BCKD+TID": both). Trailing KEY VALUE pairs override it for every run. A LazyConfig
(.py) works the same way: its model.losses becomes each method with its defaults, the student
alone is model.student, the split replaces dataloader.test's dataset (and the evaluator's), and
trailing overrides are key=value. Each run trains
into --work-dir/<method>_seed<k>; a finished run is not trained again and an interrupted one
resumes from its last checkpoint, so the command can be stopped and started again. The ranked
table (mean AP and its spread over seeds, the gain over the student alone and, with the
teacher's AP, the share of the gap closed) is printed and written to --output .md / .json.

On the embedded digits, the best method differs by detector (benchmarks/accuracy_trained.md):
rank on your own detector and data. --probe-iters stops every run early; how far such a
probe's ranking agreed with the full schedule's on digits is printed with the table
(benchmarks/probe_rank_correlation.md).
"""
import argparse
import json
import os
import statistics
import sys

from harness.experiments import METRICS, train_and_evaluate, train_and_evaluate_lazy
from harness.report import markdown_table, write_report_files

from d2_taskdistill import load_config
from d2_taskdistill.config import is_lazy_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_CAVEAT = os.path.join(ROOT, "benchmarks", "probe_rank_correlation.json")


def run_opts(cfg, row, seed, eval_dataset, probe_iters, evaluate_teacher):
    opts = ["SEED", seed, "DATASETS.TEST", (eval_dataset,)]
    if row == "baseline":  # the student alone: its own meta-architecture, no teacher
        opts += ["MODEL.META_ARCHITECTURE", cfg.DISTILL.STUDENT_ARCHITECTURE, "DISTILL.LOSSES", []]
    else:
        opts += ["DISTILL.LOSSES", row.split("+"), "DISTILL.TEACHER.EVAL_AT_START", evaluate_teacher]
    if probe_iters:
        # Stopped early on the full schedule (lr steps after it do not happen), as the probe
        # whose agreement with the full ranking is measured in probe_rank_correlation.md.
        opts += ["SOLVER.MAX_ITER", probe_iters]
    return opts


def lazy_run_config(args, row, seed, evaluate_teacher):
    """The LazyConfig of one run: the user's config with ``row``'s losses (or its student alone)."""
    from detectron2.config import LazyCall as L

    from d2_taskdistill.lazy_engine import load_lazy_config
    from d2_taskdistill.losses import DISTILL_LOSS_REGISTRY

    cfg = load_lazy_config(args.config_file, args.opts)
    if row == "baseline":
        cfg.model = cfg.model.student
    else:
        cfg.model.losses = {name: L(DISTILL_LOSS_REGISTRY.get(name))() for name in row.split("+")}
        cfg.train.teacher_eval_at_start = evaluate_teacher
    cfg.train.seed = seed
    cfg.dataloader.test.dataset.names = args.eval_dataset
    if "dataset_name" in cfg.dataloader.get("evaluator", {}):
        cfg.dataloader.evaluator.dataset_name = args.eval_dataset
    return cfg


def refused_methods(args, cfg, lazy):
    """{method: why} for the methods that cannot distil this teacher into this student (class
    count, anchor layout), found before anything trains: otherwise the first such method stops
    the ranking hours in, after the runs before it."""
    from d2_taskdistill.losses import DISTILL_LOSS_REGISTRY
    from d2_taskdistill.modeling.meta_arch import check_losses_compatible

    if lazy:
        from detectron2.config import instantiate

        student, teacher = instantiate(cfg.model.student), instantiate(cfg.model.teacher)
    else:
        from d2_taskdistill.modeling import TaskDistillDetector

        cpu_cfg = cfg.clone()
        cpu_cfg.defrost()
        cpu_cfg.MODEL.DEVICE = "cpu"
        parts = TaskDistillDetector.from_config(cpu_cfg)  # the model's own build of both detectors
        student, teacher = parts["student"], parts["teacher"]
    refused = {}
    for row in args.methods:
        try:
            check_losses_compatible(student, teacher, {name: DISTILL_LOSS_REGISTRY.get(name) for name in row.split("+")})
        except ValueError as e:
            refused[row] = str(e)
    return refused


def reported_metrics(results):
    """The metrics every run reported: COCO's six, or AP, AP50 and AP75 for a Pascal VOC split."""
    return [m for m in METRICS if all(m in r for runs in results.values() for r in runs)]


def summarize(results, metrics):
    """{row: [per-seed metrics]} -> {row: summary}, ranked by mean AP (best first)."""
    rows = {}
    for row, runs in results.items():
        aps = [r["AP"] for r in runs]
        rows[row] = {"mean": {m: statistics.fmean(r[m] for r in runs) for m in metrics},
                     "std": {m: statistics.stdev([r[m] for r in runs]) if len(runs) > 1 else 0.0 for m in metrics},
                     "seeds": len(runs), "AP_per_seed": aps}
    return dict(sorted(rows.items(), key=lambda kv: kv[1]["mean"]["AP"], reverse=True))


def probe_caveat(probe_iters):
    if not probe_iters:
        return []
    lines = [f"**Probe: every run stopped at iteration {probe_iters}.** On digits, such a probe's ranking "
             "agreed with the full schedule's as follows (benchmarks/probe_rank_correlation.md); it can pick "
             "another best method, so confirm the top methods with full runs:"]
    if os.path.exists(PROBE_CAVEAT):
        with open(PROBE_CAVEAT) as f:
            data = json.load(f)
        for detector, probes in data.items():
            for name, c in probes.items():
                lines.append(f"- {detector}, {name}: Spearman rho {c['spearman']:.2f}, Kendall tau {c['kendall']:.2f}, "
                             f"same best method: {'yes' if c['same_best'] else 'no'}")
    return lines + [""]


def report_lines(args, ranked, teacher_ap, metrics):
    base = ranked.get("baseline")
    lines = [f"# Methods ranked on {args.eval_dataset}", "",
             "Command: `python " + " ".join(sys.argv) + "`  ",
             f"Config: `{args.config_file}`; mean ± std over seeds, ranked by AP.",
             f"Teacher AP: {teacher_ap:.1f}" if teacher_ap is not None else "Teacher AP: not evaluated", "",
             *probe_caveat(args.probe_iters)]
    rows = []
    for rank, (row, s) in enumerate(ranked.items(), 1):
        gain = s["mean"]["AP"] - base["mean"]["AP"] if base else None
        gap = teacher_ap - base["mean"]["AP"] if base and teacher_ap is not None else None
        rows.append([rank, "student alone" if row == "baseline" else row, s["seeds"],
                     *(f"{s['mean'][m]:.1f} ± {s['std'][m]:.1f}" for m in metrics),
                     "-" if gain is None else f"{gain:+.1f}", "-" if not gap else f"{gain / gap:.0%}",
                     ", ".join(f"{ap:.1f}" for ap in s["AP_per_seed"])])
    return lines + [markdown_table(["rank", "method", "seeds", *metrics, "gain (AP)", "gap closed", "AP per seed"],
                                   rows)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True,
                        help="a distillation config (yaml or LazyConfig .py), as for train_net.py")
    parser.add_argument("--eval-dataset", required=True, help="registered or DATASETS.COCO/VOC-declared split to rank on")
    parser.add_argument("--methods", nargs="+", default=["TID", "TBD", "BCKD", "BCKD+TID", "FITNET", "FGFI"],
                        help="DISTILL_LOSS_REGISTRY names; A+B trains both together")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="do not train the student alone")
    parser.add_argument("--probe-iters", type=int, default=0, help="stop every run at this iteration (a short probe)")
    parser.add_argument("--work-dir", default="output/rank_methods")
    parser.add_argument("--output", default=None, help="default <work-dir>/ranking (.md and .json)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE (yaml) or key=value (.py) overrides for every run")
    args = parser.parse_args()
    from detectron2.utils.logger import setup_logger

    from d2_taskdistill.engine import setup_project_logger
    from d2_taskdistill.losses import DISTILL_LOSS_REGISTRY

    # Training progress and the project's warnings on the console, and in <work-dir>/log.txt.
    setup_logger(args.work_dir, name="detectron2")
    setup_project_logger(args.work_dir)

    unknown = {m for row in args.methods for m in row.split("+")} - {n for n, _ in DISTILL_LOSS_REGISTRY}
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; registered: {sorted(n for n, _ in DISTILL_LOSS_REGISTRY)}")
    lazy = is_lazy_config_file(args.config_file)
    if lazy and args.probe_iters:
        parser.error("--probe-iters takes yaml configs only: a LazyConfig's lr_multiplier spans train.max_iter, so a "
                     "shorter max_iter would compress its schedule rather than stop it early")
    cfg = lazy_run_config(args, args.methods[0], 0, False) if lazy else load_config(args.config_file, args.opts)
    if not lazy and cfg.MODEL.META_ARCHITECTURE != "TaskDistillDetector":
        parser.error(f"--config-file {args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}; "
                     "give a distillation config (TaskDistillDetector), e.g. configs/digits/retinanet_R34-R18_tid.yaml")
    refused = refused_methods(args, cfg, lazy)
    if refused:
        parser.error("--methods: these cannot distil this config's teacher into its student; drop them (this command trained nothing"
                     "):\n" + "\n".join(f"  {row}: {why}" for row, why in refused.items()))
    rows = ([] if args.no_baseline else ["baseline"]) + list(args.methods)
    tag = f"_probe{args.probe_iters}" if args.probe_iters else ""
    results, teacher_ap = {}, None
    for seed in range(args.seeds):  # seed-major: every method gets a first seed before any a second
        for row in rows:
            evaluate_teacher = seed == 0 and row == args.methods[0]
            output_dir = os.path.join(args.work_dir, f"{row}_seed{seed}{tag}")
            if lazy:
                result = train_and_evaluate_lazy(lazy_run_config(args, row, seed, evaluate_teacher), output_dir,
                                                 {"config_file": args.config_file, "opts": list(args.opts)})
            else:
                opts = [*args.opts, *run_opts(cfg, row, seed, args.eval_dataset, args.probe_iters, evaluate_teacher)]
                result = train_and_evaluate(args.config_file, output_dir, opts)
            results.setdefault(row, []).append(result["metrics"])
            if result.get("teacher_metrics"):
                teacher_ap = result["teacher_metrics"]["AP"]
            print(f"[rank] {row} seed {seed}: AP {result['metrics']['AP']:.2f}"
                  f"{' (finished earlier)' if result['reused'] else ''}", flush=True)
    metrics = reported_metrics(results)
    ranked = summarize(results, metrics)
    output = args.output or os.path.join(args.work_dir, f"ranking{tag}")
    data = {"command": sys.argv, "config_file": args.config_file, "opts": [str(o) for o in args.opts],
            "eval_dataset": args.eval_dataset, "probe_iters": args.probe_iters, "teacher_AP": teacher_ap,
            "rows": ranked}
    write_report_files(output, data, report_lines(args, ranked, teacher_ap, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
