"""tools/rank_methods.py: methods ranked on a user's own data, resumable."""
import json
import os
import subprocess
import sys

import torch

from conftest import (ROOT, SMALL_TEACHER_OPTS, TINY_ROOT_ENV, lazy_config_for_tiny_cli,
                      subprocess_env, tiny_run_opts)


def rank(args, env, returncode=0):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "rank_methods.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def table_cells(markdown):
    """The rows of the markdown table in ``markdown``, each a list of its stripped cells."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]


def test_rank_methods_on_own_data_ranks_resumes_and_probes(teachers, tiny_dataset, tmp_path):
    teacher = teachers["retinanet"]
    root = os.environ[TINY_ROOT_ENV]
    declared = [("my_set", os.path.join(root, "train.json"), os.path.join(root, "train"))]
    opts = [*tiny_run_opts(tmp_path / "unused", 2, device="cpu"), "DATASETS.COCO", str(declared),
            "DATASETS.TRAIN", "('my_set',)", "DISTILL.TEACHER.WEIGHTS", teacher,
            "DISTILL.TEACHER.OPTS", str(SMALL_TEACHER_OPTS), "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    args = ["--config-file", "configs/digits/retinanet_R34-R18_tid.yaml", "--eval-dataset", "my_set",
            "--methods", "TID", "--seeds", "2", "--work-dir", str(tmp_path / "work"), *map(str, opts)]
    env = subprocess_env()
    out = rank(args, env)
    assert out.count("(finished earlier)") == 0 and out.count("[rank]") == 4
    report = json.load(open(tmp_path / "work" / "ranking.json"))
    rows = report["rows"]
    assert set(rows) == {"baseline", "TID"} and all(r["seeds"] == 2 for r in rows.values())
    means = [r["mean"]["AP"] for r in rows.values()]
    assert means == sorted(means, reverse=True)  # ranked, best first
    for r in rows.values():
        assert abs(r["mean"]["AP"] - sum(r["AP_per_seed"]) / 2) < 1e-9
    assert report["teacher_AP"] is not None  # evaluated once, with the first method's first seed
    header, _, *ranked = table_cells(open(tmp_path / "work" / "ranking.md").read())
    assert "gap closed" in header and [r[0] for r in ranked] == ["1", "2"]
    assert "student alone" in [r[1] for r in ranked]

    # Run again: nothing is trained, the same table comes back.
    again = rank(args, env)
    assert again.count("(finished earlier)") == 4
    assert json.load(open(tmp_path / "work" / "ranking.json"))["rows"] == rows

    probe = rank([*args[:-len(opts)], "--seeds", "1", "--probe-iters", "1", *map(str, opts)], env)
    assert "Probe: every run stopped at iteration 1" in probe and "Spearman rho" in probe
    assert json.load(open(tmp_path / "work" / "ranking_probe1.json"))["rows"]["TID"]["seeds"] == 1


def test_rank_methods_on_a_lazyconfig(teachers, tiny_dataset, tmp_path):
    """A user's .py distillation config: each method replaces model.losses, the student alone is
    model.student trained without a teacher, and a rerun trains nothing."""
    teacher = teachers["retinanet"]
    config = lazy_config_for_tiny_cli(tmp_path / "my_distill.py", teacher)
    work = tmp_path / "work"
    args = ["--config-file", config, "--eval-dataset", "tiny_cli", "--methods", "BCKD+TID", "--seeds", "1",
            "--work-dir", str(work), "train.max_iter=2", "model.student.test_score_thresh=0.0"]
    env = subprocess_env()
    out = rank(args, env)
    assert out.count("[rank]") == 2 and "(finished earlier)" not in out
    report = json.load(open(work / "ranking.json"))
    assert set(report["rows"]) == {"baseline", "BCKD+TID"}
    assert report["teacher_AP"] is not None
    # The student alone is a plain RetinaNet; a method's checkpoint holds that student inside the
    # distillation model.
    keys = {row: set(torch.load(work / f"{row}_seed0" / "model_final.pth", weights_only=False)["model"])
            for row in report["rows"]}
    assert not any(k.startswith("student.") for k in keys["baseline"])
    assert {f"student.{k}" for k in keys["baseline"]} <= keys["BCKD+TID"]
    assert rank(args, env).count("(finished earlier)") == 2

    out = rank([*args[:-2], "--probe-iters", "1", *args[-2:]], env, returncode=2)
    assert "--probe-iters takes yaml configs only" in out


def test_rank_methods_refuses_methods_that_cannot_cross_the_pair_before_training(teachers, tmp_path):
    """An FCOS teacher for a RetinaNet student: methods that need the same anchor layout are named,
    with the feature-only losses to use instead, before any run trains."""
    teacher = teachers["fcos"]
    work = tmp_path / "work"
    args = ["--config-file", "configs/digits/retinanet_R34-R18_pkd.yaml", "--eval-dataset", "digits_det_val",
            "--methods", "PKD", "TID", "BCKD+TID", "--seeds", "1", "--work-dir", str(work),
            "MODEL.DEVICE", "cpu", "DISTILL.TEACHER.CONFIG_FILE", "configs/digits/fcos_R34_FPN_teacher.yaml",
            "DISTILL.TEACHER.WEIGHTS", teacher, "DISTILL.TEACHER.OPTS", str(SMALL_TEACHER_OPTS)]
    out = rank(args, subprocess_env(), returncode=2)
    assert "this command trained nothing" in out
    refused = [line.split(":")[0].strip() for line in out.splitlines() if "differ in anchors per location" in line]
    assert refused == ["TID", "BCKD+TID"]  # PKD compares features only: it crosses the pair
    assert "student RetinaNet, teacher FCOS" in out and "'CWD', 'FGD', 'FGFI', 'FITNET', 'PKD'" in out
    assert not any(p.name.endswith("_seed0") for p in work.iterdir())


def test_rank_methods_on_a_pascal_voc_split(teachers, tmp_path):
    """A VOC split is scored with AP, AP50 and AP75 only (detectron2's VOC evaluator): the table
    has those columns."""
    from d2_taskdistill.data import CLASS_NAMES, generate_split, write_voc_split

    generate_split(str(tmp_path / "data"), "train", num_images=8, image_size=128, seed=5)
    voc_dir = write_voc_split(str(tmp_path / "data"), "train")
    teacher = teachers["retinanet"]
    work = tmp_path / "work"
    opts = [*tiny_run_opts(tmp_path / "unused", 2, device="cpu"),
            "DATASETS.VOC", str([("my_voc", voc_dir, "train", 2007, CLASS_NAMES)]), "DATASETS.TRAIN", "('my_voc',)",
            "DISTILL.TEACHER.WEIGHTS", teacher, "DISTILL.TEACHER.OPTS", str(SMALL_TEACHER_OPTS),
            "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    args = ["--config-file", "configs/digits/retinanet_R34-R18_fitnet.yaml", "--eval-dataset", "my_voc",
            "--methods", "FITNET", "--seeds", "1", "--work-dir", str(work), *map(str, opts)]
    out = rank(args, subprocess_env())
    assert out.count("[rank]") == 2
    rows = json.load(open(work / "ranking.json"))["rows"]
    assert set(rows) == {"baseline", "FITNET"}
    assert all(set(r["mean"]) == {"AP", "AP50", "AP75"} for r in rows.values())
    header = table_cells(open(work / "ranking.md").read())[0]
    assert header[:7] == ["rank", "method", "seeds", "AP", "AP50", "AP75", "gain (AP)"]
