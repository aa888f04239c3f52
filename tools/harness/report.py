"""Tables and charts of evaluation results (demo report, accuracy benchmark)."""
import json
import math
import os

from .experiments import METRICS


def method_label(method):
    """The DISTILL.LOSSES of a digits config's method name: bckd_tid -> BCKD+TID, roi_kd -> ROI_KD
    (a loss whose own name has an underscore)."""
    return method.upper().replace("_", "+").replace("ROI+KD", "ROI_KD")


def _fmt(value, std=None):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if std is None else f"{value:.1f} ± {std:.1f}"


def markdown_table(headers, rows, tablefmt="pipe"):
    """A markdown (pipe) table of already formatted cells, by tabulate (``tablefmt="html"``: HTML)."""
    from tabulate import tabulate

    return tabulate([[str(c) for c in row] for row in rows], headers=headers, tablefmt=tablefmt,
                    disable_numparse=True)


def metrics_table(rows, metrics=METRICS, tablefmt="pipe"):
    """rows: [(name, {metric: value}, {metric: std} or None)] -> a markdown (or HTML) table."""
    return markdown_table(["model", *metrics], [
        [name, *(_fmt(values.get(m), None if stds is None else stds.get(m)) for m in metrics)]
        for name, values, stds in rows], tablefmt)


def embedded_image(path, alt):
    """An HTML <img> holding the PNG at ``path`` itself (base64): the page opens anywhere, alone."""
    import base64
    import html

    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


HTML_STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;"
              "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
              "figure{margin:2em 0}figcaption{max-width:60em}")


def html_page(title, body):
    """A self-contained HTML page."""
    import html

    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def bar_chart(rows, path, metrics=METRICS, title="COCO metrics on digits_det_val"):
    """Grouped bars, one group per metric, one bar per row; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The legend beside the axes: inside, ten rows' labels hid the middle groups' bars. The figure
    # grows with the rows so that the legend's last labels are not cut off (a label takes ~0.19 in).
    fig, ax = plt.subplots(figsize=(11, max(3.6, 0.19 * len(rows) + 1.0)), dpi=100)
    width = 0.8 / max(len(rows), 1)
    # tab10 repeats after ten rows (the eleventh bar took the teacher's colour): tab20 beyond, and
    # past twenty rows a hatch on each further round of its colours.
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors
    hatches = [None, "//", "..", "xx"]
    for i, (name, values, stds) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
        heights = [0.0 if math.isnan(values.get(m, math.nan)) else values[m] for m in metrics]
        errors = None if stds is None else [stds.get(m, 0.0) for m in metrics]
        ax.bar(xs, heights, width, yerr=errors, label=name, capsize=2, color=colors[i % len(colors)],
               hatch=hatches[i // len(colors) % len(hatches)])
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
