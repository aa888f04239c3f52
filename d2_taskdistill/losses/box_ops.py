"""IoU and GIoU of aligned box pairs (x0, y0, x1, y1), shared by the losses.

Written here rather than taken from fvcore or detectron2: fvcore's ``giou_loss`` asserts on
its inputs and sets the intersection by boolean indexing, and detectron2's
``matched_pairwise_iou`` divides 0 by 0 for zero-size boxes; each assert and boolean index is a
host read that stalls a GPU step. Here every pair is computed, nothing is read back.
"""
import torch


def _intersection_and_union(a, b):
    """(N,) intersection and union areas of the pairs (a[i], b[i]); a box whose corners are
    swapped counts as empty."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    return inter, area_a + area_b - inter


def aligned_iou(a, b):
    """IoU of each pair; 0 for two empty boxes (the union is floored at 1e-12, not 0/0)."""
    inter, union = _intersection_and_union(a, b)
    return inter / torch.clamp(union, min=1e-12)


def giou_loss(boxes, targets, eps=1e-7):
    """1 - GIoU of each pair, (..., 4) -> (...). For boxes with x1 >= x0 and y1 >= y0 it gives
    fvcore's ``giou_loss(reduction="none")``, the same formula with the same eps; non-finite
    boxes give non-finite values (the meta-architecture's finite check reports them)."""
    inter, union = _intersection_and_union(boxes, targets)
    iou = inter / (union + eps)
    enclosing = (torch.maximum(boxes[..., 2:], targets[..., 2:])
                 - torch.minimum(boxes[..., :2], targets[..., :2])).clamp(min=0).prod(dim=-1)
    return 1 - (iou - (enclosing - union) / (enclosing + eps))
