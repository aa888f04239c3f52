"""Reuse of finished runs by the demo and the accuracy benchmark."""
import json
import os
import re

import pytest

from d2_taskdistill import load_config
from harness.experiments import same_run_config

from conftest import config_path, tiny_run_opts


def student_cfg(*opts):
    cfg = load_config(config_path("digits", "retinanet_R18_FPN_student.yaml"), list(opts))
    cfg.freeze()
    return cfg


def test_same_run_config():
    saved = student_cfg("OUTPUT_DIR", "/abs/run", "SEED", 1).dump()
    assert same_run_config(saved, student_cfg("OUTPUT_DIR", "run", "SEED", 1))
    assert not same_run_config(saved, student_cfg("OUTPUT_DIR", "run", "SEED", 2))
    assert not same_run_config(saved, student_cfg("OUTPUT_DIR", "run", "SEED", 1, "SOLVER.MAX_ITER", 500))
    # Saving more often (a teacher made resumable) trains the same run.
    assert same_run_config(saved, student_cfg("SEED", 1, "SOLVER.CHECKPOINT_PERIOD", 300))
    # A default the code gained after the run was saved does not make it another run.
    without_key = saved.replace("    LOG_PERIOD: 20\n", "")
    assert without_key != saved
    assert same_run_config(without_key, student_cfg("SEED", 1))


def test_ap_curve_reads_the_evaluations_of_metrics_json(tmp_path):
    from harness.experiments import ap_curve

    lines = ['{"iteration": 19, "total_loss": 1.5}',
             '{"iteration": 499, "bbox/AP": 12.25, "bbox/AP50": 30.0, "total_loss": 0.9}',
             '{"iteration": 999, "bbox/AP": 20.5, "bbox/AP50": 41.0}',
             '{"iteration": 1000, "bbox/AP": 20.5, "bbox/AP50": 41.0}', ""]  # the evaluation after training
    (tmp_path / "metrics.json").write_text("\n".join(lines))
    # The periodic evaluation at 999 and the one after training name the same model.
    assert ap_curve(str(tmp_path), 1000) == [(500, 12.25), (1000, 20.5)]
    assert ap_curve(str(tmp_path / "missing"), 1000) == []


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    from d2_taskdistill.engine import DistillTrainer
    from harness.experiments import interrupted_at, train_and_evaluate

    config = config_path("digits", "retinanet_R18_FPN_student.yaml")
    opts = tiny_run_opts(tmp_path, max_iter=4)  # checkpoints after iterations 2 and 4
    first = train_and_evaluate(config, str(tmp_path), opts)
    assert first["resumed_from"] is None and not first["reused"]
    assert train_and_evaluate(config, str(tmp_path), opts)["reused"]

    # Stopped after the checkpoint of iteration 2: no final model, no evaluation.
    (tmp_path / "model_final.pth").unlink()
    (tmp_path / "final_eval.json").unlink()
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    cfg = load_config(config, [*opts, "OUTPUT_DIR", str(tmp_path)])
    assert interrupted_at(str(tmp_path), cfg) == 2
    other = load_config(config, [*opts, "SEED", 7, "OUTPUT_DIR", str(tmp_path)])
    assert interrupted_at(str(tmp_path), other) is None  # another config trains from the start

    start_iters = []
    train = DistillTrainer.train
    monkeypatch.setattr(DistillTrainer, "train", lambda self: (start_iters.append(self.start_iter), train(self))[1])
    resumed = train_and_evaluate(config, str(tmp_path), opts)
    assert start_iters == [2]
    assert resumed["resumed_from"] == 2 and not resumed["reused"]
    assert set(resumed["metrics"]) >= {"AP", "AP50"}
    assert (tmp_path / "model_final.pth").exists()

    # Stopped during the final evaluation: model_final is evaluated, nothing is trained again.
    (tmp_path / "final_eval.json").unlink()
    final_weights = (tmp_path / "model_final.pth").read_bytes()
    assert interrupted_at(str(tmp_path), cfg) == 4
    evaluated = train_and_evaluate(config, str(tmp_path), opts)
    assert start_iters == [2, 4] and evaluated["resumed_from"] == 4
    assert (tmp_path / "model_final.pth").read_bytes() == final_weights
    # Per-class APs of absent classes are NaN: compare as JSON text.
    assert json.dumps(evaluated["metrics"], sort_keys=True) == json.dumps(resumed["metrics"], sort_keys=True)


def test_committed_records_still_make_the_committed_table(tmp_path):
    """Config keys added to the code since the runs must not orphan a committed run record:
    the report from the records equals the committed benchmarks/accuracy_trained.md (all but
    its command and wall-time lines)."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "accuracy_trained"  # the committed basename: the figure links match
    # With the committed benchmarks/tuned_weights.json: its +tuned rows are in the table.
    subprocess.run([sys.executable, "tools/bench_accuracy.py", "--report-only", "--output", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    def table(path):
        with open(path) as f:
            return [line for line in f if not line.startswith(("Command:", "Wall time"))]
    committed = table(f"{ROOT}/benchmarks/accuracy_trained.md")
    assert sum(line.startswith("| R18 + ") for line in committed) >= 12  # both detectors' method rows
    assert sum(", tuned weights (" in line for line in committed) >= 8
    assert table(f"{out}.md") == committed


def test_heterogeneous_pair_runs_build_with_the_other_detectors_teacher(tmp_path):
    """fcos_to_retinanet: the RetinaNet student's configs with the FCOS teacher's config and
    weights; by default only the methods that compare features, which build across the pair.
    A method that needs the same anchor layout refuses the pair when the model is built."""
    import argparse

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import RetinaNet, build_model
    from detectron2.modeling.meta_arch.fcos import FCOS

    import bench_accuracy as bench

    args = argparse.Namespace(schedule="smoke", rows=None, seeds=None, eval_dataset=bench.DEFAULT_EVAL_DATASET,
                              work_dir=str(tmp_path / "work"), records=str(tmp_path / "records"),
                              tuned_weights=str(tmp_path / "no_tuned_weights.json"))
    teacher = bench.Teacher(args, "fcos")
    fcos_cfg = teacher.cfg.clone()
    fcos_cfg.MODEL.DEVICE = "cpu"
    teacher.weights = str(tmp_path / "fcos_teacher.pth")
    DetectionCheckpointer(build_model(fcos_cfg), save_dir=str(tmp_path)).save("fcos_teacher")

    assert bench.student_and_teacher("fcos_to_retinanet") == ("retinanet", "fcos")
    assert bench.seeds_of(args, "fcos_to_retinanet") == 2 and bench.seeds_of(args, "retinanet") == 3
    rows = bench.rows_of(args, "fcos_to_retinanet", ["baseline", *bench.METHODS])
    assert rows == ["fitnet", "fgfi", "fgd", "pkd", "cwd"]
    for row in [*rows, "tid"]:
        run = bench.Run(args, "fcos_to_retinanet", row, 0, teacher)
        assert run.record_path == os.path.join(args.records, "fcos_to_retinanet", f"{row}_seed0.json")
        assert run.cfg.DISTILL.TEACHER.CONFIG_FILE == "configs/digits/fcos_R34_FPN_teacher.yaml"
        assert run.cfg.DISTILL.TEACHER.WEIGHTS == teacher.weights
        cfg = run.cfg.clone()
        cfg.MODEL.DEVICE = "cpu"
        if row == "tid":
            with pytest.raises(ValueError, match="anchor"):
                build_model(cfg)
            continue
        model = build_model(cfg)
        assert type(model.student) is RetinaNet and isinstance(model.teacher, FCOS), row


def test_rows_trained_with_a_retrained_teacher_measure_the_gap_against_it(tmp_path):
    """A row whose records name another teacher AP than the table's teacher (a teacher retrained
    on a fresh machine) gets its gap closed against that AP, and the table says so."""
    import argparse
    import shutil
    import statistics

    import bench_accuracy as bench
    from conftest import ROOT

    records = tmp_path / "records"
    shutil.copytree(os.path.join(ROOT, "benchmarks", "accuracy_runs_trained"), records)
    args = argparse.Namespace(schedule="trained", rows=None, seeds=None, eval_dataset=bench.DEFAULT_EVAL_DATASET,
                              work_dir=str(tmp_path / "work"), records=str(records), detectors=["fcos"])
    teacher = bench.Teacher(args, "fcos")
    runs = [bench.Run(args, "fcos", "fgd", seed, teacher) for seed in range(2)]
    for run, ap in zip(runs, (45.0, 46.0)):
        bench.write_record(run.record_path, {"row": "fgd", "seed": run.seed, "config_file": bench.rel(run.config_file),
                                             "opts": [], "config": run.cfg.dump(), "metrics": {m: ap for m in bench.METRICS},
                                             "iterations": 1000, "seconds": 1.0,
                                             "teacher": {"config_sha": teacher.sha, "AP": 49.23}})
    baseline_runs = [bench.Run(args, "fcos", "baseline", seed, teacher) for seed in range(2)]
    baseline = [run.committed()["metrics"]["AP"] for run in baseline_runs]
    table_teacher = bench.read_record(teacher.record_path)["metrics"]["AP"]
    # Trained with the table's teacher (retrained on a fresh machine after the published rows).
    tid_runs = [bench.Run(args, "fcos", "tid+tuned", seed, teacher) for seed in range(2)]
    report = bench.build_report(args, [*baseline_runs, *runs, *tid_runs], {"fcos": teacher}, 0.0)
    rows = report["detectors"]["fcos"]["rows"]
    base = statistics.fmean(baseline)
    assert abs(rows["fgd"]["gap_closed"] - (45.5 - base) / (49.23 - base)) < 1e-12
    assert "own_teacher_AP" not in rows["tid+tuned"]
    tid = statistics.fmean(run.committed()["metrics"]["AP"] for run in tid_runs)
    assert abs(rows["tid+tuned"]["gap_closed"] - (tid - base) / (table_teacher - base)) < 1e-12
    bench.write_report(report, str(tmp_path / "table"))
    assert "R18 + FGD (teacher AP 49.2)" in (tmp_path / "table.md").read_text()


def test_local_teacher_weights_of_another_ap_are_the_ones_the_runs_record(tmp_path, monkeypatch):
    """Teacher weights retrained here from the committed config (a fresh machine) are reused as
    they are; the committed teacher record stays, and the runs get the local teacher's AP."""
    import argparse
    import shutil

    import bench_accuracy as bench
    from conftest import ROOT

    records = tmp_path / "records"
    shutil.copytree(os.path.join(ROOT, "benchmarks", "accuracy_runs_trained", "fcos"), records / "fcos")
    args = argparse.Namespace(schedule="trained", work_dir=str(tmp_path / "work"), records=str(records))
    teacher = bench.Teacher(args, "fcos")
    committed = bench.read_record(teacher.record_path)
    local = {"metrics": {m: 48.92 for m in bench.METRICS}, "reused": True, "iterations": 4000, "seconds": 1.0}
    monkeypatch.setattr(bench, "train_and_evaluate", lambda *a: local)
    record = teacher.train()
    assert record["metrics"]["AP"] == 48.92 and record["retrained_here"]
    assert bench.read_record(teacher.record_path) == committed and committed["metrics"]["AP"] != 48.92
    local["metrics"] = committed["metrics"]  # the committed teacher's own weights
    assert teacher.train() == committed


def test_a_teacher_below_the_student_leaves_no_gap_to_close(tmp_path):
    """The committed RetinaNet -> Faster R-CNN medium rows: the teacher (16.4 AP) is below the
    Faster R-CNN student alone (38.2), so no row has a gap closed, and the table says why."""
    import argparse

    import bench_accuracy as bench
    from conftest import ROOT

    args = argparse.Namespace(schedule="medium", rows=["fgfi", "fgd"], seeds=2, eval_dataset=bench.DEFAULT_EVAL_DATASET,
                              work_dir=str(tmp_path / "work"), records=os.path.join(ROOT, "benchmarks", "accuracy_runs_medium"),
                              detectors=["retinanet_to_faster_rcnn"], tuned_weights=str(tmp_path / "none.json"))
    teachers = {det: bench.Teacher(args, det) for det in ("retinanet", "faster_rcnn")}
    runs = [bench.Run(args, "retinanet_to_faster_rcnn", row, seed, teachers["retinanet"])
            for row in args.rows for seed in range(2)]
    report = bench.build_report(args, runs, teachers, 0.0)
    rows = report["detectors"]["retinanet_to_faster_rcnn"]["rows"]
    assert report["detectors"]["retinanet_to_faster_rcnn"]["teacher"]["metrics"]["AP"] < rows["baseline"]["mean"]["AP"]
    assert rows["fgfi"]["gain_AP"] < 0 and rows["fgd"]["gain_AP"] < 0
    assert [rows[r]["gap_closed"] for r in ("baseline", "fgfi", "fgd")] == [None, None, None]
    bench.write_report(report, str(tmp_path / "table"))
    text = (tmp_path / "table.md").read_text()
    assert "The teacher (16.4 AP) is not above the student alone" in text
    assert re.search(r"\| R18 \+ FGFI +\| -4\.82 +\| - +\|", text)


def test_bar_chart_legend_fits_in_the_figure_with_twenty_rows(tmp_path, monkeypatch):
    """The benchmark charts put one legend label per row beside the axes: with the tuned rows a
    detector has 19, and a fixed-height figure cut the last ones off."""
    import matplotlib.pyplot as plt

    from harness.report import bar_chart

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [(f"R18 + method {i}, tuned weights (2 seeds)", {"AP": 10.0 + i}, {"AP": 0.5}) for i in range(20)]
    bar_chart(rows, str(tmp_path / "chart.png"), metrics=["AP"])
    fig = figures[0]
    legend = fig.axes[0].get_legend().get_window_extent(fig.canvas.get_renderer())
    assert len(fig.axes[0].get_legend().get_texts()) == 20
    assert legend.y0 >= 0 and legend.y1 <= fig.bbox.height, (legend, fig.bbox)
    plt.close(fig)


def test_bar_chart_rows_past_the_palette_still_differ(tmp_path, monkeypatch):
    """tab20 has twenty colours and the RetinaNet chart has 21 rows: the 21st took the teacher's
    colour. Past the palette a row's bars are hatched, so no two rows' bars look alike."""
    import matplotlib.pyplot as plt

    from harness.report import bar_chart

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [(f"row {i}", {"AP": 10.0 + i}, None) for i in range(21)]
    bar_chart(rows, str(tmp_path / "chart.png"), metrics=["AP"])
    fig = figures[0]
    looks = [(bar.get_facecolor(), bar.get_hatch()) for bar in fig.axes[0].patches]
    assert len(looks) == 21 and len(set(looks)) == 21
    plt.close(fig)
