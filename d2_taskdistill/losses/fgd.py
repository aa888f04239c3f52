"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022; a baseline).

On every distilled FPN level, with F_T the teacher's and F_S the (adapted) student's
features (N, C, H, W), T the temperature and the teacher's attention
    A^S = H W softmax_hw(mean_c |F_T| / T)   (N, H, W),   A^C = C softmax_c(mean_hw |F_T| / T)   (N, C):
    L_fg     = sum_{n,c,h,w} M_fg A^S A^C (F_T - F_S)^2 / N
    L_bg     = sum_{n,c,h,w} M_bg A^S A^C (F_T - F_S)^2 / N
    L_at     = (sum |A^C_T - A^C_S| + sum |A^S_T - A^S_S|) / N      (the same attention of F_S)
    L_global = sum_{n,c,h,w} (F_T + G_T(F_T) - F_S - G_S(F_S))^2 / N  (G: a GcBlock context)
and loss = sum over levels of alpha L_fg + beta L_bg + gamma L_at + lambda L_global, each
term logged on its own. The normaliser N is the batch size, as in the public code: the sums
run over channels and positions, so the weights are tuned for its 256-channel FPN. (With
several processes, N is averaged over them: losses/normalizers.py.)

From the paper: the four terms, the foreground scale 1 / (H_r W_r) of a GT box r (the
smallest box wins where boxes overlap), the background normalised by its position count, the
attention maps with temperature T, the L1 attention loss and the GcBlock global relation.

From the public code (github.com/yzd-v/FGD, mmdet/distillation/losses/fgd.py and
configs/distillers/fgd/*.py): the constants (RetinaNet configs: T 0.5, alpha 1e-3,
beta 5e-4, gamma 5e-4, lambda 5e-6; FCOS config: T 0.8, alpha 1.6e-3, beta 8e-4, gamma 8e-4,
lambda 8e-6); sums divided by N and summed over the five FPN levels; separate student- and
teacher-side GcBlocks per level (context conv C -> 1 with Kaiming fan-in init; transform
C -> C/2, LayerNorm, ReLU, C/2 -> C with its last layer zero, so each block starts as the
identity); the teacher's attention weighting both models' features; the background count
taken over the whole (padded) map; a channel adapter only when the FPN widths differ.
The learned parts (GcBlocks, adapter) train with the student and are dropped at export.

Ours (DISTILL.FGD keys in config.py):
- GT boxes are scaled by 1 / stride; position (i, j) is in a box when its stride cell
  [j s, (j+1) s) x [i s, (i+1) s) overlaps the box, and H_r W_r counts those cells, also
  the ones beyond the map, so a box partly off a level keeps its full-area weight. (The
  public code scales by feature size / unpadded image size, which stretches boxes in padded
  batches, and takes cells floor(x0/s) .. ceil(x1/s) inclusive: one more row and column.)
- one adapter shared by the levels, as the other losses here (public: one per level);
- GLOBAL switches the GcBlock relation term off; NUM_LEVELS distils the finest levels only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from detectron2.config import configurable

from .adapters import fpn_channels, width_adapter
from .maps import padded_gt_boxes
from .normalizers import global_mean
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss, check_num_levels, check_positive


def gt_scale_masks(gt_boxes, gt_valid, stride, shape):
    """Foreground and background scale masks (N, H, W) of one level of stride ``stride``.

    gt_boxes (N, G, 4) in image pixels, gt_valid (N, G). M_fg is, at each position, the
    largest 1 / (H_r W_r) over the boxes r whose cells it is in (0 outside all boxes); M_bg
    is 1 where M_fg is 0, divided by the image's count of such positions on the level.
    """
    height, width = shape
    scaled = gt_boxes / stride
    first = scaled[..., :2].floor()  # (N, G, 2): first cell in x, y
    # Last cell the box reaches into; a zero-size box on a cell edge still covers one cell.
    last = torch.maximum(scaled[..., 2:].ceil() - 1, first)
    cells = last - first + 1
    box_weight = 1.0 / (cells[..., 0] * cells[..., 1])  # (N, G)

    xs = torch.arange(width, device=gt_boxes.device, dtype=gt_boxes.dtype)
    ys = torch.arange(height, device=gt_boxes.device, dtype=gt_boxes.dtype)
    in_x = (xs >= first[..., 0, None]) & (xs <= last[..., 0, None])  # (N, G, W)
    in_y = (ys >= first[..., 1, None]) & (ys <= last[..., 1, None])  # (N, G, H)
    inside = in_y[..., :, None] & in_x[..., None, :] & gt_valid[..., None, None]  # (N, G, H, W)
    fg = torch.where(inside, box_weight[..., None, None], torch.zeros_like(box_weight[..., None, None]))
    fg = fg.amax(dim=1)
    bg = (fg == 0).to(fg.dtype)
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)
    return fg, bg


def fgd_attention(features, temperature):
    """(spatial (N, H, W), channel (N, C)) attention of FGD: H W softmax over positions of
    the channel-mean |F| / T, and C softmax over channels of the position-mean |F| / T."""
    n, c, h, w = features.shape
    magnitude = features.abs()
    spatial = h * w * F.softmax(magnitude.mean(dim=1).reshape(n, h * w) / temperature, dim=1)
    channel = c * F.softmax(magnitude.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.reshape(n, h, w), channel


def focal_feature_losses(student, teacher, fg_mask, bg_mask, spatial_t, channel_t, batch=None):
    """(L_fg, L_bg): squared errors weighted by the teacher's attention and the scale masks,
    summed over channels and positions, divided by the batch size (``batch``, default N)."""
    attention = spatial_t[:, None] * channel_t[:, :, None, None]
    per_position = ((student - teacher).pow(2) * attention).sum(dim=1)  # (N, H, W)
    n = student.shape[0] if batch is None else batch
    return (per_position * fg_mask).sum() / n, (per_position * bg_mask).sum() / n


def attention_loss(spatial_s, channel_s, spatial_t, channel_t, batch=None):
    """L1 between the student's and teacher's attention maps, summed, divided by the batch
    size (``batch``, default N)."""
    n = spatial_s.shape[0] if batch is None else batch
    return ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n


class GlobalContext(nn.Module):
    """FGD's relation module, a GcBlock (Cao et al., GCNet): x + t(sum_hw softmax_hw(w^T x) x),
    t = linear C -> C/2, LayerNorm, ReLU, linear C/2 -> C (1x1 convs on the pooled vector in
    the public code: the same map). The last layer starts at zero, so the block starts as x."""

    def __init__(self, channels):
        super().__init__()
        hidden = max(channels // 2, 1)
        self.context_logits = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Linear(channels, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, channels))
        nn.init.kaiming_normal_(self.context_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_logits.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def context(self, x):
        """(N, C): the features averaged over positions with softmax weights of a 1x1 conv."""
        n, c = x.shape[:2]
        weights = F.softmax(self.context_logits(x).reshape(n, -1), dim=1)  # (N, HW)
        return torch.bmm(x.reshape(n, c, -1), weights[:, :, None])[:, :, 0]

    def forward(self, x):
        return x + self.transform(self.context(x))[:, :, None, None]


def global_loss(student_context, teacher_context, batch=None):
    """Squared error of the two models' context-enhanced features, summed, divided by the
    batch size (``batch``, default N)."""
    n = student_context.shape[0] if batch is None else batch
    return (student_context - teacher_context).pow(2).sum() / n


@DISTILL_LOSS_REGISTRY.register()
class FGD(DistillLoss):
    config_node = "FGD"

    # global_: yacs GLOBAL, "global" being a Python keyword.
    @configurable
    def __init__(
        self, *, student_shapes, teacher_shapes, temperature=0.5, fg_weight=0.001, bg_weight=0.0005,
        attention_weight=0.0005, global_weight=0.000005, global_=True, num_levels=0,
    ):
        super().__init__()
        check_positive("FGD", temperature=temperature)
        self.temperature = temperature
        self.weights = {"fg": fg_weight, "bg": bg_weight, "attention": attention_weight,
                        "global": global_weight}
        self.num_levels = check_num_levels("FGD", num_levels, len(student_shapes))
        self.adapter = width_adapter(student_shapes, teacher_shapes)
        channels = fpn_channels(teacher_shapes)
        # One student- and one teacher-side block per level, as the public code.
        self.use_global = global_
        if self.use_global:
            self.student_context = nn.ModuleList(GlobalContext(channels) for _ in range(self.num_levels))
            self.teacher_context = nn.ModuleList(GlobalContext(channels) for _ in range(self.num_levels))

    def forward(self, student, teacher):
        levels = slice(0, self.num_levels)
        student_features = self.adapter(student.features[levels])
        teacher_features = teacher.features[levels]
        strides = student.feature_strides[levels]
        with torch.no_grad():
            gt_boxes, gt_valid = padded_gt_boxes(student.gt_instances, teacher_features[0].device)
        batch = global_mean(teacher_features[0].shape[0], device=teacher_features[0].device)
        terms = {name: 0.0 for name in self.weights if name != "global" or self.use_global}
        for level, (fs, ft, stride) in enumerate(zip(student_features, teacher_features, strides)):
            with torch.no_grad():
                fg_mask, bg_mask = gt_scale_masks(gt_boxes, gt_valid, stride, ft.shape[-2:])
                spatial_t, channel_t = fgd_attention(ft, self.temperature)
            spatial_s, channel_s = fgd_attention(fs, self.temperature)
            fg, bg = focal_feature_losses(fs, ft, fg_mask, bg_mask, spatial_t, channel_t, batch)
            terms["fg"] = terms["fg"] + fg
            terms["bg"] = terms["bg"] + bg
            terms["attention"] = terms["attention"] + attention_loss(spatial_s, channel_s, spatial_t, channel_t, batch)
            if self.use_global:
                terms["global"] = terms["global"] + global_loss(
                    self.student_context[level](fs), self.teacher_context[level](ft), batch)
        return {f"loss_distill_fgd_{name}": self.weights[name] * value for name, value in terms.items()}
