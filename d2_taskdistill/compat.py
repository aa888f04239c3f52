"""Workarounds that let detectron2 v0.6 (the pure-Python registry build) run
on a current Python stack. Each is applied only where its fault exists: the
C++-ops ones are no-ops on an upstream detectron2 built with its ops, the numpy
one wherever the loader's numpy alias still exists.

Call :func:`apply` before anything imports ``detectron2.layers``; importing
``d2_taskdistill`` does that.
"""
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


def apply():
    """Apply every workaround this detectron2 needs; safe to call repeatedly."""
    global HAS_CPP_OPS
    if HAS_CPP_OPS is not None:
        return HAS_CPP_OPS
    HAS_CPP_OPS = has_cpp_ops()
    if not HAS_CPP_OPS:
        logger.info("detectron2 has no C++ ops: using Python fallbacks (official COCOeval)")
        _install_c_stub()
        _use_official_cocoeval()
    _numpy_str_for_voc_loader()
    return HAS_CPP_OPS


def group_norm_factory(num_channels):
    """GroupNorm with at most 32 groups.

    Fault: v0.6 RetinaNetHead probes ``get_norm("GN", 1)``, i.e. GroupNorm(32, 1),
    which torch rejects; identical to "GN" for every real channel count (>= 32).
    """
    import torch.nn as nn

    return nn.GroupNorm(min(32, num_channels), num_channels)
