"""The one place that knows which detectron2 is installed.

Two detectron2s are supported from one code base: the registry's v0.6 (pure
Python, no C++ ops) and upstream main built from source. Both report version
"0.6", so they are told apart here by features, never by version strings.
Each workaround is applied only where its fault exists.

Call :func:`apply` before anything imports ``detectron2.layers`` or
``detectron2.data.transforms``; importing ``d2_taskdistill`` does that.
"""
import functools
import importlib
import logging
import sys
import types

logger = logging.getLogger(__name__)

# Set by apply(): False when detectron2's C++ ops are missing and a stub stands in.
HAS_CPP_OPS = None
_STUB_DOC = "Stub installed by d2_taskdistill.compat: this detectron2 was built without C++ ops."


def has_cpp_ops():
    """True when the real compiled ``detectron2._C`` is importable."""
    try:
        module = importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return module.__doc__ != _STUB_DOC


def _install_c_stub():
    # Fault: v0.6 imports detectron2._C at module level (layers, evaluation),
    # so a build without C++ ops cannot even import detectron2.modeling.
    stub = types.ModuleType("detectron2._C", doc=_STUB_DOC)
    # detectron2.utils.collect_env (default_setup) reads build facts from _C.
    stub.get_compiler_version = lambda: "none (built without C++ ops)"
    stub.get_cuda_version = lambda: "none (built without C++ ops)"
    stub.has_cuda = lambda: False
    sys.modules["detectron2._C"] = stub
    import detectron2

    detectron2._C = stub


def _use_official_cocoeval():
    # Fault: COCOEvaluator defaults to COCOeval_opt, which needs detectron2._C.
    from pycocotools.cocoeval import COCOeval

    from detectron2.evaluation import coco_evaluation, fast_eval_api

    coco_evaluation.COCOeval_opt = COCOeval
    fast_eval_api.COCOeval_opt = COCOeval


def _numpy_str_for_voc_loader():
    # Fault: v0.6 load_voc_instances calls np.loadtxt(dtype=np.str); numpy >= 1.24 removed np.str.
    import numpy as np

    from detectron2.data.datasets import pascal_voc

    if "str" in np.__dict__ or pascal_voc.np is not np:  # alias exists, or already patched
        return
    numpy_with_str = types.ModuleType("numpy")
    numpy_with_str.__dict__.update(np.__dict__)
    numpy_with_str.str = str
    pascal_voc.np = numpy_with_str


def _pillow_linear_alias():
    # Fault: v0.6's transforms read Image.LINEAR at import time; Pillow 10 removed that
    # alias of BILINEAR. Must run before detectron2.data.transforms is imported.
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _cpu_aware_create_ddp_model():
    # Fault (both versions): DefaultTrainer wraps the model with create_ddp_model, which
    # passes device_ids=[local_rank]; DDP rejects device_ids for a module on the CPU.
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "cpu_aware", False):
        return

    @functools.wraps(original)
    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if on_cpu and "device_ids" not in kwargs:
            kwargs["device_ids"] = None
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model.cpu_aware = True
    defaults.create_ddp_model = create_ddp_model


def apply():
    """Apply every workaround this detectron2 needs; safe to call repeatedly."""
    global HAS_CPP_OPS
    if HAS_CPP_OPS is not None:
        return HAS_CPP_OPS
    _pillow_linear_alias()
    HAS_CPP_OPS = has_cpp_ops()
    if not HAS_CPP_OPS:
        logger.info("detectron2 has no C++ ops: using Python fallbacks (official COCOeval)")
        _install_c_stub()
        _use_official_cocoeval()
    _numpy_str_for_voc_loader()
    _cpu_aware_create_ddp_model()
    _heads_take_group_norm_by_name()
    return HAS_CPP_OPS


def launch_supports_cpu_workers():
    """Upstream's launch() starts gloo workers when there is no CUDA; v0.6's asserts CUDA.
    Upstream added ``comm.create_local_process_group`` in the same change."""
    from detectron2.utils import comm

    return hasattr(comm, "create_local_process_group")


def create_local_process_group(num_workers_per_machine):
    """The per-machine process group that ``comm.get_local_rank()`` reads, for the CPU workers
    launch.py starts: upstream's ``comm`` makes it; v0.6 keeps the group in a module global that
    only its own (CUDA-only) worker sets, so it is made here."""
    import torch.distributed as dist

    from detectron2.utils import comm

    if launch_supports_cpu_workers():
        return comm.create_local_process_group(num_workers_per_machine)
    num_machines = dist.get_world_size() // num_workers_per_machine
    machine_rank = dist.get_rank() // num_workers_per_machine
    for i in range(num_machines):  # every rank must create every group
        group = dist.new_group(list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def fcos_labels_images_without_boxes():
    """Upstream FCOS labels images without GT boxes itself (the change that made its
    anchor matching ``_match_anchors``); v0.6's crashes on them."""
    from detectron2.modeling.meta_arch.fcos import FCOS

    return hasattr(FCOS, "_match_anchors")


def heads_build_group_norm_by_name():
    """Whether detectron2's RetinaNet/FCOS heads take ``norm="GN"`` (upstream main); v0.6's head
    probes ``get_norm(norm, 1)``, a GroupNorm(32, 1), which torch rejects."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    try:
        RetinaNetHead(input_shape=[ShapeSpec(channels=32)], num_classes=1, num_anchors=1, conv_dims=[32], norm="GN")
    except ValueError:
        return False
    return True


def _heads_take_group_norm_by_name():
    # Fault: v0.6's RetinaNetHead (and FCOSHead) cannot take norm="GN" (its probe builds GroupNorm(32, 1)).
    # Its head module's get_norm builds GN with at most 32 groups instead: the same layers for
    # every real channel count (>= 32), and a probe that passes; exports then spell "GN" on both.
    from detectron2.modeling.meta_arch import retinanet

    if heads_build_group_norm_by_name():
        return
    get_norm = retinanet.get_norm
    retinanet.get_norm = lambda norm, channels: group_norm_factory(channels) if norm == "GN" else get_norm(norm, channels)


def group_norm_factory(num_channels):
    """GroupNorm with at most 32 groups.

    Fault: v0.6 RetinaNetHead probes ``get_norm("GN", 1)``, i.e. GroupNorm(32, 1),
    which torch rejects; identical to "GN" for every real channel count (>= 32).
    """
    import torch.nn as nn

    return nn.GroupNorm(min(32, num_channels), num_channels)


@functools.lru_cache(maxsize=None)
def yacs_train_sampler_takes_seed():
    """Whether the yacs train loader seeds its TrainingSampler with cfg.SEED (upstream main);
    v0.6 draws the sampler's seed from the global RNG, as a loader built from kwargs does.
    Found by building the sampler of a two-item dataset with a known SEED."""
    import numpy as np
    from detectron2.config import get_cfg
    from detectron2.data import build

    cfg = get_cfg()
    cfg.SEED = 20260601
    build_logger = logging.getLogger(build.__name__)
    level = build_logger.level
    build_logger.setLevel(logging.WARNING)  # its "Using training sampler" line is not the user's
    # v0.6 draws the sampler's seed from numpy's global RNG: put its state back, or the probe
    # would change the run it is asked about.
    numpy_state = np.random.get_state()
    try:
        sampler = build._train_loader_from_config(cfg, mapper=lambda d: d, dataset=[{}, {}])["sampler"]
    finally:
        np.random.set_state(numpy_state)
        build_logger.setLevel(level)
    return getattr(sampler, "_seed", None) == cfg.SEED
