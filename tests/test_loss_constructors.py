"""Every distillation loss builds from yacs (``Cls(cfg, s, t)``) and from keywords
(``Cls(student_shapes=s, teacher_shapes=t, ...)``, as a LazyConfig does) into the same module."""
import inspect
import logging
import os
from types import SimpleNamespace

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes, Instances

from d2_taskdistill import add_taskdistill_config, load_config
from d2_taskdistill.config import YACS_SETTING_NAMES
from d2_taskdistill.lazy_engine import LAZY_SETTING_NAMES
from d2_taskdistill.losses import CWD, FGD, FGFI, FITNET, PKD, TBD, TID, DISTILL_LOSS_REGISTRY, DistillLoss
from d2_taskdistill.losses.registry import check_choices
from d2_taskdistill.settings import using_setting_names
from conftest import config_path, project_losses

LOSSES = project_losses()
# Unequal widths, so that the losses with optional adapters build them too.
STUDENT = [ShapeSpec(channels=4, stride=2 ** i) for i in range(3, 8)]
TEACHER = [ShapeSpec(channels=6, stride=2 ** i) for i in range(3, 8)]


def digits_cfg(name, **overrides):
    """The digits RetinaNet config of loss ``name`` (as the loss tests use), with ``overrides``
    of its DISTILL.<name> keys."""
    path = config_path("digits", f"retinanet_R34-R18_{name.lower()}.yaml")
    if not os.path.exists(path):  # a two-stage-only loss
        path = config_path("digits", f"faster_rcnn_R34-R18_{name.lower()}.yaml")
    cfg = load_config(path)
    for key, value in overrides.items():
        setattr(cfg.DISTILL[name], key, value)
    return cfg


def node_kwargs(cfg, name):
    """The keyword spelling of DISTILL.<name>, written out here rather than taken from from_config."""
    return {("global_" if key == "GLOBAL" else key.lower()): value for key, value in cfg.DISTILL[name].items()}


def both_ways(cls, cfg, student_shapes=STUDENT, teacher_shapes=TEACHER):
    torch.manual_seed(0)
    from_yacs = cls(cfg, student_shapes, teacher_shapes)
    torch.manual_seed(0)
    from_kwargs = cls(student_shapes=student_shapes, teacher_shapes=teacher_shapes,
                      **node_kwargs(cfg, cls.config_node))
    return from_yacs, from_kwargs


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_every_loss_is_a_distill_loss_with_its_node():
    cfg = get_cfg()
    add_taskdistill_config(cfg)
    for name in LOSSES:
        cls = DISTILL_LOSS_REGISTRY.get(name)
        assert issubclass(cls, DistillLoss) and cls.config_node == name
        assert name in cfg.DISTILL


@pytest.mark.parametrize("name", LOSSES)
def test_keywords_and_defaults_match_the_yacs_node(name):
    cfg = get_cfg()
    add_taskdistill_config(cfg)
    params = inspect.signature(DISTILL_LOSS_REGISTRY.get(name).__init__).parameters
    keywords = {k: p for k, p in params.items() if k not in ("self", "student_shapes", "teacher_shapes")}
    assert all(p.kind is p.KEYWORD_ONLY for k, p in params.items() if k != "self")
    defaults = node_kwargs(cfg, name)
    assert set(keywords) == set(defaults)
    for key, value in defaults.items():
        default = keywords[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key


# Defaults, plus the settings that add or drop parameters.
VARIANTS = [(name, {}) for name in LOSSES] + [
    ("TBD", {"BALANCE": "learned"}),
    ("TBD", {"COMPONENTS": "hd"}),
    ("FGD", {"NUM_LEVELS": 2}),
    ("FGD", {"GLOBAL": False}),
    ("TID", {"REG_SCORES": [3.0, 2.0, 0.5], "AREAS": "key"}),
]


@pytest.mark.parametrize("name,overrides", VARIANTS)
@pytest.mark.parametrize("equal_widths", [False, True])
def test_yacs_and_keywords_build_the_same_module(name, overrides, equal_widths):
    cls = DISTILL_LOSS_REGISTRY.get(name)
    cfg = digits_cfg(name, **overrides)
    from_yacs, from_kwargs = both_ways(cls, cfg, STUDENT, TEACHER if not equal_widths else STUDENT)
    assert_same_state(from_yacs, from_kwargs)
    assert [n for n, _ in from_yacs.named_modules()] == [n for n, _ in from_kwargs.named_modules()]
    public = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
    assert repr(public(from_yacs)) == repr(public(from_kwargs))


def feature_outputs(channels, seed, boxes=((0.0, 0.0, 40.0, 24.0),)):
    """What the feature losses read of DenseOutputs: 5 levels of a 64 x 64 image, one GT box."""
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, channels, 64 // s, 64 // s, generator=generator) for s in (8, 16, 32, 64, 128)]
    features[-1] = torch.randn(2, channels, 1, 1, generator=generator)
    gt = Instances((64, 64))
    gt.gt_boxes = Boxes(torch.tensor(boxes))
    gt.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    return SimpleNamespace(features=features, gt_instances=[gt, gt], feature_strides=[8, 16, 32, 64, 128])


def assert_same_losses(a, b):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("cls", [FITNET, FGD, PKD, CWD])
def test_yacs_and_keywords_give_the_same_feature_losses(cls):
    from_yacs, from_kwargs = both_ways(cls, digits_cfg(cls.config_node))
    student, teacher = feature_outputs(4, seed=1), feature_outputs(6, seed=2)
    assert_same_losses(from_yacs(student, teacher), from_kwargs(student, teacher))


def test_yacs_and_keywords_give_the_same_tid_loss():
    from test_tid import toy_pair  # TID's toy outputs: 2 channels on 2 levels

    shapes = [ShapeSpec(channels=2)] * 2
    from_yacs, from_kwargs = both_ways(TID, digits_cfg("TID", CLS_TOP_FRACTION=0.2, KEY_FRACTION=0.2), shapes, shapes)
    student, teacher = toy_pair()
    a, b = from_yacs(student, teacher), from_kwargs(student, teacher)
    assert_same_losses(a, b)
    assert a["loss_distill_tid"] > 0


@pytest.mark.parametrize("cls,kwargs,message", [
    (TID, {"importance": "x"}, r"^TID\(importance='x'\); choose one of \('both', 'cls', 'reg'\)"),
    (TID, {"areas": "all"}, r"^TID\(areas='all'\); choose one of"),
    (TBD, {"balance": "auto"}, r"^TBD\(balance='auto'\); choose one of"),
    (PKD, {"normalize_over": "nhw"}, r"^PKD\(normalize_over='nhw'\); choose one of"),
    (CWD, {"normalize": "pixel"}, r"^CWD\(normalize='pixel'\); choose one of \('channel', 'spatial'\)"),
    (CWD, {"tau": 0.0}, r"^CWD\(tau=0.0\); must be positive"),
    (FGD, {"temperature": -1.0}, r"^FGD\(temperature=-1.0\); must be positive"),
    (FGD, {"num_levels": -1}, r"^FGD\(num_levels=-1\); choose 0"),
    (PKD, {"num_levels": -2}, r"^PKD\(num_levels=-2\); choose 0"),
])
def test_invalid_keywords_are_named(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(student_shapes=STUDENT, teacher_shapes=TEACHER, **kwargs)


@pytest.mark.parametrize("names,expected", [
    (YACS_SETTING_NAMES, r"^DISTILL.TID.AREAS='all'; choose one of"),
    (LAZY_SETTING_NAMES, r"^model.losses.TID.areas='all'; choose one of"),
])
def test_invalid_settings_are_named_as_the_config_system_writes_them(names, expected):
    with using_setting_names(names), pytest.raises(ValueError, match=expected):
        TID(student_shapes=STUDENT, teacher_shapes=TEACHER, areas="all")
    with using_setting_names(names), pytest.raises(ValueError, match=r"^(DISTILL\.FGD\.GLOBAL|model\.losses\.FGD\.global_)"):
        check_choices("FGD", global_=("x", (True, False)))


def test_from_config_reads_the_node_and_keywords_override_it():
    cfg = digits_cfg("TID", WEIGHT=2.5, REG_SCORES=[3.0, 2.0, 1.0])
    tid = TID(cfg, STUDENT, TEACHER)
    assert tid.weight == 2.5 and tid.reg_values == (3.0, 2.0, 1.0)
    assert TID.from_config(cfg, STUDENT, TEACHER)["weight"] == 2.5
    assert TID(cfg, STUDENT, TEACHER, weight=4.0).weight == 4.0  # detectron2's extra overwrite
    fgd = FGD(digits_cfg("FGD", GLOBAL=False, NUM_LEVELS=3), STUDENT, TEACHER)
    assert not fgd.use_global and fgd.num_levels == 3
    # Keywords alone take the yacs defaults.
    assert TID(student_shapes=STUDENT, teacher_shapes=TEACHER).reg_values == (2.0, 1.5, 0.4)


class TinyBackbone(Backbone):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=1, stride=8)

    def forward(self, x):
        return {"p3": self.conv(x)}

    def output_shape(self):
        return {"p3": ShapeSpec(channels=4, stride=8)}


def test_fgfi_warns_for_an_fcos_student(caplog):
    fcos = FCOS(backbone=TinyBackbone(), head=FCOSHead(input_shape=[ShapeSpec(channels=4, stride=8)], conv_dims=[4],
                                                        num_classes=2),
                head_in_features=["p3"], num_classes=2, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
    fgfi = FGFI(student_shapes=STUDENT, teacher_shapes=TEACHER)
    logger = logging.getLogger("d2_taskdistill.losses.fgfi")
    logger.addHandler(caplog.handler)  # detectron2's logger setup may stop propagation to the root
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            fgfi.check_detectors(torch.nn.Module(), fcos)  # an FCOS teacher is no concern
            assert not any("FGFI on FCOS" in r.getMessage() for r in caplog.records)
            fgfi.check_detectors(fcos, fcos)
    finally:
        logger.removeHandler(caplog.handler)
    assert any(r.levelno == logging.WARNING and "FGFI on FCOS" in r.getMessage() for r in caplog.records)
