"""Checkpoints cross between detectron2 v0.6 and upstream main, both ways: a run
written by one resumes (--resume) and evaluates (--eval-only) on the other.

Needs both environments: ``make test-upstream`` passes the other one's Python in
D2_TASKDISTILL_OTHER_PYTHON (it builds .venv first); without it, conftest.py does not
collect this file.
"""
import functools
import json
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


@functools.lru_cache(maxsize=None)
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


EXPORT_WRITER = """
import json, sys, torch
import d2_taskdistill
from detectron2.config import instantiate
from detectron2.utils.env import seed_all_rng
from d2_taskdistill.export import export_lazy_student
from d2_taskdistill.lazy_engine import load_lazy_config
out, teacher_overrides, pairs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for name, (config, teacher) in pairs.items():
    cfg = load_lazy_config(config, ["model.teacher.weights=" + teacher, "model.student.test_score_thresh=0.0",
                                    "train.device=cpu"])
    cfg.model.teacher.overrides = teacher_overrides
    seed_all_rng(0)
    model = instantiate(cfg.model).eval()
    torch.save({"model": model.state_dict()}, f"{out}/{name}.pth")
    export_lazy_student(cfg, f"{out}/{name}.pth", f"{out}/{name}")
"""

# Plain detectron2: with "plain", the project cannot be imported (the Pillow shim is what v0.6
# needs with today's Pillow).
EXPORT_READER = """
import json, sys, torch
if sys.argv[2] == "plain":
    sys.modules["d2_taskdistill"] = None
else:
    import d2_taskdistill
import PIL.Image
PIL.Image.LINEAR = getattr(PIL.Image, "LINEAR", PIL.Image.BILINEAR)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
out = sys.argv[1]
image = torch.load(out + "/image.pt")
detections = {}
for name in json.loads(sys.argv[3]):
    cfg = LazyConfig.load(f"{out}/{name}/config.yaml")
    model = instantiate(cfg.model).eval()
    DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    detections[name] = {"boxes": instances.pred_boxes.tensor, "scores": instances.scores}
torch.save(detections, out + "/read.pt")
"""


def test_a_lazy_export_loads_on_both_versions_without_the_project(teachers, tmp_path):
    """Exports written by each version (RetinaNet and FCOS, with its GroupNorm head) load on both and
    detect the same; upstream detectron2 loads them without the project."""
    from conftest import SMALL_TEACHER_OPTS, config_path

    torch.manual_seed(0)
    torch.save((torch.rand(3, 128, 160) * 255).round(), tmp_path / "image.pt")
    pairs = {"retinanet": (config_path("digits", "retinanet_R34-R18_tid.py"), teachers["retinanet"]),
             "fcos": (config_path("digits", "fcos_R34-R18_bckd.py"), teachers["fcos"])}
    for writer in (sys.executable, OTHER_PYTHON):
        proc = subprocess.run([writer, "-c", EXPORT_WRITER, str(tmp_path), json.dumps(SMALL_TEACHER_OPTS),
                               json.dumps(pairs)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for name in pairs:
            text = (tmp_path / name / "config.yaml").read_text()
            # ShapeSpecs as calls and classes by their defining module, which both versions build;
            # detectron2's names only ("GN" for the FCOS head's GroupNorm).
            assert "!!python" not in text and "d2_taskdistill" not in text, text
        detections = []
        for reader in (sys.executable, OTHER_PYTHON):
            # The registry's v0.6 has no C++ ops: detectron2 itself imports only with the project's stand-ins
            # (and v0.6's heads build "GN" only with the project's fix).
            without_project = _has_cpp_ops(reader) == "True"
            proc = subprocess.run([reader, "-c", EXPORT_READER, str(tmp_path), "plain" if without_project else "project",
                                   json.dumps(list(pairs))], capture_output=True, text=True, cwd=ROOT)
            assert proc.returncode == 0, proc.stderr[-3000:]
            detections.append(torch.load(tmp_path / "read.pt"))
        assert all(len(d["scores"]) > 0 for d in detections[0].values())
        torch.testing.assert_close(detections[0], detections[1])
