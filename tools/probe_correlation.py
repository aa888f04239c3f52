#!/usr/bin/env python
"""How well does a short run rank distillation methods the way the full schedule does?
Measured on the committed digits records, for both detectors; the caveat that
tools/rank_methods.py --probe-iters prints, and docs/results.md states.

    python tools/probe_correlation.py      # writes benchmarks/probe_rank_correlation.{md,json}

Two probes: (a) the trained runs' own evaluation at iteration 500 of 1000 (same teacher,
same schedule, stopped half-way: what --probe-iters does), (b) the short schedule's runs
(200 iterations under a 900-iteration teacher: benchmarks/accuracy_short.json). Each is
compared with the trained ranking by Spearman's rho and Kendall's tau over the rows both have
(the baseline and each method, mean over seeds; +init rows left out).
"""
import glob
import json
import os
import statistics
import sys

from scipy.stats import kendalltau, spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.report import markdown_table, write_report_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_ITER = 500


def trained_rows(detector):
    """{row: (mean AP at PROBE_ITER, mean final AP, seeds)} from the trained run records."""
    by_row = {}
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "accuracy_runs_trained", detector, "*_seed*.json")):
        record = json.load(open(path))
        if record["row"].endswith("+init"):
            continue
        probe = dict(record["ap_curve"]).get(PROBE_ITER)
        by_row.setdefault(record["row"], []).append((probe, record["metrics"]["AP"]))
    return {row: (statistics.fmean(p for p, _ in runs), statistics.fmean(f for _, f in runs), len(runs))
            for row, runs in by_row.items() if all(p is not None for p, _ in runs)}


def short_rows(detector):
    report = json.load(open(os.path.join(ROOT, "benchmarks", "accuracy_short.json")))
    return {row: s["mean"]["AP"] for row, s in report["detectors"][detector]["methods"].items()}


def correlation(probe, final):
    rows = sorted(set(probe) & set(final))
    x, y = [probe[r] for r in rows], [final[r] for r in rows]
    return {"rows": rows, "spearman": spearmanr(x, y).statistic, "kendall": kendalltau(x, y).statistic,
            "same_best": max(rows, key=probe.get) == max(rows, key=final.get),
            "probe_order": sorted(rows, key=probe.get, reverse=True),
            "final_order": sorted(rows, key=final.get, reverse=True)}


def main():
    data, lines = {}, ["# Short probes against the trained ranking (digits)", "",
                       "Command: `python tools/probe_correlation.py`. Rows: the baseline and each method "
                       "(mean AP over seeds), as in benchmarks/accuracy_trained.md.", ""]
    rows = []
    for detector in ("retinanet", "fcos"):
        trained = trained_rows(detector)
        final = {row: v[1] for row, v in trained.items()}
        probes = {f"iteration {PROBE_ITER} of 1000 (same teacher)": {row: v[0] for row, v in trained.items()},
                  "short schedule (200 it., 900-it. teacher)": short_rows(detector)}
        data[detector] = {}
        for name, probe in probes.items():
            c = correlation(probe, final)
            data[detector][name] = c
            rows.append([detector, name, len(c["rows"]), f"{c['spearman']:.2f}", f"{c['kendall']:.2f}",
                         "yes" if c["same_best"] else "no", " > ".join(c["probe_order"]),
                         " > ".join(c["final_order"])])
    lines.append(markdown_table(["detector", "probe", "rows", "Spearman rho", "Kendall tau", "same best",
                                 "probe order", "trained order"], rows))
    write_report_files(os.path.join(ROOT, "benchmarks", "probe_rank_correlation"), data, lines)


if __name__ == "__main__":
    main()
