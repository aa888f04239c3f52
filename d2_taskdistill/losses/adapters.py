"""Adapters from student to teacher feature channels. They train with the
student and are dropped from the exported student."""
import torch.nn as nn


class FeatureAdapter(nn.Module):
    """A 1x1 conv shared by all FPN levels (their channels are equal)."""

    def __init__(self, student_channels, teacher_channels):
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        nn.init.kaiming_uniform_(self.conv.weight, a=1)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features):
        return [self.conv(f) for f in features]


def fpn_channels(shapes):
    channels = {s.channels for s in shapes}
    if len(channels) != 1:
        raise ValueError(f"FPN levels must share one channel count, got {sorted(channels)}")
    return channels.pop()


def width_adapter(student_shapes, teacher_shapes):
    """A FeatureAdapter when the student's and teacher's FPN widths differ, else an identity:
    for losses whose public code aligns channels only when it has to (FGD, PKD, CWD)."""
    student_channels, teacher_channels = fpn_channels(student_shapes), fpn_channels(teacher_shapes)
    if student_channels == teacher_channels:
        return nn.Identity()
    return FeatureAdapter(student_channels, teacher_channels)
