"""The equal tuning budget: each method's loss weights scaled together over one grid of
factors around its published constants, trained on the tune split; the best factor, chosen
there only, is written to benchmarks/tuned_weights.json for the table's "+tuned" rows."""
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUNED_WEIGHTS_FILE = os.path.join(ROOT, "benchmarks", "tuned_weights.json")
# One grid for every method: decades around the published constants (x 1), more below than
# above (FGD's terms are 20-300 x the detector's losses at x 1 here). A run that diverges (a
# non-finite loss) is recorded as such and never chosen.
SCALES = (0.01, 0.1, 1.0, 10.0)
# A best factor at an edge of the grid is not a tuned one: the sweep adds the next decade on that
# side, up to these. Under AdamW a method whose loss already dominates the shared parameters'
# gradients at x0.01 (FGD here) is flat over the grid, and only a smaller factor is news.
MIN_SCALE, MAX_SCALE = 0.0001, 1000.0
TUNE_DATASET = "digits_det_tune"


def loss_weight_keys(cfg):
    """The keys that weigh the distillation losses ``cfg`` runs: every DISTILL.<LOSS>.*WEIGHT of
    each loss in DISTILL.LOSSES (FGD: its four; BCKD: classification, localisation, centerness)."""
    keys = []
    for loss in cfg.DISTILL.LOSSES:
        if loss not in cfg.DISTILL:
            raise KeyError(f"DISTILL.LOSSES names {loss}, which has no DISTILL.{loss} settings to scale")
        keys += [f"DISTILL.{loss}.{key}" for key in cfg.DISTILL[loss] if key.endswith("WEIGHT")]
    return keys


def scaled_weight_opts(cfg, scale):
    """KEY VALUE overrides that multiply every loss weight of ``cfg`` by ``scale``."""
    opts = []
    for key in loss_weight_keys(cfg):
        node = cfg
        for part in key.split("."):
            node = node[part]
        opts += [key, float(f"{node * scale:.6g}")]  # 0.001 x 0.1 = 0.0001, not 0.00010000000000000002
    return opts


def choose_scale(ap_by_scale):
    """The factor of highest AP at the table's precision (0.1 AP); a tie goes to the one nearer
    the published constants (x 1). ``ap_by_scale``: {scale: AP, or None for a run that diverged}."""
    finite = {s: round(ap, 1) for s, ap in ap_by_scale.items() if ap is not None and math.isfinite(ap)}
    if not finite:
        raise ValueError(f"every run of the sweep diverged: {sorted(ap_by_scale)}")
    return max(finite, key=lambda s: (finite[s], -abs(math.log10(s))))


def next_scale(ap_by_scale):
    """The factor to add when the best of ``ap_by_scale`` (every run recorded: {scale: AP, or None
    for a run that diverged}) lies at an edge of the factors tried, within MIN_SCALE..MAX_SCALE;
    None when the best is inside the grid, or at a limit."""
    best, low, high = choose_scale(ap_by_scale), min(ap_by_scale), max(ap_by_scale)
    lower, higher = float(f"{low / 10:g}"), float(f"{high * 10:g}")  # 0.001 / 10 = 0.0001, not 9.99e-05
    if best == low and lower >= MIN_SCALE:
        return lower
    if best == high and higher <= MAX_SCALE:
        return higher
    return None


def read_tuned_weights(path=TUNED_WEIGHTS_FILE):
    if not os.path.exists(path):
        return {"tracks": {}}
    with open(path) as f:
        return json.load(f)


def tuned_scale(track, method, path=TUNED_WEIGHTS_FILE):
    """The factor chosen for ``method`` on ``track``; a clear error when it was not swept."""
    chosen = read_tuned_weights(path)["tracks"].get(track, {}).get(method)
    if chosen is None:
        raise KeyError(f"{os.path.relpath(path, ROOT)} has no tuned weights for {method} on {track}: sweep them "
                       f"first (python tools/bench_accuracy.py --tune --detectors {track} --rows {method})")
    return chosen["scale"]
