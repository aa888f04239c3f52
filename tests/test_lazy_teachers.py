"""Teachers from LazyConfig (.py) files, including detectron2's own model-zoo FCOS and
RetinaNet configs, with weights saved the way the zoo stores them (.pkl) or as .pth."""
import pickle

import pytest
import torch

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from d2_taskdistill import load_config
from d2_taskdistill.modeling import TaskDistillDetector
from d2_taskdistill.modeling.dense_outputs import run_dense_detector
from d2_taskdistill.modeling.teacher import build_teacher, build_teacher_origin, load_teacher_weights
from conftest import config_path, TEST_DEVICE

ZOO = {"fcos": "COCO-Detection/fcos_R_50_FPN_1x.py", "retinanet": "COCO-Detection/retinanet_R_50_FPN_1x.py"}
STUDENTS = {"fcos": "fcos_R101-R50_1x_tid.yaml", "retinanet": "retinanet_R101-R50_1x_tid.yaml"}


def zoo_model(detector):
    """detectron2's model-zoo LazyConfig model with random weights (FrozenBN statistics too)."""
    lazy = LazyConfig.load(model_zoo.get_config_file(ZOO[detector]))  # FCOS's "GN" head: v0.6 builds it with compat
    torch.manual_seed(0)
    model = instantiate(lazy.model).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + (0.5 if name.endswith("var") else 0.0))
    return model


def save_like_the_zoo(model, path):
    """The zoo's .pkl: numpy arrays under "model", with "__author__"."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    return str(path)


def head_outputs(detector, batch):
    out = run_dense_detector(detector, batch)
    return [*out.features, *out.cls_logits, *out.box_reg] + (out.centerness or [])


def distill_cfg_with_lazy_teacher(detector, weights, opts=()):
    return load_config(config_path("COCO-Detection", STUDENTS[detector]), [
        "MODEL.DEVICE", TEST_DEVICE, "DISTILL.TEACHER.CONFIG_FILE", ZOO[detector],
        "DISTILL.TEACHER.WEIGHTS", weights, *opts])


@pytest.fixture(scope="module")
def image_batch(tiny_batch):
    return [{"image": x["image"], "instances": x["instances"]} for x in tiny_batch[:1]]


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
@pytest.mark.parametrize("stored_as", ["pkl", "pth"])
def test_zoo_lazyconfig_teacher_loads_completely_and_computes_the_same(detector, stored_as, image_batch, tmp_path):
    saved = zoo_model(detector)
    if stored_as == "pkl":
        weights = save_like_the_zoo(saved, tmp_path / "model_final.pkl")
    else:
        DetectionCheckpointer(saved, save_dir=str(tmp_path)).save("model_final")
        weights = str(tmp_path / "model_final.pth")
    model = TaskDistillDetector(distill_cfg_with_lazy_teacher(detector, weights))
    teacher = model.teacher
    assert type(teacher) is type(saved) and not teacher.training
    assert teacher.state_dict().keys() == saved.state_dict().keys()
    for k, v in saved.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
    with torch.no_grad():
        for a, b in zip(head_outputs(teacher, image_batch), head_outputs(saved, image_batch)):
            assert torch.equal(a, b)


def test_yaml_fcos_loads_the_zoo_lazyconfig_fcos_checkpoint(image_batch, tmp_path):
    """The project's yaml FCOS (MODEL.META_ARCHITECTURE "FCOS") and the zoo's LazyConfig FCOS
    share parameter names: its checkpoint loads with no missing or unexpected key."""
    saved = zoo_model("fcos")
    weights = save_like_the_zoo(saved, tmp_path / "model_final.pkl")
    cfg = load_config(config_path("COCO-Detection", "fcos_R_101_FPN_1x_teacher.yaml"),
                      ["MODEL.RESNETS.DEPTH", 50, "MODEL.DEVICE", TEST_DEVICE])
    yaml_fcos = build_model(cfg).eval()
    load_teacher_weights(yaml_fcos, weights)  # raises on any missing, unexpected or reshaped key
    with torch.no_grad():
        for a, b in zip(head_outputs(yaml_fcos, image_batch), head_outputs(saved, image_batch)):
            assert torch.equal(a, b)


def test_lazy_teacher_overrides_and_facts(tmp_path):
    cfg = distill_cfg_with_lazy_teacher("retinanet", "unused.pkl", [
        "DISTILL.TEACHER.OPTS", "['model.num_classes=20', 'model.backbone.bottom_up.stages.depth=101']"])
    teacher_origin = build_teacher_origin(cfg)
    assert teacher_origin.is_lazy and teacher_origin.input_format == "BGR"
    assert teacher_origin.train_datasets == ["coco_2017_train"]
    model = teacher_origin.build_model()
    assert model.num_classes == 20 and len(model.backbone.bottom_up.res4) == 23  # R101


def test_lazy_teacher_bad_input_is_named(tmp_path):
    no_model = tmp_path / "no_model.py"
    no_model.write_text("optimizer = dict(lr=0.1)\n")
    not_dense = tmp_path / "not_dense.py"
    not_dense.write_text("import torch\nfrom detectron2.config import LazyCall as L\n"
                         "model = L(torch.nn.Linear)(in_features=2, out_features=2)\n")
    cfg = distill_cfg_with_lazy_teacher("retinanet", "unused.pkl")
    cfg.DISTILL.TEACHER.CONFIG_FILE = str(no_model)
    with pytest.raises(ValueError, match="no_model.py' is a LazyConfig that defines no `model`"):
        build_teacher_origin(cfg)
    cfg.DISTILL.TEACHER.CONFIG_FILE = str(not_dense)
    with pytest.raises(ValueError, match="its `model` is a Linear; the teacher must be one of"):
        build_teacher(cfg)  # builds the model before it looks for the weights
    cfg.DISTILL.TEACHER.CONFIG_FILE = ZOO["retinanet"]
    cfg.DISTILL.TEACHER.OPTS = ["MODEL.RETINANET.NUM_CLASSES", 20]
    with pytest.raises(ValueError, match=r"each override is key=value.*'MODEL.RETINANET.NUM_CLASSES', '20'"):
        build_teacher_origin(cfg)
    cfg.DISTILL.TEACHER.OPTS = ["model.num_classes=[1,"]
    with pytest.raises(ValueError, match="DISTILL.TEACHER.OPTS=.*do not apply to 'COCO-Detection/retinanet"):
        build_teacher_origin(cfg)
    cfg.DISTILL.TEACHER.OPTS = ["model.no_such_argument=3"]  # LazyConfig adds keys; the class refuses it
    with pytest.raises(ValueError, match="with DISTILL.TEACHER.OPTS: its `model` could not be built: .*no_such_argument"):
        build_teacher(cfg)  # builds the model before it looks for the weights


def test_lazy_teacher_class_count_must_match_the_student(tmp_path):
    weights = save_like_the_zoo(zoo_model("retinanet"), tmp_path / "model_final.pkl")
    cfg = distill_cfg_with_lazy_teacher("retinanet", weights, ["MODEL.RETINANET.NUM_CLASSES", 20])
    with pytest.raises(ValueError, match="Teacher has 80 classes, student 20"):
        TaskDistillDetector(cfg)


def test_teacher_from_a_lazyconfig_run_directory(image_batch, tmp_path):
    """A teacher trained by detectron2's lazyconfig_train_net.py leaves a LazyConfig config.yaml
    (LazyConfig.save) and last_checkpoint: DISTILL.TEACHER.RUN and load_teacher(run=) read that
    config as a LazyConfig and load the checkpoint last_checkpoint names."""
    from d2_taskdistill.modeling.teacher import load_teacher

    lazy = LazyConfig.load(model_zoo.get_config_file(ZOO["retinanet"]))
    run = tmp_path / "zoo_retinanet_run"
    run.mkdir()
    LazyConfig.save(lazy, str(run / "config.yaml"))
    trained = zoo_model("retinanet")
    DetectionCheckpointer(trained, save_dir=str(run)).save("model_0000099")  # also writes last_checkpoint

    from_lazy = load_teacher(run=str(run), device=TEST_DEVICE)
    assert from_lazy.teacher_origin.is_lazy and from_lazy.teacher_origin.weights == str(run / "model_0000099.pth")
    cfg = distill_cfg_with_lazy_teacher("retinanet", "", ["DISTILL.TEACHER.CONFIG_FILE", "",
                                                          "DISTILL.TEACHER.RUN", str(run)])
    from_yacs = build_model(cfg).teacher
    trained = trained.to(TEST_DEVICE)
    with torch.no_grad():
        expected = head_outputs(trained, image_batch)
        for teacher in (from_lazy, from_yacs):
            assert teacher.state_dict().keys() == trained.state_dict().keys()
            for got, want in zip(head_outputs(teacher, image_batch), expected):
                assert torch.equal(got, want)


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_resize_zoo_detector_makes_a_small_trainable_detector(detector, image_batch):
    from detectron2.modeling.backbone.resnet import BasicBlock
    from detectron2.utils.events import EventStorage

    from d2_taskdistill.zoo import resize_zoo_detector

    lazy = LazyConfig.load(model_zoo.get_config_file(ZOO[detector]))
    resize_zoo_detector(lazy.model, depth=18, width=64, num_classes=10, head_convs=2)
    torch.manual_seed(0)
    model = instantiate(lazy.model).to(TEST_DEVICE)
    resnet = model.backbone.bottom_up
    assert all(type(b) is BasicBlock for stage in resnet.stages for b in stage)
    assert resnet.res5[-1].out_channels == 512 and type(resnet.stem.conv1.norm) is torch.nn.BatchNorm2d
    assert all(p.requires_grad for p in resnet.parameters())  # nothing frozen: trained from scratch
    assert {s.channels for s in model.backbone.output_shape().values()} == {64}
    assert len(model.head.cls_subnet) == 2 * (3 if detector == "fcos" else 2)  # conv + (GN) + ReLU, twice
    num_anchors = 9 if detector == "retinanet" else 1
    assert model.head.cls_score.out_channels == num_anchors * 10
    model.train()
    with EventStorage():
        losses = model(image_batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0


def test_resize_zoo_detector_resizes_an_fpn_rcnn():
    """The zoo's Mask R-CNN (common/models/mask_rcnn_fpn.py) at R18, 64 channels, 10 classes: the
    RPN head, the box head and predictor, and the mask head follow the width and the classes."""
    from detectron2.modeling.backbone.resnet import BasicBlock

    from d2_taskdistill.zoo import resize_zoo_detector

    lazy = LazyConfig.load(model_zoo.get_config_file("common/models/mask_rcnn_fpn.py"))
    resize_zoo_detector(lazy.model, depth=18, width=64, num_classes=10, box_head_fc=256)
    model = instantiate(lazy.model)
    assert all(type(b) is BasicBlock for stage in model.backbone.bottom_up.stages for b in stage)
    assert {s.channels for s in model.backbone.output_shape().values()} == {64}
    assert model.proposal_generator.rpn_head.conv.in_channels == 64
    box_head = model.roi_heads.box_head
    assert (box_head.fc1.in_features, box_head.fc1.out_features, box_head.fc2.out_features) == (64 * 7 * 7, 256, 256)
    predictor = model.roi_heads.box_predictor
    assert (predictor.cls_score.in_features, predictor.cls_score.out_features) == (256, 11)
    mask_head = model.roi_heads.mask_head
    assert mask_head.mask_fcn1.in_channels == 64 and mask_head.predictor.out_channels == 10
