from .registry import DISTILL_LOSS_REGISTRY, DistillLoss, build_distill_loss
from .adapters import FeatureAdapter
from .feature_losses import masked_feature_loss, masked_sum_loss
from .fitnet import FITNET
from .tid import TID
from .bckd import BCKD, binary_distillation
from .fgfi import FGFI, imitation_mask
from .tbd import TBD, dense_harmony_score, harmonious_share, harmony_score
from .fgd import FGD, GlobalContext, fgd_attention, gt_scale_masks
from .pkd import PKD, standardize
from .cwd import CWD, channel_wise_divergence
from .roi_kd import ROI_KD
