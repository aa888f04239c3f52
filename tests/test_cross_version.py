"""Checkpoints cross between detectron2 v0.6 and upstream main, both ways: a run
written by one resumes (--resume) and evaluates (--eval-only) on the other.

Needs both environments: ``make test-upstream`` passes the other one's Python in
D2_TASKDISTILL_OTHER_PYTHON (it builds .venv first); without it, conftest.py does not
collect this file.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_launch import cli_opts, finish

OTHER_PYTHON = os.environ["D2_TASKDISTILL_OTHER_PYTHON"]


def _train_net(python, args, log):
    cmd = [python, os.path.join(ROOT, "train_net.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return finish(proc, log)


def _has_cpp_ops(python):
    probe = "import d2_taskdistill; from d2_taskdistill import compat; print(compat.HAS_CPP_OPS)"
    return subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()[-1]


@pytest.mark.parametrize("direction", ["this_to_other", "other_to_this"])
def test_checkpoint_resumes_and_evaluates_on_the_other_version(direction, teachers, tiny_dataset, tmp_path):  # noqa: F811
    writer, reader = (sys.executable, OTHER_PYTHON)
    if direction == "other_to_this":
        writer, reader = reader, writer
    assert _has_cpp_ops(writer) != _has_cpp_ops(reader), "both Pythons have the same detectron2"
    out = tmp_path / "run"
    teacher = teachers["retinanet"]
    _train_net(writer, cli_opts(teacher, out, 3), tmp_path / "write.log")
    written = torch.load(out / "model_final.pth", weights_only=False)

    text = _train_net(reader, ["--resume", *cli_opts(teacher, out, 5)], tmp_path / "resume.log")
    assert "Starting training from iteration 3" in text
    resumed = torch.load(out / "model_final.pth", weights_only=False)
    assert resumed["iteration"] == 4
    # The optimizer state crossed too (AdamW moments), not only the weights.
    assert len(written["trainer"]["_trainer"]["optimizer"]["state"]) > 0
    assert len(resumed["trainer"]["_trainer"]["optimizer"]["state"]) == len(written["trainer"]["_trainer"]["optimizer"]["state"])

    text = _train_net(reader, ["--eval-only", *cli_opts(teacher, out, 5), "MODEL.WEIGHTS",
                               str(out / "model_0000001.pth")], tmp_path / "eval.log")
    assert "copypaste: AP,AP50" in text
    assert "Some model parameters or buffers are not found" not in text
