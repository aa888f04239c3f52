"""Which FPN levels two detectors compare: those of equal stride. RetinaNet and FCOS read
P3-P7, detectron2's R-CNNs P2-P6; a pair of the two shares P3-P6."""
from functools import cached_property

from .dense_outputs import LevelLayout


def shared_level_indices(student_strides, teacher_strides):
    """(student indices, teacher indices) of the strides both have, finest first."""
    shared = sorted(set(student_strides) & set(teacher_strides))
    return [list(student_strides).index(s) for s in shared], [list(teacher_strides).index(s) for s in shared]


class LevelSubset(LevelLayout):
    """Some levels of a detector's outputs (features, strides, anchors); everything else, such
    as the batch's ground truth, is the outputs' own."""

    def __init__(self, outputs, indices):
        self.outputs = outputs
        self.indices = list(indices)
        self.features = [outputs.features[i] for i in self.indices]

    @property
    def feature_strides(self):
        strides = self.outputs.feature_strides
        return [strides[i] for i in self.indices]

    @cached_property
    def anchors(self):
        anchors = self.outputs.anchors
        return [anchors[i] for i in self.indices]

    def __getattr__(self, name):  # images, image_sizes, gt_instances, detector, ...
        if name == "outputs":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.outputs, name)
