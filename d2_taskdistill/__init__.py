"""d2_taskdistill: task-aware knowledge distillation for Detectron2 dense detectors."""
from .known_warnings import ignore_known_warnings

ignore_known_warnings()  # before compat imports detectron2, which warns at import

from . import compat  # noqa: E402

compat.apply()

from .config import add_fcos_config, add_taskdistill_config, load_config  # noqa: E402
from . import data, losses, modeling  # noqa: E402  (registers datasets, losses, models)

__version__ = "0.1.0"
