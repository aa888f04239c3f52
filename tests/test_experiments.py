"""Reuse of finished runs by the demo and the accuracy benchmark."""
from d2_taskdistill import load_config
from d2_taskdistill.experiments import same_run_config

from conftest import config_path


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
    from d2_taskdistill.experiments import ap_curve

    lines = ['{"iteration": 19, "total_loss": 1.5}',
             '{"iteration": 499, "bbox/AP": 12.25, "bbox/AP50": 30.0, "total_loss": 0.9}',
             '{"iteration": 999, "bbox/AP": 20.5, "bbox/AP50": 41.0}',
             '{"iteration": 1000, "bbox/AP": 20.5, "bbox/AP50": 41.0}', ""]  # the evaluation after training
    (tmp_path / "metrics.json").write_text("\n".join(lines))
    assert ap_curve(str(tmp_path), 1000) == [(500, 12.25), (1000, 20.5), (1000, 20.5)]
    assert ap_curve(str(tmp_path / "missing"), 1000) == []
