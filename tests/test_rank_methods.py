"""tools/rank_methods.py: methods ranked on a user's own data, resumable."""
import json
import os
import subprocess
import sys

import torch

from conftest import (ROOT, SMALL_TEACHER_OPTS, TINY_ROOT_ENV, lazy_config_for_tiny_cli, make_teacher_checkpoint,
                      tiny_run_opts)


def rank(args, env, returncode=0):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "rank_methods.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_rank_methods_on_own_data_ranks_resumes_and_probes(tiny_batch, tiny_dataset, tmp_path):
    teacher = make_teacher_checkpoint("retinanet", str(tmp_path / "teacher.pth"), tiny_batch)
    root = os.environ[TINY_ROOT_ENV]
    declared = [("my_set", os.path.join(root, "train.json"), os.path.join(root, "train"))]
    opts = [*tiny_run_opts(tmp_path / "unused", 2, device="cpu"), "DATASETS.COCO", str(declared),
            "DATASETS.TRAIN", "('my_set',)", "DISTILL.TEACHER.WEIGHTS", teacher,
            "DISTILL.TEACHER.OPTS", str(SMALL_TEACHER_OPTS), "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    args = ["--config-file", "configs/digits/retinanet_R34-R18_tid.yaml", "--eval-dataset", "my_set",
            "--methods", "TID", "FITNET", "--seeds", "2", "--work-dir", str(tmp_path / "work"), *map(str, opts)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = rank(args, env)
    assert out.count("(finished earlier)") == 0 and out.count("[rank]") == 6
    report = json.load(open(tmp_path / "work" / "ranking.json"))
    rows = report["rows"]
    assert set(rows) == {"baseline", "TID", "FITNET"} and all(r["seeds"] == 2 for r in rows.values())
    means = [r["mean"]["AP"] for r in rows.values()]
    assert means == sorted(means, reverse=True)  # ranked, best first
    for r in rows.values():
        assert abs(r["mean"]["AP"] - sum(r["AP_per_seed"]) / 2) < 1e-9
    assert report["teacher_AP"] is not None  # evaluated once, with the first method's first seed
    table = open(tmp_path / "work" / "ranking.md").read()
    assert "| 1 | " in table and "student alone" in table and "gap closed" in table

    # Run again: nothing is trained, the same table comes back.
    again = rank(args, env)
    assert again.count("(finished earlier)") == 6
    assert json.load(open(tmp_path / "work" / "ranking.json"))["rows"] == rows

    probe = rank([*args[:-len(opts)], "--seeds", "1", "--probe-iters", "1", *map(str, opts)], env)
    assert "Probe: every run stopped at iteration 1" in probe and "Spearman rho" in probe
    assert json.load(open(tmp_path / "work" / "ranking_probe1.json"))["rows"]["TID"]["seeds"] == 1


def test_rank_methods_on_a_lazyconfig(tiny_batch, tiny_dataset, tmp_path):
    """A user's .py distillation config: each method replaces model.losses, the student alone is
    model.student trained without a teacher, and a rerun trains nothing."""
    teacher = make_teacher_checkpoint("retinanet", str(tmp_path / "teacher.pth"), tiny_batch)
    config = lazy_config_for_tiny_cli(tmp_path / "my_distill.py", teacher)
    work = tmp_path / "work"
    args = ["--config-file", config, "--eval-dataset", "tiny_cli", "--methods", "TID", "BCKD+TID", "--seeds", "1",
            "--work-dir", str(work), "train.max_iter=2", "model.student.test_score_thresh=0.0"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = rank(args, env)
    assert out.count("[rank]") == 3 and "(finished earlier)" not in out
    report = json.load(open(work / "ranking.json"))
    assert set(report["rows"]) == {"baseline", "TID", "BCKD+TID"}
    assert report["teacher_AP"] is not None
    # The student alone is a plain RetinaNet; a method's checkpoint holds that student inside the
    # distillation model.
    keys = {row: set(torch.load(work / f"{row}_seed0" / "model_final.pth", weights_only=False)["model"])
            for row in report["rows"]}
    assert not any(k.startswith("student.") for k in keys["baseline"])
    assert {f"student.{k}" for k in keys["baseline"]} <= keys["TID"]
    assert rank(args, env).count("(finished earlier)") == 3

    out = rank([*args[:-2], "--probe-iters", "1", *args[-2:]], env, returncode=2)
    assert "--probe-iters takes yaml configs only" in out
