"""Training features as hooks: the teacher evaluated on its own input format; a distilled
run evaluated (--eval-only) without the teacher's checkpoint."""
import os

import torch

from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

from d2_taskdistill.engine import DistillTrainer
from d2_taskdistill.hooks import TeacherOnItsInputs
from conftest import distill_cfg, load_train_net, make_teacher_checkpoint


def test_teacher_is_evaluated_on_its_own_input_format(teachers, tiny_batch, tiny_dataset, tmp_path):
    teacher = teachers["retinanet"]
    cfg = distill_cfg("retinanet_R34-R18_tid.yaml", teacher, tmp_path, teacher_opts=["INPUT.FORMAT", "RGB"],
                      opts=["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0])
    cfg.DISTILL.TEACHER.OPTS += ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0]
    model = build_model(cfg).eval()
    assert model.teacher_needs_bgr_flip
    images = [{"image": x["image"]} for x in tiny_batch[:2]]
    with torch.no_grad():
        evaluated = TeacherOnItsInputs(model)(images)
        on_rgb = model.teacher([{"image": x["image"].flip(0)} for x in images])
        on_bgr = model.teacher(images)
    for a, b, c in zip(evaluated, on_rgb, on_bgr):
        assert len(a["instances"]) > 0
        assert torch.equal(a["instances"].scores, b["instances"].scores)
        assert not torch.equal(a["instances"].scores, c["instances"].scores)  # the student's channel order


def test_eval_only_of_a_distilled_run_needs_no_teacher_checkpoint(tiny_batch, tiny_dataset, tmp_path):
    teacher = make_teacher_checkpoint("retinanet", str(tmp_path / "teacher" / "model_final.pth"), tiny_batch)
    cfg = distill_cfg("retinanet_R34-R18_tid.yaml", teacher, tmp_path / "run", max_iter=2,
                      opts=["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0])
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    trained_ap = trainer.last_eval_results["bbox"]["AP"]
    os.remove(teacher)
    config_file = str(tmp_path / "run" / "config.yaml")
    with open(config_file, "w") as f:
        f.write(cfg.dump())
    saved = open(config_file).read()
    # Evaluated in the run's own folder: its config.yaml stays the one it trained with.
    args = default_argument_parser().parse_args(
        ["--config-file", config_file, "--eval-only", "MODEL.WEIGHTS", str(tmp_path / "run" / "model_final.pth")])
    results = load_train_net().main(args)
    assert results["bbox"]["AP"] == trained_ap
    assert open(config_file).read() == saved
