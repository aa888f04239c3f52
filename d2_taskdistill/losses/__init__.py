from .registry import DISTILL_LOSS_REGISTRY, build_distill_loss
from .adapters import FeatureAdapter
from .fitnet import FITNET, masked_feature_loss
from .tid import TID
from .bckd import BCKD, binary_distillation
