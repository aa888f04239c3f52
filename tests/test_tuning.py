"""The equal tuning budget: the sweep's runs, the factor chosen on the tune split, the tuned rows."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from d2_taskdistill import load_config
from harness.tuning import SCALES, choose_scale, next_scale, scaled_weight_opts

from conftest import ROOT, config_path, markdown_tables


def test_every_loss_weight_of_the_method_is_scaled():
    fcos_fgd = load_config(config_path("digits", "fcos_R34-R18_fgd.yaml"))
    assert scaled_weight_opts(fcos_fgd, 0.1) == [  # the FCOS config's constants x 0.1
        "DISTILL.FGD.FG_WEIGHT", 0.00016, "DISTILL.FGD.BG_WEIGHT", 8e-05,
        "DISTILL.FGD.ATTENTION_WEIGHT", 8e-05, "DISTILL.FGD.GLOBAL_WEIGHT", 8e-07]
    bckd_tid = load_config(config_path("digits", "retinanet_R34-R18_bckd_tid.yaml"))
    assert scaled_weight_opts(bckd_tid, 10.0) == [
        "DISTILL.BCKD.CLS_WEIGHT", 10.0, "DISTILL.BCKD.LOC_WEIGHT", 40.0, "DISTILL.BCKD.CENTERNESS_WEIGHT", 10.0,
        "DISTILL.TID.WEIGHT", 10.0]


def test_the_best_factor_is_chosen_and_a_tie_goes_to_the_published_constants():
    assert choose_scale({0.01: 30.0, 0.1: 29.0, 1.0: 20.0, 10.0: None}) == 0.01
    assert choose_scale({0.01: 20.0, 0.1: 25.0, 1.0: 25.0, 10.0: 25.0}) == 1.0
    assert choose_scale({0.1: 25.0, 10.0: 25.0}) in (0.1, 10.0)  # equally near x1: either
    assert choose_scale({0.01: 0.0014, 0.1: 0.0004, 1.0: 0.0001}) == 1.0  # equal at 0.1 AP
    with pytest.raises(ValueError, match="every run of the sweep diverged"):
        choose_scale({1.0: None, 10.0: float("nan")})


def sweep_table(path):
    (header, rows), = markdown_tables(path.read_text())
    assert header == ["method", *(f"x{s:g}" for s in SCALES), "chosen", "AP over x1"]
    return rows


def fake_record(bench, run, ap=None, diverged=None):
    metrics = None if diverged else {m: ap for m in bench.METRICS}
    bench.write_record(run.record_path, {
        "row": run.row, "seed": run.seed, "config_file": bench.rel(run.config_file), "opts": [],
        "config": run.cfg.dump(), "metrics": metrics, **({"diverged": diverged} if diverged else {}),
        "iterations": 10, "seconds": 1.0, "teacher": {"config_sha": run.teacher.sha, "AP": 40.0}})


def test_sweep_writes_the_chosen_factor_that_tuned_rows_train_with(tmp_path):
    """RetinaNet FGD over the grid on the tune split (records made here): x0.1 is best and is
    written to the tuned-weights file; "fgd+tuned" then trains FGD's weights x 0.1, and a method
    tuned to x1 reuses the published row's runs."""
    import bench_accuracy as bench

    tuned_file = tmp_path / "tuned_weights.json"
    args = argparse.Namespace(schedule="smoke", tune=True, rows=["fgd"], seeds=1, eval_dataset="digits_det_tune",
                              work_dir=str(tmp_path / "work"), records=str(tmp_path / "records"),
                              detectors=["retinanet"], tuned_weights=str(tuned_file), output=str(tmp_path / "tuning"))
    teachers = {"retinanet": bench.Teacher(args, "retinanet")}
    runs = bench.sweep_runs(args, teachers)
    assert [r.row for r in runs] == ["baseline", *(f"fgd@{s:g}" for s in SCALES)]
    for run in runs[1:]:
        assert run.cfg.DISTILL.FGD.FG_WEIGHT == pytest.approx(0.001 * run.weight_scale, rel=1e-9)
        assert run.cfg.DISTILL.FGD.GLOBAL_WEIGHT == pytest.approx(0.000005 * run.weight_scale, rel=1e-9)
        assert run.cfg.DATASETS.TEST == ("digits_det_tune",) and run.record_divergence
    outcomes = {"baseline": 10.0, "fgd@0.01": 15.0, "fgd@0.1": 18.0, "fgd@1": 12.0}
    for run in runs:
        if run.row in outcomes:  # fgd@10 not trained yet
            ap = outcomes[run.row]
            fake_record(bench, run, **({"diverged": "Loss became infinite or NaN at iteration=7!"}
                                       if ap == "diverged" else {"ap": ap}))
    bench.write_sweep(args, runs, 0.0)
    assert not tuned_file.exists()  # an incomplete sweep chooses nothing, and writes no file
    assert sweep_table(tmp_path / "tuning.md") == [["FGD", "15.0", "18.0", "12.0", "-", "-", "-"]]

    fake_record(bench, runs[-1], diverged="Loss became infinite or NaN at iteration=2!")
    bench.write_sweep(args, runs, 0.0)
    chosen = json.loads(tuned_file.read_text())["tracks"]["retinanet"]["fgd"]
    assert chosen["scale"] == 0.1 and chosen["eval_dataset"] == "digits_det_tune"
    assert chosen["AP"] == {"0.01": 15.0, "0.1": 18.0, "1": 12.0, "10": "diverged"}
    assert sweep_table(tmp_path / "tuning.md") == [["FGD", "15.0", "18.0", "12.0", "diverged", "x0.1", "+6.0"]]

    table_args = argparse.Namespace(**{**vars(args), "tune": False, "eval_dataset": bench.DEFAULT_EVAL_DATASET,
                                       "seeds": None, "rows": None})
    # The table's default rows: each tuned method beside its published row.
    default_rows = bench.rows_of(table_args, "retinanet", ["baseline", "fitnet", "fgd", "pkd"])
    assert default_rows == ["baseline", "fitnet", "fgd", "fgd+tuned", "pkd"]
    assert bench.rows_of(table_args, "fcos", ["baseline", "fgd"]) == ["baseline", "fgd"]  # tuned on RetinaNet only
    published, tuned = (bench.Run(table_args, "retinanet", row, 0, teachers["retinanet"]) for row in ("fgd", "fgd+tuned"))
    assert published.cfg.DISTILL.FGD.FG_WEIGHT == 0.001 and tuned.cfg.DISTILL.FGD.FG_WEIGHT == pytest.approx(0.0001)
    assert tuned.record_path.endswith("fgd+tuned_seed0.json") and not tuned.record_divergence
    for run, ap in ((published, 20.0), (tuned, 24.0)):
        fake_record(bench, run, ap)
    teacher = teachers["retinanet"]
    bench.write_record(teacher.record_path, {"config_file": bench.rel(teacher.config_file), "config": teacher.cfg.dump(),
                                             "config_sha": teacher.sha, "iterations": 20,
                                             "metrics": {m: 40.0 for m in bench.METRICS}})
    report = bench.build_report(table_args, [published, tuned], teachers, 0.0)
    bench.write_report(report, str(tmp_path / "table"))
    table = (tmp_path / "table.md").read_text()
    (_, rows), *_ = markdown_tables(table)
    assert [row[:2] for row in rows[1:]] == [["R18 + FGD (1 seed)", "20.0"], ["R18 + FGD, tuned weights (1 seed)", "24.0"]]
    assert "(benchmarks/tuned_weights.json): FGD x0.1." in table

    tuned_file.write_text(json.dumps({"tracks": {"retinanet": {"fgd": {"scale": 1.0}}}}))
    at_published = bench.Run(table_args, "retinanet", "fgd+tuned", 0, teachers["retinanet"])
    assert at_published.record_path == published.record_path and at_published.committed() is not None
    with pytest.raises(KeyError, match="no tuned weights for pkd on retinanet.*--tune --detectors retinanet --rows pkd"):
        bench.Run(table_args, "retinanet", "pkd+tuned", 0, teachers["retinanet"])


def test_the_chart_leaves_out_a_tuned_row_at_x1_which_repeats_its_published_row():
    import bench_accuracy as bench

    summary = {"baseline": {}, "fgd": {}, "fgd+tuned": {"weight_scale": 0.1}, "pkd": {}, "pkd+tuned": {"weight_scale": 1.0}}
    table_rows = ["teacher", *summary]
    assert bench.charted(table_rows, summary) == ["teacher", "baseline", "fgd", "fgd+tuned", "pkd"]


def test_a_sweep_run_that_diverges_is_recorded_and_a_table_run_that_diverges_stops(tmp_path, monkeypatch):
    import bench_accuracy as bench

    def diverging(*args, **kwargs):
        raise FloatingPointError("Loss became infinite or NaN at iteration=3!\nloss_dict = {'loss_fgd': nan}")

    monkeypatch.setattr(bench, "train_and_evaluate", diverging)
    args = argparse.Namespace(schedule="smoke", tune=True, rows=None, seeds=1, eval_dataset="digits_det_tune",
                              work_dir=str(tmp_path / "work"), records=str(tmp_path / "records"))
    teacher = bench.Teacher(args, "retinanet")
    result = bench.train_student(bench.Run(args, "retinanet", "fgd@10", 0, teacher))
    assert result["metrics"] is None and result["diverged"] == "Loss became infinite or NaN at iteration=3!"
    with pytest.raises(FloatingPointError):
        bench.train_student(bench.Run(args, "retinanet", "fgd", 0, teacher))


def test_tuning_on_the_split_the_table_reports_is_refused():
    proc = subprocess.run([sys.executable, "tools/bench_accuracy.py", "--tune", "--eval-dataset", "digits_det_val"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--tune --eval-dataset digits_det_val: the table reports that split" in proc.stderr


def test_the_tune_schedule_is_the_trained_one_stopped_at_500_iterations_under_the_same_teacher(tmp_path):
    import bench_accuracy as bench

    def args(schedule):
        return argparse.Namespace(schedule=schedule, tune=schedule == "tune", rows=None, seeds=1,
                                  eval_dataset="digits_det_tune", work_dir=str(tmp_path / schedule),
                                  records=str(tmp_path / f"records_{schedule}"))
    tune, trained = (bench.Teacher(args(s), "retinanet") for s in ("tune", "trained"))
    assert tune.output_dir == trained.output_dir and tune.sha == trained.sha
    probe = bench.Run(args("tune"), "retinanet", "pkd@0.1", 0, tune)
    full = bench.Run(args("trained"), "retinanet", "pkd", 0, trained)
    assert (probe.cfg.SOLVER.MAX_ITER, full.cfg.SOLVER.MAX_ITER) == (500, 1000)
    assert probe.cfg.SOLVER.STEPS == full.cfg.SOLVER.STEPS == (800, 900)  # no lr step before 500
    assert probe.cfg.MODEL.FPN.OUT_CHANNELS == full.cfg.MODEL.FPN.OUT_CHANNELS == 128
    assert probe.cfg.DISTILL.TEACHER.WEIGHTS == full.cfg.DISTILL.TEACHER.WEIGHTS
    assert (probe.cfg.DISTILL.PKD.WEIGHT, full.cfg.DISTILL.PKD.WEIGHT) == (1.0, 10.0)


def test_sweep_trains_the_tables_question_first(tmp_path):
    """Every track's student alone, then TBD, FGD, PKD and CWD on every track before the other
    methods, whatever order --rows names them in: a sweep stopped part-way has answered
    "does TBD beat the tuned public methods"."""
    import bench_accuracy as bench

    args = argparse.Namespace(schedule="tune", tune=True, rows=["fitnet", "cwd", "tbd"], seeds=1,
                              eval_dataset="digits_det_tune", work_dir=str(tmp_path / "work"),
                              records=str(tmp_path / "records"), detectors=["retinanet", "fcos"],
                              tuned_weights=str(tmp_path / "none.json"))
    teachers = {det: bench.Teacher(args, det) for det in ("retinanet", "fcos")}
    order = [(r.det, r.row) for r in bench.sweep_runs(args, teachers)]
    assert order == [("retinanet", "baseline"), ("fcos", "baseline"),
                     *((det, f"{method}@{s:g}") for method in ("tbd", "cwd", "fitnet")
                       for det in ("retinanet", "fcos") for s in SCALES)]


def test_a_sweep_resumed_after_a_complete_grid_scales_the_published_weights(tmp_path):
    """Once a method's grid is complete, tuned_weights.json names it and the table's default rows
    add "<method>+tuned"; the sweep's default rows must not (a resumed sweep refused to start)."""
    import bench_accuracy as bench

    tuned_file = tmp_path / "tuned_weights.json"
    tuned_file.write_text(json.dumps({"tracks": {"retinanet": {"tbd": {"scale": 1.0}}}}))
    args = argparse.Namespace(schedule="tune", tune=True, rows=None, seeds=1, eval_dataset="digits_det_tune",
                              work_dir=str(tmp_path / "work"), records=str(tmp_path / "records"),
                              detectors=["retinanet"], tuned_weights=str(tuned_file))
    rows = [r.row for r in bench.sweep_runs(args, {"retinanet": bench.Teacher(args, "retinanet")})]
    assert rows[:5] == ["baseline", *(f"tbd@{s:g}" for s in SCALES)]
    assert not [r for r in rows if bench.TUNED in r]
    assert len(rows) == 1 + len(SCALES) * len(bench.methods_of("retinanet"))


def test_a_best_factor_at_an_edge_of_the_grid_adds_the_next_decade():
    assert next_scale({0.01: 30.0, 0.1: 29.0, 1.0: 20.0, 10.0: None}) == 0.001
    assert next_scale({0.001: 29.0, 0.01: 30.0, 0.1: 29.0, 1.0: 20.0, 10.0: None}) is None  # inside
    assert next_scale({0.01: 20.0, 0.1: 25.0, 1.0: 26.0, 10.0: 27.0}) == 100.0
    assert next_scale({0.01: 20.0, 0.1: 25.0, 1.0: 27.0, 10.0: None}) is None  # x10 diverged: x1 is inside
    assert next_scale({0.0001: 9.0, 0.001: 8.0, 0.01: 7.0}) is None  # the lower limit
    assert next_scale({100.0: 7.0, 1000.0: 9.0}) is None  # the upper limit


def test_the_sweep_extends_a_grid_whose_best_is_at_an_edge(tmp_path):
    """FCOS FGD best at x0.01: no factor is chosen until x0.001 is trained; then the best of the
    five is, and the table gets an x0.001 column (blank for a method that did not need it)."""
    import bench_accuracy as bench

    tuned_file = tmp_path / "tuned_weights.json"
    args = argparse.Namespace(schedule="smoke", tune=True, rows=["fgd", "pkd"], seeds=1,
                              eval_dataset="digits_det_tune", work_dir=str(tmp_path / "work"),
                              records=str(tmp_path / "records"), detectors=["fcos"], tuned_weights=str(tuned_file),
                              output=str(tmp_path / "tuning"))
    teachers = {"fcos": bench.Teacher(args, "fcos")}
    outcomes = {"baseline": 8.6, "fgd@0.01": 9.4, "fgd@0.1": 8.4, "fgd@1": 9.2, "fgd@10": 9.0,
                "pkd@0.01": 12.0, "pkd@0.1": 20.0, "pkd@1": 18.0, "pkd@10": 11.0}
    for run in bench.sweep_runs(args, teachers):
        fake_record(bench, run, outcomes[run.row])
    runs = bench.sweep_runs(args, teachers)
    new, = [r for r in runs if r.committed() is None]
    assert new.row == "fgd@0.001" and new.cfg.DISTILL.FGD.FG_WEIGHT == pytest.approx(0.0016 * 0.001, rel=1e-6)
    bench.write_sweep(args, runs, 0.0)
    assert list(json.loads(tuned_file.read_text())["tracks"]["fcos"]) == ["pkd"]  # FGD is not tuned yet

    fake_record(bench, new, 12.5)
    new, = [r for r in bench.sweep_runs(args, teachers) if r.committed() is None]
    assert new.row == "fgd@0.0001"  # x0.001 is best: still at the edge
    fake_record(bench, new, 11.0)
    runs = bench.sweep_runs(args, teachers)
    assert all(r.committed() is not None for r in runs)
    bench.write_sweep(args, runs, 0.0)
    assert json.loads(tuned_file.read_text())["tracks"]["fcos"]["fgd"]["scale"] == 0.001
    (header, rows), = markdown_tables((tmp_path / "tuning.md").read_text())
    assert header == ["method", "x0.0001", "x0.001", "x0.01", "x0.1", "x1", "x10", "chosen", "AP over x1"]
    assert rows == [["FGD", "11.0", "12.5", "9.4", "8.4", "9.2", "9.0", "x0.001", "+3.3"],
                    ["PKD", "", "", "12.0", "20.0", "18.0", "11.0", "x0.1", "+2.0"]]


def test_the_sweep_command_trains_the_added_decade_in_the_same_call(tmp_path, monkeypatch):
    """`bench_accuracy.py --tune` (training replaced by outcomes per row): after FGD's grid, its
    runs at x0.001 and x0.0001 are trained before PKD's grid (a sweep stopped there has tuned FGD),
    all in the same call, and FGD's factor is the one written."""
    import bench_accuracy as bench

    outcomes = {"baseline": 8.6, "fgd@0.01": 9.4, "fgd@0.1": 8.4, "fgd": 9.2, "fgd@10": 9.0, "fgd@0.001": 12.5,
                "fgd@0.0001": 11.0, "pkd@0.01": 12.0, "pkd@0.1": 20.0, "pkd": 18.0, "pkd@10": 11.0}
    trained = []

    def train_and_evaluate(config_file, output_dir, opts):
        row = os.path.basename(output_dir).removesuffix("_seed0")
        trained.append(row)
        return {"metrics": {m: outcomes[row] for m in bench.METRICS}, "iterations": 10, "seconds": 1.0}

    monkeypatch.setattr(bench, "train_and_evaluate", train_and_evaluate)
    monkeypatch.setattr(bench, "train_teacher", lambda teacher: {"detector": teacher.det, "metrics": {"AP": 40.0}})
    tuned_file = tmp_path / "tuned.json"
    monkeypatch.setattr(sys, "argv", ["bench_accuracy.py", "--tune", "--schedule", "smoke", "--detectors", "fcos",
                                      "--rows", "fgd", "pkd", "--records", str(tmp_path / "records"), "--work-dir",
                                      str(tmp_path / "work"), "--output", str(tmp_path / "tuning"),
                                      "--tuned-weights", str(tuned_file)])
    assert bench.main() == 0
    assert trained == ["baseline", "fgd@0.01", "fgd@0.1", "fgd", "fgd@10", "fgd@0.001", "fgd@0.0001",
                       "pkd@0.01", "pkd@0.1", "pkd", "pkd@10"]
    chosen = json.loads(tuned_file.read_text())["tracks"]["fcos"]
    assert (chosen["fgd"]["scale"], chosen["pkd"]["scale"]) == (0.001, 0.1)


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_run_keeps_its_record_and_logs_and_its_weights_only_when_asked(tmp_path, monkeypatch, keep):
    """bench_accuracy.py deletes a student run's checkpoints and saved predictions once its record is
    written (the sweep left about 450 MB a run), unless --keep-weights."""
    import bench_accuracy as bench

    written = ["last_checkpoint", "metrics.json", "model_0000004.pth", "model_final.pth",
               os.path.join("inference", "instances_predictions.pth")]

    def train_and_evaluate(config_file, output_dir, opts):
        os.makedirs(os.path.join(output_dir, "inference"))
        for name in written:
            open(os.path.join(output_dir, name), "w").close()
        return {"metrics": {m: 10.0 for m in bench.METRICS}, "iterations": 10, "seconds": 1.0}

    monkeypatch.setattr(bench, "train_and_evaluate", train_and_evaluate)
    monkeypatch.setattr(bench, "train_teacher", lambda teacher: {"detector": teacher.det, "metrics": {"AP": 40.0}})
    monkeypatch.setattr(sys, "argv", ["bench_accuracy.py", "--schedule", "smoke", "--detectors", "fcos", "--rows",
                                      "baseline", "fgd", "--seeds", "1", "--records", str(tmp_path / "records"), "--work-dir",
                                      str(tmp_path / "work"), "--output", str(tmp_path / "table"),
                                      *(["--keep-weights"] if keep else [])])
    assert bench.main() == 0
    for run in ("baseline_seed0", "fgd_seed0"):
        run_dir = tmp_path / "work" / "fcos" / run
        left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
        assert left == (sorted(written) if keep else ["last_checkpoint", "metrics.json"]), run
        assert json.loads((tmp_path / "records" / "fcos" / f"{run}.json").read_text())["metrics"]["AP"] == 10.0
