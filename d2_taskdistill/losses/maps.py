"""Per-location maps shared by the mask-based losses: flattening across FPN
levels, top-fraction selection, spatial NMS and distances to GT boxes.
All functions are batched tensor code without Python loops over locations."""
import math

import torch
import torch.nn.functional as F


def flatten_levels(maps):
    """L x (N, H, W) -> (N, P) with P = sum of H * W."""
    return torch.cat([m.flatten(1) for m in maps], dim=1)


def unflatten_levels(flat, shapes):
    """(N, P) -> L x (N, H, W) for the level ``shapes`` [(H, W), ...]."""
    parts = torch.split(flat, [h * w for h, w in shapes], dim=1)
    return [p.reshape(p.shape[0], h, w) for p, (h, w) in zip(parts, shapes)]


def top_fraction_mask(values, fraction, candidates=None, population=None):
    """(N, P) bool: per image, the candidate locations among the top ``fraction`` by value.

    k = ceil(fraction * size of the image's ``population``) (default: the
    candidates), at least 1; every candidate tied with the k-th largest candidate
    value is included, so the selection is deterministic. Images without
    candidates select nothing.
    """
    if candidates is None:
        candidates = torch.ones_like(values, dtype=torch.bool)
    if population is None:
        population = candidates
    masked = values.masked_fill(~candidates, float("-inf"))
    counts = candidates.sum(dim=1)
    k = torch.clamp((population.sum(dim=1).float() * fraction).ceil().long(), min=1)
    k = torch.minimum(k, torch.clamp(counts, min=1))
    # topk of a bound on k known from the shape, not k.max(): no host read on the GPU, and
    # not a full sort: fractions are small (a few % of P). The sorted prefix is the same.
    # +1: k above is rounded in float32, this bound in float64.
    k_bound = min(values.shape[1], math.ceil(values.shape[1] * fraction) + 1)
    ranked = masked.topk(k_bound, dim=1).values
    kth = ranked.gather(1, (k - 1)[:, None])  # (N, 1)
    return candidates & (masked >= kth) & (counts[:, None] > 0)


def local_maxima(maps, window):
    """Spatial NMS: L x (N, H, W) -> L x bool, True where a value is the maximum of its
    ``window`` x ``window`` neighbourhood (plateaus keep every tied location)."""
    if window <= 1:
        return [torch.ones_like(m, dtype=torch.bool) for m in maps]
    pad = window // 2
    return [m >= F.max_pool2d(m[:, None], window, stride=1, padding=pad)[:, 0] for m in maps]


def point_box_distance(points, boxes):
    """Euclidean distance from points (P, 2) to boxes (N, G, 4) -> (N, P, G); 0 inside a box."""
    x, y = points[None, :, None, 0], points[None, :, None, 1]
    x0, y0, x1, y1 = (boxes[:, None, :, i] for i in range(4))
    dx = torch.clamp(torch.maximum(x0 - x, x - x1), min=0)
    dy = torch.clamp(torch.maximum(y0 - y, y - y1), min=0)
    return torch.sqrt(dx * dx + dy * dy)


def padded_gt_boxes(gt_instances, device):
    """(N, G, 4) GT boxes padded with zero-size boxes and (N, G) validity."""
    g = max([len(x) for x in gt_instances] + [1])
    boxes = torch.zeros(len(gt_instances), g, 4, device=device)
    valid = torch.zeros(len(gt_instances), g, dtype=torch.bool, device=device)
    for i, gt in enumerate(gt_instances):  # loop over images
        boxes[i, : len(gt)] = gt.gt_boxes.tensor
        valid[i, : len(gt)] = True
    return boxes, valid


def position_centers(outputs):
    """(P, 2) centres of the feature-map positions of DenseOutputs, all levels."""
    centers = []
    for anchors, (h, w) in zip(outputs.anchors, outputs.level_shapes):
        centers.append(anchors.get_centers().view(h, w, -1, 2)[:, :, 0].reshape(-1, 2))
    return torch.cat(centers, dim=0)
