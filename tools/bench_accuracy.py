#!/usr/bin/env python
"""The accuracy table: every method and the baseline, same schedule, several seeds, on the
embedded digits dataset. Writes benchmarks/accuracy_<schedule>.md and .json.

    python tools/bench_accuracy.py --jobs 2              # the full table (make bench-accuracy)
    python tools/bench_accuracy.py --detectors retinanet --seeds 1 --rows baseline tid
    python tools/bench_accuracy.py --schedule short --eval-dataset digits_det_tune --detectors retinanet \
        --seeds 1 --rows baseline tbd tbd_learned tbd_gt_box tbd_hd tbd_tfd --output benchmarks/tbd_choices
    python tools/bench_accuracy.py --report-only         # the table from the committed runs
    python tools/bench_accuracy.py --tune --jobs 2       # the loss-weight sweep on digits_det_tune; then
    python tools/bench_accuracy.py --jobs 2              # adds each swept method's "+tuned" row

The full table takes many hours on a CPU, so it is built run by run: each finished run writes
a small record (metrics and the exact config, no weights) to --records, one JSON per run, meant
to be committed. A later invocation, on any machine, skips every run whose record has the same
config and teacher, and trains the rest. Teachers are trained with a fixed seed into their
configs' OUTPUT_DIR (not committed); each student record names the teacher config and AP it
was trained with.
"""
import argparse
import ctypes
import hashlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

import d2_taskdistill  # noqa: F401
from detectron2.utils.logger import setup_logger

from d2_taskdistill import load_config
from harness.experiments import METRICS, digits_config, remove_weights, same_run_config, train_and_evaluate
from harness.report import bar_chart, markdown_table, method_label, metrics_table, write_report_files
from harness.tuning import (MAX_SCALE, MIN_SCALE, SCALES, TUNE_DATASET, TUNED_WEIGHTS_FILE, choose_scale, next_scale,
                            read_tuned_weights, scaled_weight_opts, tuned_scale)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["fitnet", "fgfi", "tid", "tbd", "bckd", "bckd_tid", "fgd", "pkd", "cwd", "pkd_bckd", "roi_kd",
           "bckd_roi_kd", "pkd_bckd_roi_kd", "fgd_roi_kd", "fgfi_roi_kd"]
INIT = "+init"  # row suffix: the student's FPN and head start from the teacher's
INIT_OPTS = ["DISTILL.STUDENT_INIT", "neck+head"]
# The --tune sweep trains these first: a sweep stopped part-way has then answered the table's
# question, TBD against the strongest public methods each at its best.
SWEEP_FIRST = ("tbd", "fgd", "pkd", "cwd")
SCALE_SEP = "@"  # row "fgd@0.1": every loss weight of the method x 0.1 (the --tune sweep's rows)
TUNED = "+tuned"  # row suffix: the loss weights x the factor chosen on the tune split (tuned_weights.json)
SEEDS = {"retinanet": 3, "fcos": 2, "faster_rcnn": 2, "mask_rcnn": 2}
# Heterogeneous pairs, "<teacher>_to_<student>": the trained teacher of one detector into the
# student of the other. Rows are the methods that compare features only (the others need the
# same anchor layout and refuse the pair at build time); the baseline is the student's own.
PAIR_SEP = "_to_"
PAIR_SEEDS = 2
DEFAULT_TRACKS = ["retinanet", "fcos", "fcos_to_retinanet"]
DEFAULT_EVAL_DATASET = "digits_det_val"
# TBD's open choices (a reconstruction: see d2_taskdistill/losses/tbd.py), compared on the tune split.
VARIANTS = {
    "tbd_learned": ("tbd", ["DISTILL.TBD.BALANCE", "learned"]),
    "tbd_gt_box": ("tbd", ["DISTILL.TBD.BOX_TARGET", "gt"]),
    "tbd_hd": ("tbd", ["DISTILL.TBD.COMPONENTS", "hd"]),
    "tbd_tfd": ("tbd", ["DISTILL.TBD.COMPONENTS", "tfd"]),
}
# Schedules: (teacher options, student options) on top of configs/digits. Same for every row.
SCHEDULES = {
    # A few iterations each: checks the whole pipeline (teachers, rows, records) in minutes.
    "smoke": (["SEED", 0, "SOLVER.MAX_ITER", 20, "SOLVER.STEPS", (), "SOLVER.WARMUP_ITERS", 5],
              ["MODEL.FPN.OUT_CHANNELS", 128, "SOLVER.MAX_ITER", 10, "SOLVER.STEPS", (), "SOLVER.WARMUP_ITERS", 5]),
    # The configs' own: students 200 iterations, teachers 900 (the demo's, minutes per run).
    "short": (["SEED", 0], []),
    # The configs' own teachers, students 2.5 x short with the decays at the same fractions: the
    # two-stage table (a teacher and 18 student runs) within a few hours of this 2-core machine.
    "medium": (["SEED", 0], ["SOLVER.MAX_ITER", 500, "SOLVER.STEPS", (400, 475), "SOLVER.CHECKPOINT_PERIOD", 250]),
    # Trained: the teacher until its val AP levels off, the students long enough to reach half
    # of it (the baseline passed 21.6 AP at 1000 iterations before any lr decay, under a
    # teacher at 40.9). The student keeps the teacher's FPN width and head (as R50 and R101 do on COCO),
    # so that its neck and head can start from the teacher's (the +init rows).
    "trained": (
        ["SEED", 0, "SOLVER.MAX_ITER", 4000, "SOLVER.STEPS", (3200, 3700), "SOLVER.WARMUP_ITERS", 200,
         "TEST.EVAL_PERIOD", 500],
        ["MODEL.FPN.OUT_CHANNELS", 128, "SOLVER.MAX_ITER", 1000, "SOLVER.STEPS", (800, 900),
         "SOLVER.WARMUP_ITERS", 100, "TEST.EVAL_PERIOD", 500, "SOLVER.CHECKPOINT_PERIOD", 250],
    ),
}
# The tuning sweep's: the trained schedule's teacher and students, every student stopped at
# iteration 500 of 1000 (before the lr steps), the probe whose ranking of the methods agreed
# best with the full runs' (benchmarks/probe_rank_correlation.md).
SCHEDULES["tune"] = (SCHEDULES["trained"][0],
                     [*SCHEDULES["trained"][1], "SOLVER.MAX_ITER", 500, "TEST.EVAL_PERIOD", 0])
TEACHER_OF = {"tune": "trained"}  # a schedule that trains no teacher of its own


def rel(path):
    return os.path.relpath(path, ROOT)


def parse_row(row):
    """A row's method, loss weights and inheritance: "fgd" -> ("fgd", None, False) (published
    constants), "fgd@0.1" -> ("fgd", 0.1, False), "fgd+tuned+init" -> ("fgd", TUNED, True)."""
    inherit = row.endswith(INIT)
    name = row.removesuffix(INIT)
    if name.endswith(TUNED):
        return name.removesuffix(TUNED), TUNED, inherit
    method, sep, scale = name.partition(SCALE_SEP)
    return method, float(scale) if sep else None, inherit


def student_and_teacher(track):
    """"retinanet" -> ("retinanet", "retinanet"); "fcos_to_retinanet" -> ("retinanet", "fcos")."""
    teacher, _, student = track.rpartition(PAIR_SEP)
    return student, teacher or student


def is_pair(track):
    student, teacher = student_and_teacher(track)
    return student != teacher


def layout_free_methods(det):
    """The methods whose every loss compares features only (``needs_same_layout`` False): the
    ones that can run between detectors of different anchor layouts."""
    from d2_taskdistill.modeling.meta_arch import layout_free_losses

    free = set(layout_free_losses())
    return [m for m in methods_of(det) if set(load_config(method_config(det, m)).DISTILL.LOSSES) <= free]


def method_config(det, method):
    return digits_config(ROOT, f"{det}_R34-R18_{method}.yaml")


def methods_of(det):
    """The METHODS that ``det`` has a digits config of (Faster R-CNN: not TID, TBD)."""
    return [m for m in METHODS if os.path.exists(method_config(det, m))]


def config_sha(cfg):
    """Identity of a trained model's config (its OUTPUT_DIR aside)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    return hashlib.sha1(cfg.dump().encode()).hexdigest()[:12]


def read_record(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_record(path, record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def record_matches(record, cfg, teacher_sha=None):
    """A committed run of the same config (and teacher): it is not trained again."""
    return (record is not None and same_run_config(record["config"], cfg)
            and (teacher_sha is None or record["teacher"]["config_sha"] == teacher_sha))


class Run:
    """One row, track (a detector, or a heterogeneous pair) and seed: its config, output dir and
    record file."""

    def __init__(self, args, det, row, seed, teacher):
        self.det, self.row, self.seed = det, row, seed
        student = student_and_teacher(det)[0]
        method, weights, inherit = parse_row(row)
        base_method, variant_opts = VARIANTS.get(method, (method, []))
        student_opts = SCHEDULES[args.schedule][1]
        init_opts = INIT_OPTS if inherit else []
        teacher_opts = ["DISTILL.TEACHER.WEIGHTS", teacher.weights, "DISTILL.TEACHER.EVAL_AT_START", False]
        if base_method == "baseline":
            self.config_file = digits_config(ROOT, f"{student}_R18_FPN_student.yaml")
            teacher_opts = ["DISTILL.TEACHER.CONFIG_FILE", rel(teacher.config_file), *teacher_opts] if init_opts else []
        else:
            self.config_file = digits_config(ROOT, f"{student}_R34-R18_{base_method}.yaml")
            if is_pair(det):  # the other detector's teacher (same-detector rows keep their configs' own)
                teacher_opts = ["DISTILL.TEACHER.CONFIG_FILE", rel(teacher.config_file), *teacher_opts]
            teacher_opts += ["DISTILL.TEACHER.OPTS", teacher.opts]
        self.opts = ["SEED", seed, *student_opts, *teacher_opts, *init_opts, *variant_opts,
                     "DATASETS.TEST", (args.eval_dataset,)]
        self.weight_scale = None  # the published constants
        run_name = row
        if weights is not None:
            path = getattr(args, "tuned_weights", TUNED_WEIGHTS_FILE)
            self.weight_scale = tuned_scale(det, method, path) if weights == TUNED else weights
            self.weight_opts = scaled_weight_opts(load_config(self.config_file, self.opts), self.weight_scale)
            self.opts += self.weight_opts
            if self.weight_scale == 1.0:  # tuned to the published constants: the published row's runs
                run_name = method + (INIT if inherit else "")
        # A sweep's run that diverges is recorded as such (the factor is then never chosen).
        self.record_divergence = weights not in (None, TUNED) and getattr(args, "tune", False)
        self.output_dir = os.path.join(args.work_dir, det, f"{run_name}_seed{seed}")
        self.record_path = os.path.join(args.records, det, f"{run_name}_seed{seed}.json")
        self.cfg = load_config(self.config_file, [*self.opts, "OUTPUT_DIR", self.output_dir])
        self.teacher = teacher

    def committed(self):
        record = read_record(self.record_path)
        return record if record_matches(record, self.cfg, self.teacher.sha) else None


class Teacher:
    """The digits teacher of one detector under a schedule, trained once with a fixed seed."""

    def __init__(self, args, det):
        self.det = det
        self.config_file = digits_config(ROOT, f"{det}_R34_FPN_teacher.yaml")
        self.opts = SCHEDULES[args.schedule][0]
        base = load_config(self.config_file)
        self.output_dir = os.path.join(rel(os.path.join(ROOT, base.OUTPUT_DIR)) + f"_{TEACHER_OF.get(args.schedule, args.schedule)}")
        self.weights = os.path.join(self.output_dir, "model_final.pth")
        self.cfg = load_config(self.config_file, [*self.opts, "OUTPUT_DIR", self.output_dir])
        self.record_path = os.path.join(args.records, det, "teacher.json")
        # Config keys added to the code since the committed teacher was trained change the dump,
        # not the teacher: its recorded identity stands while the configs agree on shared keys.
        committed = read_record(self.record_path)
        self.sha = committed["config_sha"] if record_matches(committed, self.cfg) else config_sha(self.cfg)

    def train(self):
        """Train (or reuse the local weights of) this teacher; returns its record."""
        # Three checkpoints on the way, so that a killed teacher resumes: how often a run saves is
        # not part of what it trains (same_run_config), so the record and its identity stay the same.
        save_every = ["SOLVER.CHECKPOINT_PERIOD", max(1, self.cfg.SOLVER.MAX_ITER // 3)]
        result = train_and_evaluate(self.config_file, self.output_dir, [*self.opts, *save_every])
        record = read_record(self.record_path)
        if not record_matches(record, self.cfg) or not result["reused"]:
            record = {"detector": self.det, "config_file": rel(self.config_file), "opts": [str(o) for o in self.opts],
                      "config": self.cfg.dump(), "config_sha": self.sha, "metrics": result["metrics"],
                      **mask_metrics_of(result),
                      "ap_curve": result.get("ap_curve", []),
                      "iterations": result["iterations"], "seconds": result["seconds"],
                      "resumed_from": result.get("resumed_from"), "machine": machine()}
            write_record(self.record_path, record)
        elif result["metrics"]["AP"] != record["metrics"]["AP"]:
            # Local weights retrained from the same config (a fresh machine) score differently: the
            # committed record stands, and the runs record the AP of the teacher they learnt from.
            record = {**record, "metrics": result["metrics"], "retrained_here": True}
        return record


def mask_metrics_of(result):
    """A Mask R-CNN run's mask metrics, for its record ({} for a detector without masks)."""
    return {"mask_metrics": result["mask_metrics"]} if result.get("mask_metrics") else {}


def machine():
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def _init_worker(threads):
    torch.set_num_threads(threads)
    setup_logger(name="detectron2")
    if sys.platform.startswith("linux"):  # stopping the script stops its runs too
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_in_pool(jobs, calls, done):
    """calls: [(fn, args)]; done(i, result) as each finishes. jobs > 1: processes with a share
    of the cores each (small convolutions use two threads poorly: 2 x 1 thread gave 12 % more
    iterations/s here)."""
    if jobs == 1 or len(calls) <= 1:
        for i, (fn, fn_args) in enumerate(calls):
            done(i, fn(*fn_args))
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(fn, *fn_args): i for i, (fn, fn_args) in enumerate(calls)}
        for future in as_completed(futures):
            done(futures[future], future.result())


def train_teacher(teacher):
    return teacher.train()


def train_student(run):
    start = time.perf_counter()
    try:
        return train_and_evaluate(run.config_file, run.output_dir, run.opts)
    except FloatingPointError as e:
        if not run.record_divergence:
            raise
        return {"metrics": None, "diverged": str(e).splitlines()[0], "iterations": run.cfg.SOLVER.MAX_ITER,
                "seconds": round(time.perf_counter() - start, 1)}


def git_commit(paths, message):
    """Commit the records only; a failure (e.g. another git command holding the index) is
    reported, not fatal: the record stays on disk for the next commit."""
    changed = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT, capture_output=True, text=True)
    if changed.returncode == 0 and not changed.stdout.strip():
        return  # the committed record is this one (a reused teacher)
    for cmd in (["git", "add", *paths], ["git", "commit", "-q", "-m", message, "--", *paths]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[bench] not committed ({' '.join(cmd[:2])}): {proc.stderr.strip()}", flush=True)
            return


def summarize(results):
    """[metrics dict per seed] -> (mean, sample std) per metric."""
    mean = {m: statistics.fmean(r[m] for r in results) for m in METRICS}
    std = {m: statistics.stdev([r[m] for r in results]) if len(results) > 1 else 0.0 for m in METRICS}
    return mean, std


def best_methods(records_by_row, count=2):
    """The ``count`` distillation rows (without +init) of highest mean AP among finished rows."""
    means = {row: statistics.fmean(r["metrics"]["AP"] for r in recs) for row, recs in records_by_row.items()
             if row in METHODS and recs}
    return sorted(means, key=means.get, reverse=True)[:count]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=DEFAULT_TRACKS,
                        help="retinanet, fcos, faster_rcnn, or a heterogeneous pair TEACHER_to_STUDENT, e.g. fcos_to_retinanet "
                             f"(default: {' '.join(DEFAULT_TRACKS)})")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="baseline, methods, VARIANTS, any of them + '+init' (default: baseline, every "
                             "method, baseline+init and the best two methods +init; for a pair, the methods "
                             "that compare features only, beside the student's own baseline)")
    parser.add_argument("--schedule", default=None, choices=list(SCHEDULES), help="default trained; tune with --tune")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per detector (default 3 RetinaNet, 2 FCOS, {PAIR_SEEDS} a pair)")
    parser.add_argument("--eval-dataset", default=None,
                        help=f"registered dataset the students are evaluated on (default {DEFAULT_EVAL_DATASET}; "
                             f"{TUNE_DATASET} with --tune)")
    parser.add_argument("--tune", action="store_true",
                        help=f"the tuning sweep: each row's loss weights x {', '.join(f'{s:g}' for s in SCALES)} (and "
                             "the next decade while the best is at an edge), one "
                             f"seed, on {TUNE_DATASET}, beside the student alone; writes the factor of best AP per "
                             "method and track to --tuned-weights, which the ROW+tuned rows read")
    parser.add_argument("--tuned-weights", default=os.path.relpath(TUNED_WEIGHTS_FILE, ROOT),
                        help="the chosen factors (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--work-dir", default=None, help="default output/bench_accuracy_<schedule>[_<eval>]")
    parser.add_argument("--records", default=None, help="default benchmarks/accuracy_runs_<schedule>[_<eval>]")
    parser.add_argument("--output", default=None, help="default benchmarks/accuracy_<schedule>[_<eval>]")
    parser.add_argument("--report-only", action="store_true", help="write the table from the records; train nothing")
    parser.add_argument("--git-commit", action="store_true", help="commit each record as its run finishes")
    parser.add_argument("--keep-weights", action="store_true",
                        help="keep each student run's checkpoints (by default deleted once its record is written: "
                             "the sweep alone would leave about 25 GB)")
    args = parser.parse_args()
    os.chdir(ROOT)  # paths in configs and records are relative to the project
    setup_logger(name="detectron2")
    args.schedule = args.schedule or ("tune" if args.tune else "trained")
    args.eval_dataset = args.eval_dataset or (TUNE_DATASET if args.tune else DEFAULT_EVAL_DATASET)
    if args.tune:
        if args.eval_dataset == DEFAULT_EVAL_DATASET:
            parser.error(f"--tune --eval-dataset {DEFAULT_EVAL_DATASET}: the table reports that split, so the "
                         f"weights are chosen on another one (default {TUNE_DATASET})")
        args.seeds = args.seeds or 1
    suffix = args.schedule + ("" if args.eval_dataset == DEFAULT_EVAL_DATASET else f"_{args.eval_dataset}")
    args.work_dir = args.work_dir or os.path.join("output", f"bench_accuracy_{suffix}")
    args.records = args.records or os.path.join("benchmarks", f"accuracy_runs_{suffix}")
    args.output = args.output or os.path.join("benchmarks", f"tuning_{args.schedule}" if args.tune else f"accuracy_{suffix}")
    start = time.perf_counter()
    for track in args.detectors:
        if any(det not in SEEDS for det in student_and_teacher(track)):
            parser.error(f"--detectors {track}: expected one of {sorted(SEEDS)} or TEACHER{PAIR_SEP}STUDENT of them")
    # One teacher per detector, shared by its own track and the pairs it teaches.
    teachers = {det: Teacher(args, det) for track in args.detectors for det in student_and_teacher(track)}
    fixed_rows = args.rows or ["baseline", *METHODS, "baseline" + INIT]

    def runs_for(rows, tracks=args.detectors):
        # Seed-major: every row gets its first seed before any row gets a second.
        return [Run(args, track, row, seed, teachers[student_and_teacher(track)[1]]) for track in tracks
                for seed in range(seeds_of(args, track)) for row in rows_of(args, track, rows)]

    def progress(run, result):
        outcome = f"diverged ({result['diverged']})" if result.get("diverged") else f"AP {result['metrics']['AP']:.2f}"
        print(f"[bench] {run.det} {run.row} seed {run.seed}: {outcome} "
              f"({result['seconds']} s); {time.perf_counter() - start:.0f} s so far", flush=True)

    def train_missing(runs):
        missing = [r for r in runs if r.committed() is None]
        print(f"[bench] {len(runs) - len(missing)} of {len(runs)} runs committed; training {len(missing)}", flush=True)
        if not missing:
            return
        # The student alone uses no teacher: a pair's baseline does not train the student's teacher.
        needed = {r.teacher.det for r in missing if r.row != "baseline"}
        teacher_records = {}
        run_in_pool(args.jobs, [(train_teacher, (teachers[d],)) for d in sorted(needed)],
                    lambda i, rec: teacher_records.__setitem__(rec["detector"], rec))
        for det, rec in teacher_records.items():
            print(f"[bench] {det} teacher AP {rec['metrics']['AP']:.2f}", flush=True)
            if args.git_commit:
                git_commit([teachers[det].record_path], f"bench-accuracy: {det} teacher ({args.schedule})")

        def done(i, result):
            run = missing[i]
            progress(run, result)
            teacher_rec = teacher_records.get(run.teacher.det) or read_record(run.teacher.record_path)
            write_record(run.record_path, {
                "detector": run.det, "row": run.row, "seed": run.seed, "config_file": rel(run.config_file),
                "opts": [str(o) for o in run.opts], "config": run.cfg.dump(), "metrics": result["metrics"],
                **mask_metrics_of(result), **({"diverged": result["diverged"]} if result.get("diverged") else {}),
                "ap_curve": result.get("ap_curve", []),
                "iterations": result["iterations"], "seconds": result["seconds"],
                "resumed_from": result.get("resumed_from"), "machine": machine(),
                "teacher": {"config_sha": run.teacher.sha,
                            "AP": teacher_rec["metrics"]["AP"] if teacher_rec else None}})
            if not args.keep_weights:
                remove_weights(run.output_dir)
            if args.git_commit:
                git_commit([run.record_path], f"bench-accuracy: {run.det} {run.row} seed {run.seed} ({args.schedule})")

        run_in_pool(args.jobs, [(train_student, (r,)) for r in missing], done)

    if args.tune:
        runs, tried = sweep_runs(args, teachers), set()
        # One method at a time, in sweep order, its added decades included before the next method:
        # a sweep stopped part-way has chosen the factors of the methods it reached.
        while not args.report_only:
            missing = [r for r in runs if r.committed() is None and (r.det, r.row, r.seed) not in tried]
            if not missing:
                break
            method = parse_row(missing[0].row)[0]
            batch = [r for r in missing if parse_row(r.row)[0] == method]
            tried |= {(r.det, r.row, r.seed) for r in batch}
            train_missing(batch)
            runs = sweep_runs(args, teachers)
        write_sweep(args, runs, time.perf_counter() - start)
        return 0
    runs = runs_for(fixed_rows)
    # A pair's baseline is its student's own: trained here when that track is not.
    pair_students = {student_and_teacher(t)[0] for t in args.detectors if is_pair(t)} - set(args.detectors)
    if args.rows is None or "baseline" in args.rows:
        runs += runs_for(["baseline"], sorted(pair_students))
    if not args.report_only:
        train_missing(runs)
    if args.rows is None:  # then the best two methods with inheritance
        same_detector = [t for t in args.detectors if not is_pair(t)]
        by_det = {det: collect(args, [r for r in runs if r.det == det]) for det in same_detector}
        init_runs = []
        for det in same_detector:
            best = best_methods(by_det[det])
            if len(best) == 2:
                init_runs += runs_for([m + INIT for m in best], [det])
        if not args.report_only:
            train_missing(init_runs)
        # +init rows already measured stay in the table when a later row displaces them from the best two.
        chosen = {(r.det, r.row) for r in init_runs}
        measured = [r for r in runs_for([m + INIT for m in METHODS], same_detector)
                    if (r.det, r.row) not in chosen and r.committed()]
        runs += init_runs + measured
    report = build_report(args, runs, teachers, time.perf_counter() - start)
    write_report(report, args.output)
    return 0


def sweep_runs(args, teachers):
    """The --tune runs: each track's student alone, then each method x every factor of SCALES on
    every track, the methods of SWEEP_FIRST first."""
    runs, methods_of_track = {}, {}
    for track in args.detectors:
        student, _ = student_and_teacher(track)
        # Never the +tuned rows: a sweep resumed after some method's grid is complete scales the published weights.
        methods = [r for r in rows_of(args, track, args.rows or METHODS, with_tuned=False)
                   if not r.startswith("baseline")]
        odd = [m for m in methods if parse_row(m) != (m, None, False)]
        if odd:
            raise ValueError(f"--tune --rows {' '.join(odd)}: the sweep takes method names (e.g. fgd pkd); it "
                             "scales their weights itself")
        methods_of_track[track] = methods
        for seed in range(seeds_of(args, track)):
            runs.setdefault((student, "baseline", seed), Run(args, student, "baseline", seed, teachers[student]))
    every_method = list(dict.fromkeys(m for methods in methods_of_track.values() for m in methods))
    every_method.sort(key=lambda m: SWEEP_FIRST.index(m) if m in SWEEP_FIRST else len(SWEEP_FIRST))
    for method in every_method:
        for track, methods in methods_of_track.items():
            if method not in methods:
                continue
            teacher = teachers[student_and_teacher(track)[1]]
            scales = list(SCALES)
            while scales:  # the grid, then one decade more while the best recorded factor is at an edge
                by_scale = {}
                for scale in scales:
                    row = f"{method}{SCALE_SEP}{scale:g}"
                    by_scale[scale] = [runs.setdefault((track, row, seed), Run(args, track, row, seed, teacher))
                                       for seed in range(seeds_of(args, track))]
                _, extra = grid_state({s: sweep_outcome([r.committed() for r in rs]) for s, rs in by_scale.items()})
                scales = [*scales, extra] if extra is not None else None
    return list(runs.values())


def grid_state(ap):
    """(complete, factor to add) of one method's {scale: sweep outcome}: not complete while a run is
    missing (nothing to add yet) or while the best factor is at an edge of the grid (add the next decade)."""
    if "missing" in ap.values():
        return False, None
    extra = next_scale(finite_or_none(ap))
    return extra is None, extra


def finite_or_none(outcomes):
    """{scale: AP} of sweep outcomes, a diverged run as None (never chosen)."""
    return {s: v if isinstance(v, float) else None for s, v in outcomes.items()}


def write_sweep(args, runs, seconds):
    """The sweep's table (--output .md / .json), and the factor of best AP of every method whose
    sweep is complete, written to --tuned-weights (the entries of other tracks and methods kept)."""
    tuned = read_tuned_weights(args.tuned_weights)
    report = {"command": "python " + " ".join([rel(sys.argv[0]), *sys.argv[1:]]), "schedule": args.schedule,
              "eval_dataset": args.eval_dataset, "scales": list(SCALES), "records": args.records,
              "wall_seconds": round(seconds, 1), "tracks": {}}
    lines = ["# Loss-weight sweep on the tune split", "", f"Command: `{report['command']}`  ",
             f"Schedule `{args.schedule}`, students evaluated on `{args.eval_dataset}`, one record per run in "
             f"`{args.records}`. Each method's loss weights (every DISTILL.<LOSS>.*WEIGHT of its losses) are "
             f"multiplied by one factor of the same grid for every method; the factor of best AP is chosen (a tie: "
             f"the one nearer x1, the published constants) and written to `{args.tuned_weights}`. A best factor at "
             f"an edge of the factors tried adds the next decade on that side (x{MIN_SCALE:g} to x{MAX_SCALE:g}). "
             "A run whose loss became non-finite is recorded as diverged and never chosen.", ""]
    for track in args.detectors:
        student = student_and_teacher(track)[0]
        baseline = [r.committed() for r in runs if r.det == student and r.row == "baseline"]
        baseline_ap = statistics.fmean(r["metrics"]["AP"] for r in baseline) if baseline and all(baseline) else None
        sweeps = {}  # {method: {scale: [record or None per seed]}}
        for run in runs:
            if run.det == track and run.row != "baseline":
                method, scale, _ = parse_row(run.row)
                sweeps.setdefault(method, {}).setdefault(scale, []).append((run, run.committed()))
        table, methods = [], {}
        track_scales = sorted({s for by_scale in sweeps.values() for s in by_scale})  # a blank cell: not needed
        for method, by_scale in sweeps.items():
            ap = {s: sweep_outcome([rec for _, rec in pairs]) for s, pairs in by_scale.items()}
            entry = {"AP": {f"{s:g}": v for s, v in ap.items()}}
            complete, _ = grid_state(ap)
            if complete:
                chosen = choose_scale(finite_or_none(ap))
                chosen_run = by_scale[chosen][0][0]
                entry.update(scale=chosen, opts=[str(o) for o in chosen_run.weight_opts])
                tuned["tracks"].setdefault(track, {})[method] = {
                    **entry, "schedule": args.schedule, "eval_dataset": args.eval_dataset,
                    "seeds": len(by_scale[chosen]), "records": args.records}
            methods[method] = entry
            cells = [f"{v:.1f}" if isinstance(v, float) else ("-" if v == "missing" else v)
                     for v in (ap.get(s, "") for s in track_scales)]
            published = ap.get(1.0)
            gain = (f"{ap[entry['scale']] - published:+.1f}" if complete and isinstance(published, float) else "-")
            table.append([method_label(method), *cells, f"x{entry['scale']:g}" if complete else "-", gain])
        report["tracks"][track] = {"baseline_AP": baseline_ap, "methods": methods}
        lines += [f"## {track}", "", "Student alone: " + (f"{baseline_ap:.1f} AP." if baseline_ap is not None
                                                           else "not trained yet."), ""]
        lines += [markdown_table(["method", *(f"x{s:g}" for s in track_scales), "chosen", "AP over x1"], table), ""]
    write_report_files(args.output, report, lines)
    if not tuned["tracks"] and not os.path.exists(args.tuned_weights):
        return  # nothing chosen yet: no file, so the table adds no "+tuned" row
    with open(args.tuned_weights, "w") as f:
        json.dump(tuned, f, indent=1)
        f.write("\n")


def sweep_outcome(records):
    """Mean AP over the seeds' records, "diverged" when one diverged, "missing" when one is not trained."""
    if any(r is None for r in records):
        return "missing"
    if any(r.get("diverged") for r in records):
        return "diverged"
    return statistics.fmean(r["metrics"]["AP"] for r in records)


def seeds_of(args, track):
    return args.seeds or (PAIR_SEEDS if is_pair(track) else SEEDS[track])


def rows_of(args, track, rows, with_tuned=True):
    """A pair's rows: the given ones but the baseline (the student's own track has it); by
    default the methods that can run across the pair. By default (and ``with_tuned``), each method
    that the sweep tuned for the track (tuned_weights.json) also at its tuned weights, beside the
    published ones."""
    if not is_pair(track):
        available = methods_of(track)
        chosen = [r for r in rows if r.startswith("baseline")
                  or VARIANTS.get(parse_row(r)[0], (parse_row(r)[0],))[0] in available]
    elif args.rows is None:
        chosen = layout_free_methods(student_and_teacher(track)[0])
    else:
        chosen = [r for r in rows if not r.startswith("baseline")]
    if args.rows is not None or not with_tuned:
        return chosen
    tuned = read_tuned_weights(getattr(args, "tuned_weights", TUNED_WEIGHTS_FILE))["tracks"].get(track, {})
    return [row for r in chosen for row in ([r, r + TUNED] if r in tuned else [r])]


def collect(args, runs):
    """{row: [committed record]} of ``runs``."""
    out = {}
    for run in runs:
        record = run.committed()
        out.setdefault(run.row, [])
        if record is not None:
            out[run.row].append(record)
    return out


def build_report(args, runs, teachers, seconds):
    report = {"command": "python " + " ".join([rel(sys.argv[0]), *sys.argv[1:]]), "schedule": args.schedule,
              "schedule_opts": {k: [str(o) for o in v] for k, v in zip(("teacher", "student"), SCHEDULES[args.schedule])},
              "eval_dataset": args.eval_dataset, "records": args.records, "wall_seconds": round(seconds, 1),
              "detectors": {}}
    for det in args.detectors:
        student, teacher_det = student_and_teacher(det)
        teacher = read_record(teachers[teacher_det].record_path)
        rows = collect(args, [r for r in runs if r.det == det])
        if is_pair(det):  # the student's own baseline, all its seeds
            rows = {"baseline": collect(args, [Run(args, student, "baseline", seed, teachers[student])
                                               for seed in range(seeds_of(args, student))])["baseline"], **rows}
        summary = {}
        for row, records in rows.items():
            if not records:
                continue
            mean, std = summarize([r["metrics"] for r in records])
            summary[row] = {"mean": mean, "std": std, "seeds": len(records), "runs": [r["metrics"] for r in records],
                            "config": records[0]["config_file"], "opts": records[0]["opts"],
                            "iterations": records[0]["iterations"],
                            "teacher_AP": sorted({round(r["teacher"]["AP"], 2) for r in records
                                                  if r["teacher"]["AP"] is not None}),
                            "hours": sum(r["seconds"] for r in records) / 3600}
            scales = {r.weight_scale for r in runs if r.det == det and r.row == row} - {None}
            if scales:  # the loss weights x a factor (a sweep's, or the tuned one)
                summary[row]["weight_scale"] = scales.pop()
            if all("mask_metrics" in r for r in records):
                summary[row]["mask_mean"], summary[row]["mask_std"] = summarize([r["mask_metrics"] for r in records])
            own_teacher = [r["teacher"]["AP"] for r in records if r["teacher"]["AP"] is not None]
            if row != "baseline" and teacher and own_teacher and \
                    abs(statistics.fmean(own_teacher) - teacher["metrics"]["AP"]) > 0.005:
                # A teacher retrained since (a fresh machine, a resumed run): the gap is its own.
                summary[row]["own_teacher_AP"] = statistics.fmean(own_teacher)
        base = summary.get("baseline")
        for row, s in summary.items():
            if base is None:
                continue
            s["gain_AP"] = s["mean"]["AP"] - base["mean"]["AP"]
            teacher_ap = s.get("own_teacher_AP", teacher["metrics"]["AP"] if teacher else None)
            gap = teacher_ap - base["mean"]["AP"] if teacher_ap is not None else None
            # A teacher no better than the student alone leaves no gap to close.
            s["gap_closed"] = s["gain_AP"] / gap if gap is not None and gap > 0 else None
        report["detectors"][det] = {"teacher": teacher, "rows": summary, "expected_seeds": seeds_of(args, det),
                                    "not_trained": [row for row, records in rows.items() if not records]}
        if is_pair(det):
            report["detectors"][det]["needs_same_layout"] = [m for m in methods_of(student)
                                                             if m not in layout_free_methods(student)]
    return report


def row_label(row):
    method, weights, inherit = parse_row(row)
    init = " (FPN, head from teacher)" if inherit else ""
    if method == "baseline":
        return "student R18" + init
    if weights is None:
        return f"R18 + {method_label(method)}{init}"
    return f"R18 + {method_label(method)}, " + ("tuned weights" if weights == TUNED else f"weights x{weights:g}") + init


def charted(table_rows, rows_summary):
    """The chart's bars: the teacher's and every row's but a tuned row's at x1, which are its
    published row's runs (the same bars twice crowded a chart of 25 rows)."""
    keep = [True] + [not (parse_row(r)[1] == TUNED and v.get("weight_scale") == 1) for r, v in rows_summary.items()]
    return [row for row, kept in zip(table_rows, keep) if kept]


def write_report(report, output):
    students_on_val = report["eval_dataset"] == DEFAULT_EVAL_DATASET
    lines = ["# Accuracy on the embedded digits dataset", "", f"Command: `{report['command']}`  ",
             f"Schedule: `{report['schedule']}`; teacher options `{' '.join(report['schedule_opts']['teacher'])}`, "
             f"student options `{' '.join(report['schedule_opts']['student'])}` (on top of configs/digits)  ",
             f"Runs: one record per run in `{report['records']}` (metrics, exact config, machine, seconds)  ",
             f"Students evaluated on: `{report['eval_dataset']}`", ""]
    for det, d in report["detectors"].items():
        rows_summary, teacher = d["rows"], d["teacher"]
        incomplete = [f"{row_label(r)}: {v['seeds']} of {d['expected_seeds']} seeds"
                      for r, v in rows_summary.items() if v["seeds"] < d["expected_seeds"]]
        incomplete += [f"{row_label(r)}: 0 of {d['expected_seeds']} seeds" for r in d["not_trained"]]
        lines += [f"## {det}", ""]
        if is_pair(det):
            student, teacher_det = student_and_teacher(det)
            lines += [f"A heterogeneous pair: the trained {teacher_det} teacher distilled into the {student} student "
                      f"(other head, other anchor layout). The baseline is the {student} student's own (all its "
                      "seeds). Methods that need the same anchor layout refuse the pair when the model is built: "
                      + ", ".join(map(method_label, d["needs_same_layout"])) + ".", ""]
        if teacher is None:
            lines += ["No teacher trained yet.", ""]
            continue
        teacher_aps = sorted({a for r, v in rows_summary.items() if r != "baseline" for a in v["teacher_AP"]})
        lines += [f"Teacher: `{teacher['config_file']}` with the schedule's options, {teacher['iterations']} "
                  f"iterations, seed 0: {teacher['metrics']['AP']:.1f} AP on digits_det_val."
                  + (f" Every row below was trained with a teacher of AP {teacher_aps}." if teacher_aps else ""), ""]
        if incomplete:
            lines += ["**Incomplete** (runs still to train): " + "; ".join(incomplete) + ".", ""]
        teacher_label = "teacher R34" + (f" ({student_and_teacher(det)[1]})" if is_pair(det) else "")
        table_rows = [(teacher_label + ("" if students_on_val else " (on val)"), teacher["metrics"], None)]
        table_rows += [(f"{row_label(r)} ({v['seeds']} seed{'s' if v['seeds'] > 1 else ''})", v["mean"],
                        v["std"] if v["seeds"] > 1 else None) for r, v in rows_summary.items()]
        lines += [metrics_table(table_rows), ""]
        tuned = [f"{method_label(parse_row(r)[0])} x{v['weight_scale']:g}" for r, v in rows_summary.items()
                 if parse_row(r)[1] == TUNED]
        if tuned:
            lines += ["Rows without \"tuned\" use the published constants (d2_taskdistill/config.py). Tuned rows: "
                      "every loss weight of the method x the factor chosen on the tune split "
                      f"(benchmarks/tuned_weights.json): {', '.join(tuned)}.", ""]
        masked = {r: v for r, v in rows_summary.items() if "mask_mean" in v}
        if masked and "mask_metrics" in teacher:
            lines += ["Masks (segm):", ""]
            mask_rows = [(table_rows[0][0], teacher["mask_metrics"], None)]
            mask_rows += [(f"{row_label(r)} ({v['seeds']} seed{'s' if v['seeds'] > 1 else ''})", v["mask_mean"],
                           v["mask_std"] if v["seeds"] > 1 else None) for r, v in masked.items()]
            lines += [metrics_table(mask_rows), ""]
        if rows_summary:
            chart = bar_chart(charted(table_rows, rows_summary), f"{output}_{det}.png",
                              title=f"{det}: COCO metrics on {report['eval_dataset']}")
            lines += [f"![{det}]({os.path.basename(chart)})", ""]
        if "baseline" in rows_summary:
            fitnet = rows_summary.get("fitnet", {}).get("mean", {}).get("AP")
            gains = []
            for r, v in rows_summary.items():
                if r == "baseline":
                    continue
                beats = "-" if fitnet is None or r == "fitnet" else ("yes" if v["mean"]["AP"] > fitnet else "no")
                gap = "-" if v.get("gap_closed") is None else f"{100 * v['gap_closed']:.0f} %"
                seeds = ", ".join(f"{m['AP']:.1f}" for m in v["runs"])
                gains.append([row_label(r), f"{v['gain_AP']:+.2f}", gap, beats, seeds])
            lines += [markdown_table(["row", "gain over baseline (AP)", "gap closed", "beats FITNET", "seeds' AP"], gains)]
            lines += ["", "Gap closed = (row AP - baseline AP) / (teacher AP - baseline AP).", ""]
            if teacher["metrics"]["AP"] <= rows_summary["baseline"]["mean"]["AP"]:
                lines += [f"The teacher ({teacher['metrics']['AP']:.1f} AP) is not above the student alone: there is no gap "
                          "to close, and gap closed is not defined.", ""]
            other_teacher = [f"{row_label(r)} (teacher AP {v['own_teacher_AP']:.1f})" for r, v in rows_summary.items()
                             if "own_teacher_AP" in v]
            if other_teacher:
                lines += ["Trained with a teacher retrained since the table's (same config and seed, another AP: "
                          "docs/results.md, Rerunning), so their gap closed is measured against that teacher's AP: "
                          + "; ".join(other_teacher) + ".", ""]
    write_report_files(output, report, lines)


if __name__ == "__main__":
    sys.exit(main())
