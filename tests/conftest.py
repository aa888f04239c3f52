import contextlib
import math
import os
import re
import shutil
import sys

import pytest
import torch

import d2_taskdistill  # noqa: F401  (applies compat, registers everything)
from d2_taskdistill.data import generate_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# The benchmark harness lives beside the tools that use it (tools/harness), not in the library.
sys.path.insert(0, os.path.join(ROOT, "tools"))

# Two threads per test process; the GPU check's parallel suite gives each worker its share of the cores.
torch.set_num_threads(int(os.environ.get("D2_TASKDISTILL_TEST_THREADS", "2")))

# Where the tests build their models: "cpu", or "cuda" for the GPU check (tools/gpu_check.py).
# Tests about CPU paths (gloo workers, bfloat16 autocast) pass device="cpu" themselves.
TEST_DEVICE = os.environ.get("D2_TASKDISTILL_TEST_DEVICE", "cpu")

# Checkpoints crossing detectron2 versions need the other version's venv (make test-upstream).
collect_ignore = [] if os.environ.get("D2_TASKDISTILL_OTHER_PYTHON") else ["test_cross_version.py"]


def subprocess_env(**extra):
    """The environment for a process a test starts: the project first on PYTHONPATH, whatever was
    there kept (the GPU check puts the bundle's scratch folder there; replacing it loses detectron2)."""
    path = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, PYTHONPATH=path, **extra)


def load_train_net():
    """train_net.py as a module, for tests that call its functions in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net_under_test", os.path.join(ROOT, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_path(*parts):
    return os.path.join(CONFIGS, *parts)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """A small generated digits split: (json path, image dir)."""
    root = str(tmp_path_factory.mktemp("digits"))
    json_path = generate_split(root, "train", num_images=8, image_size=128, seed=3)
    return json_path, os.path.join(root, "train")


@pytest.fixture(scope="session")
def tiny_batch(tiny_digits):
    """Four mapped training inputs (detectron2's DatasetMapper) from the tiny split."""
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json
    import detectron2.data.transforms as T

    json_path, image_root = tiny_digits
    dicts = load_coco_json(json_path, image_root, "digits_tiny_batch")  # maps ids 1..10 to 0..9
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(128, 128)],
                           image_format="BGR")
    return [mapper(d) for d in dicts[:4]]


# Every method of the digits configs (configs/digits/<detector>_R34-R18_<method>.yaml).
METHODS = ["fitnet", "fgfi", "tid", "tbd", "bckd", "bckd_tid", "fgd", "pkd", "cwd"]


def project_losses(dense=False):
    """The project's registered losses, sorted (tests register losses of their own too); ``dense``:
    those that run on RetinaNet and FCOS (not the two-stage-only ones)."""
    from d2_taskdistill.losses import DISTILL_LOSS_REGISTRY

    return sorted(name for name, cls in DISTILL_LOSS_REGISTRY if cls.__module__.startswith("d2_taskdistill.")
                  and not (dense and getattr(cls, "two_stage_only", False)))


def every_loss_cfg(detector, teacher_weights, output_dir, opts=(), **kwargs):
    """The digits config of ``detector`` with every project loss in one model: one forward
    covers them all."""
    return distill_cfg(f"{detector}_R34-R18_tid.yaml", teacher_weights, output_dir,
                       opts=["DISTILL.LOSSES", project_losses(dense=True), *opts], **kwargs)

TINY_TRAIN = "digits_tiny_train"
# Where the session's tiny dataset lives, for processes the tests start (launch workers).
TINY_ROOT_ENV = "D2_TASKDISTILL_TEST_TINY_ROOT"


def register_tiny_dataset(root):
    """Register the 8-image, 128 px COCO-format training set under ``root`` (generated once)."""
    from detectron2.data import DatasetCatalog
    from d2_taskdistill.data import register_digits_coco

    if TINY_TRAIN not in DatasetCatalog.list():
        register_digits_coco(TINY_TRAIN, root, "train", 8, image_size=128, seed=5)
    return TINY_TRAIN


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The registered tiny dataset, its files generated; workers find it via TINY_ROOT_ENV."""
    from detectron2.data import DatasetCatalog

    root = os.environ.get(TINY_ROOT_ENV) or str(tmp_path_factory.mktemp("digits_tiny"))
    os.environ[TINY_ROOT_ENV] = root
    register_tiny_dataset(root)
    DatasetCatalog.get(TINY_TRAIN)  # generate now, not in two workers at once
    return TINY_TRAIN


def tiny_run_opts(output_dir, max_iter=3, device=None):
    """Overrides that make any digits config train a few 128 px iterations on the tiny set."""
    return [
        "MODEL.DEVICE", device or TEST_DEVICE,
        "DATASETS.TRAIN", f"('{TINY_TRAIN}',)", "DATASETS.TEST", f"('{TINY_TRAIN}',)",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "2",
        "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(output_dir),
    ]


# A teacher unlike the student (ResNet-34, 96 FPN channels, 3 head convs) and small enough for tests.
SMALL_TEACHER_OPTS = ["MODEL.RESNETS.DEPTH", 34, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
                      "MODEL.FPN.OUT_CHANNELS", 96]


@contextlib.contextmanager
def scratch_dir(tmp_path_factory, name):
    """A new temp dir ``name`` for a module fixture, removed when the fixture ends: checkpoints
    take 90-230 MB each, and pytest would keep every fixture's until the end of the session."""
    root = tmp_path_factory.mktemp(name)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def teachers_in(tmp_path_factory, batches, name):
    """One small teacher checkpoint per detector (RetinaNet, FCOS) in a scratch dir ``name``."""
    with scratch_dir(tmp_path_factory, name) as root:
        yield {d: make_teacher_checkpoint(d, str(root / f"{d}.pth"), batches) for d in ("retinanet", "fcos")}


@pytest.fixture(scope="session")
def teachers(tmp_path_factory, tiny_batch):
    """The small teacher checkpoints of both detectors, {detector: path}: made once per test
    process and shared (the tests read them, none writes them)."""
    with teachers_in(tmp_path_factory, tiny_batch, "teachers") as paths:
        yield paths


@pytest.fixture(scope="session")
def rcnn_teacher(tmp_path_factory, tiny_batch):
    """A small Faster R-CNN teacher checkpoint, as ``teachers`` (made on first use only)."""
    with scratch_dir(tmp_path_factory, "rcnn_teacher") as root:
        yield make_teacher_checkpoint("faster_rcnn", str(root / "faster_rcnn.pth"), tiny_batch)


@pytest.fixture(scope="session")
def mask_rcnn_teacher(tmp_path_factory, tiny_batch):
    """A small Mask R-CNN teacher checkpoint, as ``rcnn_teacher``."""
    with scratch_dir(tmp_path_factory, "mask_rcnn_teacher") as root:
        yield make_teacher_checkpoint("mask_rcnn", str(root / "mask_rcnn.pth"), tiny_batch)


def make_teacher_checkpoint(detector, path, batches, opts=()):
    """Build the digits teacher of ``detector`` with SMALL_TEACHER_OPTS and save it.

    Weights are random; BatchNorm statistics are calibrated on ``batches`` so that
    features have the scale of a trained network's. Built on the CPU whatever TEST_DEVICE:
    a file that loads anywhere, as a user's checkpoint does.
    """

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from d2_taskdistill import load_config

    cfg = load_config(config_path("digits", f"{detector}_R34_FPN_teacher.yaml"),
                      ["MODEL.DEVICE", "cpu", *SMALL_TEACHER_OPTS, *opts])
    torch.manual_seed(1)
    model = build_model(cfg).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for _ in range(2):
            model.backbone(model.preprocess_image(batches).tensor)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.basename(path)[:-4])
    return path


def distill_cfg(config_file, teacher_weights, output_dir, opts=(), teacher_opts=(), max_iter=3, device=None):
    from d2_taskdistill import load_config

    return load_config(
        config_path("digits", config_file),
        [*tiny_run_opts(output_dir, max_iter, device),
         "DISTILL.TEACHER.WEIGHTS", teacher_weights,
         "DISTILL.TEACHER.OPTS", [*SMALL_TEACHER_OPTS, *teacher_opts],
         "DISTILL.TEACHER.EVAL_AT_START", False, *opts],
    )


def lazy_cfg(config_file, teacher_weights, output_dir, max_iter=2, overrides=()):
    """The .py twin of conftest.distill_cfg: the tiny dataset, batch 2, a constant lr."""
    from d2_taskdistill.lazy_engine import load_lazy_config

    cfg = load_lazy_config(config_path("digits", config_file), [
        f"train.device={TEST_DEVICE}", f"train.output_dir={output_dir}", f"train.max_iter={max_iter}",
        "train.checkpointer.period=2", "train.teacher_eval_at_start=False", "dataloader.train.total_batch_size=2",
        f"dataloader.train.dataset.names=['{TINY_TRAIN}']", f"dataloader.test.dataset.names=['{TINY_TRAIN}']",
        f"dataloader.evaluator.dataset_name={TINY_TRAIN}", "lr_multiplier.warmup_length=0",
        "lr_multiplier.scheduler.values=[1.0]", "lr_multiplier.scheduler.milestones=[]",
        f"lr_multiplier.scheduler.num_updates={max_iter}", *overrides])
    cfg.model.teacher.weights = teacher_weights
    cfg.model.teacher.overrides = list(SMALL_TEACHER_OPTS)
    return cfg


def detections(model, batch):
    """``model``'s detections (eval mode) on the images of ``batch``: a dict of fields per image."""
    model.eval()
    with torch.no_grad():
        return [x["instances"].get_fields() for x in model([{"image": b["image"]} for b in batch])]


def assert_same_detections(before, after):
    """Some detections, and every field (boxes, scores, classes, masks) equal, image by image."""
    assert sum(len(d["scores"]) for d in before) > 0
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert set(a) == set(b)
        assert all(torch.equal(a[k].tensor if hasattr(a[k], "tensor") else a[k],
                               b[k].tensor if hasattr(b[k], "tensor") else b[k]) for k in a)


def without_checkpoints_or_evaluation(trainer):
    """``trainer`` (DistillTrainer or LazyDistillTrainer) with no checkpoint writer and no final
    evaluation, for a test that checks neither: each is a 100+ MB save or a COCO evaluation."""
    from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer

    owner = trainer if hasattr(trainer, "_hooks") else trainer._trainer
    owner._hooks = [h for h in owner._hooks if not isinstance(h, (PeriodicCheckpointer, EvalHook))]
    return trainer


def finite_positive_history(histories, name, iterations=3):
    values = [v for v, _ in histories[name].values()]
    return len(values) == iterations and all(math.isfinite(v) for v in values) and max(values) > 0


def lazy_config_for_tiny_cli(path, teacher):
    """A user's .py config: the digits TID one, on their own COCO-format data, registered in the
    config (as LazyConfig users do), every worker running it."""
    root = os.environ[TINY_ROOT_ENV]
    path.write_text(f"""
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

if "tiny_cli" not in DatasetCatalog.list():
    register_coco_instances("tiny_cli", {{}}, {os.path.join(root, "train.json")!r}, {os.path.join(root, "train")!r})
_base = LazyConfig.load({os.path.join(ROOT, "configs", "digits", "retinanet_R34-R18_tid.py")!r})
model, dataloader, optimizer, lr_multiplier, train = (
    _base.model, _base.dataloader, _base.optimizer, _base.lr_multiplier, _base.train)
model.teacher.weights = {teacher!r}
model.teacher.overrides = {[str(o) for o in SMALL_TEACHER_OPTS]!r}
dataloader.train.dataset.names = ["tiny_cli"]
dataloader.test.dataset.names = ["tiny_cli"]
dataloader.evaluator.dataset_name = "tiny_cli"
dataloader.train.total_batch_size = 2
train.device = "cpu"
train.checkpointer.period = 2
""")
    return str(path)


def markdown_tables(text):
    """[(header cells, [row cells])] of every markdown table in ``text``."""
    tables = []
    for block in re.findall(r"((?:^\|.*\|[ \t]*\n)+)", text + "\n", re.M):
        header, _, *rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.strip().splitlines()]
        tables.append((header, rows))
    return tables
