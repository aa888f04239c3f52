"""Tables and charts of evaluation results (demo report, accuracy benchmark)."""
import json
import math
import os

from .experiments import METRICS


def method_label(method):
    """The DISTILL.LOSSES of a digits config's method name: bckd_tid -> BCKD+TID."""
    return method.upper().replace("_", "+")


def _fmt(value, std=None):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if std is None else f"{value:.1f} ± {std:.1f}"


def markdown_table(headers, rows):
    """A markdown (pipe) table of already formatted cells, by tabulate."""
    from tabulate import tabulate

    return tabulate([[str(c) for c in row] for row in rows], headers=headers, tablefmt="pipe",
                    disable_numparse=True)


def metrics_table(rows, metrics=METRICS):
    """rows: [(name, {metric: value}, {metric: std} or None)] -> a markdown table."""
    return markdown_table(["model", *metrics], [
        [name, *(_fmt(values.get(m), None if stds is None else stds.get(m)) for m in metrics)]
        for name, values, stds in rows])


def bar_chart(rows, path, metrics=METRICS, title="COCO metrics on digits_det_val"):
    """Grouped bars, one group per metric, one bar per row; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    width = 0.8 / max(len(rows), 1)
    for i, (name, values, stds) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
        heights = [0.0 if math.isnan(values.get(m, math.nan)) else values[m] for m in metrics]
        errors = None if stds is None else [stds.get(m, 0.0) for m in metrics]
        ax.bar(xs, heights, width, yerr=errors, label=name, capsize=2)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report_files(output, data, lines):
    """A benchmark's results: ``output``.json (``data``) and ``output``.md (``lines``, also printed)."""
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
