from .fcos import FCOS, build_fcos_resnet_fpn_backbone
from .dense_outputs import DenseOutputs, run_dense_detector
from .teacher import build_teacher, load_teacher, load_teacher_weights
from .meta_arch import TaskDistillDetector
