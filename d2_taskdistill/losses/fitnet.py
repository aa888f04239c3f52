"""FitNet-style feature imitation on every location (a baseline)."""
from detectron2.config import configurable

from .adapters import FeatureAdapter, fpn_channels
from .feature_losses import masked_feature_loss
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss


@DISTILL_LOSS_REGISTRY.register()
class FITNET(DistillLoss):
    config_node = "FITNET"

    @configurable
    def __init__(self, *, student_shapes, teacher_shapes, weight=1.0):
        super().__init__()
        self.weight = weight
        self.adapter = FeatureAdapter(fpn_channels(student_shapes), fpn_channels(teacher_shapes))

    def forward(self, student, teacher):
        adapted = self.adapter(student.features)
        return {"loss_distill_fitnet": self.weight * masked_feature_loss(adapted, teacher.features)}
