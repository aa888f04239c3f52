"""Every model config in configs/ builds; distillation configs with a teacher
checkpoint that the test makes from the teacher's own config."""
import glob
import os

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.modeling import build_model

from d2_taskdistill import load_config
from d2_taskdistill.engine import build_evaluator
from d2_taskdistill.modeling import TaskDistillDetector
from d2_taskdistill.modeling.meta_arch import num_classes_of
from d2_taskdistill.modeling.teacher import build_teacher_origin
from conftest import CONFIGS, ROOT, TEST_DEVICE, scratch_dir

MODEL_CONFIGS = sorted(
    os.path.relpath(p, CONFIGS)
    for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


@pytest.fixture(scope="module")
def teacher_checkpoints(tmp_path_factory):
    """Teacher config file -> a checkpoint of that teacher (made once per teacher)."""
    cache = {}

    def get(cfg):
        teacher_origin = build_teacher_origin(cfg)
        key = cfg.DISTILL.TEACHER.CONFIG_FILE
        if key not in cache:
            model = teacher_origin.build_model()
            name = f"teacher{len(cache)}"
            DetectionCheckpointer(model, save_dir=str(root)).save(name)
            cache[key] = str(root / f"{name}.pth")
        return cache[key]

    with scratch_dir(tmp_path_factory, "config_teachers") as root:
        yield get


def test_config_list_covers_all_kinds():
    assert "digits/retinanet_R34-R18_fitnet.yaml" in MODEL_CONFIGS
    assert "COCO-Detection/retinanet_R101-R50_1x_fitnet.yaml" in MODEL_CONFIGS
    assert "PascalVOC-Detection/fcos_R101-R50_fitnet.yaml" in MODEL_CONFIGS


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_config_builds(config, teacher_checkpoints, monkeypatch):
    monkeypatch.chdir(ROOT)  # teacher config paths are relative to the project root
    cfg = load_config(os.path.join(CONFIGS, config), ["MODEL.DEVICE", TEST_DEVICE])
    if cfg.MODEL.META_ARCHITECTURE == "TaskDistillDetector":
        cfg.DISTILL.TEACHER.WEIGHTS = teacher_checkpoints(cfg)
    with torch.no_grad():
        model = build_model(cfg)
    if isinstance(model, TaskDistillDetector):
        assert type(model.student).__name__ == cfg.DISTILL.STUDENT_ARCHITECTURE
        assert num_classes_of(model.teacher) == num_classes_of(model.student)
        assert list(model.distill_losses) == list(cfg.DISTILL.LOSSES)
    else:
        assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE


def test_evaluator_follows_dataset_type(tmp_path, tiny_dataset):
    DatasetCatalog.get(tiny_dataset)  # writes its COCO json, as the test loader does first
    cfg = load_config(os.path.join(CONFIGS, "digits/retinanet_R18_FPN_student.yaml"), ["OUTPUT_DIR", str(tmp_path)])
    assert isinstance(build_evaluator(cfg, tiny_dataset), COCOEvaluator)
    MetadataCatalog.get("voc_like_test").set(evaluator_type="pascal_voc", dirname=str(tmp_path),
                                             split="test", year=2007, thing_classes=["a"])
    assert isinstance(build_evaluator(cfg, "voc_like_test"), PascalVOCDetectionEvaluator)
    MetadataCatalog.get("no_type_test").set(thing_classes=["a"])
    with pytest.raises(ValueError, match="'no_type_test' .* evaluator_type=None"):
        build_evaluator(cfg, "no_type_test")
