"""Reuse of finished runs by the demo and the accuracy benchmark."""
import json

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
    subprocess.run([sys.executable, "tools/bench_accuracy.py", "--report-only", "--output", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    def table(path):
        with open(path) as f:
            return [line for line in f if not line.startswith(("Command:", "Wall time"))]
    committed = table(f"{ROOT}/benchmarks/accuracy_trained.md")
    assert sum(line.startswith("| R18 + ") for line in committed) >= 12  # both detectors' method rows
    assert table(f"{out}.md") == committed
