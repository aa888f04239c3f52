"""The README and docs pages agree with the committed benchmarks, and their links resolve."""
import glob
import json
import os
import re

import pytest

from conftest import ROOT, markdown_tables

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# The README's method rows; benchmark_row gives each one's benchmark row name.
README_METHOD_ROWS = [f"+ {m}" for m in ("FITNET", "FGFI", "FGD", "PKD", "CWD", "TID", "TBD", "BCKD", "BCKD+TID",
                                         "PKD+BCKD")]
README_DETECTORS = ("retinanet", "fcos")


def readme_results_table():
    """{row label: [RetinaNet, RetinaNet tuned, FCOS, FCOS tuned]} of the README's results table."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text.split("| AP | RetinaNet | RetinaNet, tuned | FCOS | FCOS, tuned |", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[1:]]
    return {label: cells for label, *cells in rows}


def tuned_cell(rows, tuned, method):
    """A method's tuned column: its +tuned row at the chosen factor, the factor alone while its
    val runs are not trained, or that its sweep is not finished."""
    if method not in tuned:
        return "not swept yet"
    scale = tuned[method]["scale"]
    if method + "+tuned" not in rows:
        return f"x{scale:g}, to train"
    return f"{mean_and_std(rows[method + '+tuned'])} (x{scale:g})"


def test_readme_results_are_the_committed_benchmark():
    with open(os.path.join(ROOT, "benchmarks", "accuracy_trained.json")) as f:
        detectors = json.load(f)["detectors"]
    with open(os.path.join(ROOT, "benchmarks", "tuned_weights.json")) as f:
        tuned = json.load(f)["tracks"]
    table = readme_results_table()
    assert set(table) == {"teacher R34", "student R18 alone", *README_METHOD_ROWS}
    teacher = [c for det in README_DETECTORS for c in (f"{detectors[det]['teacher']['metrics']['AP']:.1f}", "")]
    assert table["teacher R34"] == teacher
    assert table["student R18 alone"] == [c for det in README_DETECTORS
                                          for c in (mean_and_std(detectors[det]["rows"]["baseline"]), "")]
    for label in README_METHOD_ROWS:
        method = benchmark_row(label)
        expected = [c for det in README_DETECTORS for c in (mean_and_std(detectors[det]["rows"][method]),
                                                            tuned_cell(detectors[det]["rows"], tuned[det], method))]
        assert table[label] == expected, label


def benchmark_row(label):
    """The benchmark's row name of a results.md row label ('+ BCKD+TID, FPN + head from the teacher')."""
    base, inherits, _ = label.partition(", FPN + head from the teacher")
    name = "baseline" if base.startswith("student R18") else base.removeprefix("+ ").lower().replace("+", "_")
    return name + ("+init" if inherits else "")


def one_decimal(value):
    return f"{value:.1f}"


def mean_and_std(summary):
    """A benchmark row's AP as the tables print it: mean ± std over its seeds."""
    return f"{summary['mean']['AP']:.1f} ± {summary['std']['AP']:.1f}"


def test_results_page_tables_are_the_committed_benchmarks():
    """Every trained-schedule table of docs/results.md (seeds, mean ± std, gain, gap closed) and
    the short-schedule table, cell by cell against benchmarks/accuracy_{trained,short}.json."""
    with open(os.path.join(ROOT, "benchmarks", "accuracy_trained.json")) as f:
        trained = json.load(f)["detectors"]
    with open(os.path.join(ROOT, "benchmarks", "accuracy_short.json")) as f:
        short = json.load(f)["detectors"]
    detectors = {"RetinaNet": "retinanet", "FCOS": "fcos", "FCOS R34 into RetinaNet R18": "fcos_to_retinanet"}
    checked = 0
    for header, rows in markdown_tables(open(os.path.join(ROOT, "docs", "results.md")).read()):
        if header[1:3] == ["seeds' AP", "mean AP"]:
            bench = trained[detectors[header[0]]]
            for label, *cells in rows:
                cell = dict(zip(header[1:], cells))
                if label.startswith("teacher"):
                    teacher_ap = bench["teacher"]["metrics"]["AP"] if "metrics" in bench["teacher"] else None
                    own = {r.get("own_teacher_AP") for r in bench["rows"].values()} - {None}
                    assert cell["seeds' AP"] in {one_decimal(ap) for ap in own | {teacher_ap} - {None}}, (header[0], label)
                    continue
                row = bench["rows"][benchmark_row(label)]
                assert cell["seeds' AP"] == ", ".join(one_decimal(run["AP"]) for run in row["runs"]), (header[0], label)
                assert cell["mean AP"].strip("*") == mean_and_std(row), (header[0], label)
                if cell.get("gain"):
                    assert cell["gain"] == f"{row['gain_AP']:+.1f}", (header[0], label)
                if cell.get("gap closed"):
                    assert cell["gap closed"].split(" %")[0] == f"{row['gap_closed'] * 100:.0f}", (header[0], label)
                checked += 1
        elif header == ["model", "RetinaNet AP", "gain", "FCOS AP", "gain"]:
            for label, *cells in rows:
                for detector, (ap, gain) in zip(("retinanet", "fcos"), (cells[:2], cells[2:])):
                    if label.startswith("teacher"):
                        assert ap == one_decimal(short[detector]["teacher"]["AP"]), (detector, label)
                        continue
                    method = short[detector]["methods"][benchmark_row(label)]
                    assert ap == mean_and_std(method), (detector, label)
                    baseline = short[detector]["methods"]["baseline"]["mean"]["AP"]
                    assert gain == ("" if label.startswith("student") else f"{method['mean']['AP'] - baseline:+.1f}"), \
                        (detector, label)
                    checked += 1
    assert checked >= 47  # the five trained tables (35 rows) and the short one (2 x 6 cells) were found


def test_speed_numbers_are_the_committed_benchmark_of_every_method():
    """benchmarks/speed.json times every registered method on the detectors it runs between
    (RetinaNet: all but ROI_KD; Faster R-CNN: the feature, RPN and ROI head losses), and
    docs/results.md quotes its medians and memory as they are."""
    from d2_taskdistill.losses import DISTILL_LOSS_REGISTRY
    from d2_taskdistill.modeling.meta_arch import losses_between

    with open(os.path.join(ROOT, "benchmarks", "speed.json")) as f:
        speed = json.load(f)
    # The project's losses (tests register their own beside them).
    ours = {name for name, loss in DISTILL_LOSS_REGISTRY if loss.__module__.startswith("d2_taskdistill.")}
    text = " ".join(open(os.path.join(ROOT, "docs", "results.md")).read().split())
    assert f"nothing else running, {speed['wall_seconds'] / 60:.1f} min)" in text
    assert list(speed["detectors"]) == ["retinanet", "faster_rcnn"]
    for detector, measured in speed["detectors"].items():
        fp32 = measured["precision"]["fp32"]
        methods = fp32["methods"]
        timed = {name for label in methods for name in label.split("+")}
        assert timed == ours & set(losses_between(two_stage=detector == "faster_rcnn")), detector
        quoted = f"{detector}: median ratios " + ", ".join(f"{label} {m['ratio']['median']:.3f}"
                                                          for label, m in methods.items())
        assert quoted in text
        floor = sum(fp32["profiles"][kind]["peak_mb"] for kind in ("student", "teacher"))
        memory = [m["peak_mb"] / floor for m in methods.values()]
        assert f"{detector}: peak memory {min(memory):.2f}-{max(memory):.2f} x" in text


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        text = open(page).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"(https?:|mailto:)", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(resolved):
                broken.append((os.path.relpath(page, ROOT), target))
            elif anchor and resolved.endswith(".md"):
                headings = [heading_anchor(h) for h in re.findall(r"^#+ (.+)$", open(resolved).read(), re.M)]
                if anchor not in headings:
                    broken.append((os.path.relpath(page, ROOT), target))
    assert broken == []


def heading_anchor(heading):
    """The anchor GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("bench_file, first_column, detector", [
    ("accuracy_short_faster_rcnn.json", "Faster R-CNN", "faster_rcnn"),
    ("accuracy_medium.json", "Faster R-CNN, medium", "faster_rcnn"),
    ("accuracy_medium_mask_rcnn.json", "Mask R-CNN, medium", "mask_rcnn"),
    ("accuracy_medium_pair.json", "RetinaNet -> Faster R-CNN, medium", "retinanet_to_faster_rcnn"),
])
def test_two_stage_page_tables_are_the_committed_benchmarks(bench_file, first_column, detector):
    """docs/two_stage.md's tables, cell by cell against their benchmark: mean AP (box, and mask
    where the table has a mask column), mean ± std with the seeds where a row has several."""
    with open(os.path.join(ROOT, "benchmarks", bench_file)) as f:
        bench = json.load(f)["detectors"][detector]
    text = open(os.path.join(ROOT, "docs", "two_stage.md")).read()
    (header, rows), = [t for t in markdown_tables(text) if t[0][0] == first_column]
    masks, seeds_column = "mask AP" in header, header[-1] == "seeds"
    table = {row[0]: row[1:] for row in rows}
    teacher_label, = [label for label in table if label.startswith("teacher R34")]
    teacher = bench["teacher"]
    expected_teacher = [one_decimal(teacher["metrics"]["AP"]), *([one_decimal(teacher["mask_metrics"]["AP"])] if masks else []),
                        *(["-"] * seeds_column)]
    assert table.pop(teacher_label) == expected_teacher
    labels = {"student R18 alone": "baseline", "+ BCKD (RPN)": "bckd"}
    assert len(table) == len(bench["rows"])
    for label, cells in table.items():
        row = bench["rows"][labels.get(label) or label.removeprefix("+ ").lower().replace("+", "_")]

        def cell(mean, std):
            return one_decimal(mean["AP"]) if row["seeds"] == 1 else f"{one_decimal(mean['AP'])} ± {one_decimal(std['AP'])}"
        expected = [cell(row["mean"], row["std"]), *([cell(row["mask_mean"], row["mask_std"])] if masks else []),
                    *([str(row["seeds"])] * seeds_column)]
        assert cells == expected, label


TUNED_DETECTORS = {"RetinaNet": "retinanet", "FCOS": "fcos"}


def published_and_tuned_table(first_cell, columns=TUNED_DETECTORS, separator=" "):
    """{row label: cells} of the docs/results.md table whose header starts with ``first_cell``,
    after checking its columns: each of ``columns`` at the published weights (x1), then tuned."""
    text = open(os.path.join(ROOT, "docs", "results.md")).read()
    (header, rows), = [t for t in markdown_tables(text) if t[0][0] == first_cell]
    assert header[1:] == [f"{name}{separator}{kind}" for name in columns for kind in ("at x1", "tuned")]
    return {row[0]: row[1:] for row in rows}


def test_tuning_table_is_the_committed_sweep():
    """docs/results.md's sweep table, cell by cell against benchmarks/tuning_tune.json: each
    method's AP at the published weights (x1) and at the chosen factor, per detector."""
    with open(os.path.join(ROOT, "benchmarks", "tuning_tune.json")) as f:
        tracks = json.load(f)["tracks"]
    table = published_and_tuned_table("digits_det_tune, seed 0")
    expected_alone = []
    for det in TUNED_DETECTORS.values():
        expected_alone += [one_decimal(tracks[det]["baseline_AP"]), ""]
    assert table.pop("student R18 alone") == expected_alone
    for label, cells in table.items():
        method = benchmark_row(label)
        expected = []
        for det in TUNED_DETECTORS.values():
            swept = tracks[det]["methods"][method]
            chosen = swept["scale"]
            expected += [one_decimal(swept["AP"]["1"]), f"{one_decimal(swept['AP'][f'{chosen:g}'])} (x{chosen:g})"]
        assert cells == expected, label


def test_tuned_rows_table_is_the_committed_benchmark():
    """docs/results.md's val table of the swept methods, cell by cell against
    benchmarks/accuracy_trained.json (published and +tuned rows) and the factors of
    benchmarks/tuned_weights.json."""
    with open(os.path.join(ROOT, "benchmarks", "accuracy_trained.json")) as f:
        detectors_rows = {det: bench["rows"] for det, bench in json.load(f)["detectors"].items()}
    with open(os.path.join(ROOT, "benchmarks", "tuned_weights.json")) as f:
        tuned = json.load(f)["tracks"]
    table = published_and_tuned_table("digits_det_val, mean ± std")

    def cell(det, row):
        return mean_and_std(detectors_rows[det][row])

    assert table.pop("student R18 alone") == [c for det in TUNED_DETECTORS.values() for c in (cell(det, "baseline"), "")]
    assert len(table) == 10
    for label, cells in table.items():
        method = benchmark_row(label)
        expected = [c for det in TUNED_DETECTORS.values()
                    for c in (cell(det, method), f"{cell(det, method + '+tuned')} (x{tuned[det][method]['scale']:g})")]
        assert cells == expected, label


def test_pair_tuned_table_is_the_committed_sweep_and_benchmark():
    """docs/results.md's table of the FCOS -> RetinaNet pair: each swept method on the tune split
    (benchmarks/tuning_tune.json) and on val (benchmarks/accuracy_trained.json), at the published
    weights and at the chosen factor."""
    with open(os.path.join(ROOT, "benchmarks", "tuning_tune.json")) as f:
        swept = json.load(f)["tracks"]["fcos_to_retinanet"]
    with open(os.path.join(ROOT, "benchmarks", "accuracy_trained.json")) as f:
        val = json.load(f)["detectors"]["fcos_to_retinanet"]["rows"]
    table = published_and_tuned_table("FCOS R34 into RetinaNet R18, swept", columns=("tune", "val"), separator=", ")
    assert table.pop("student R18 alone") == [one_decimal(swept["baseline_AP"]), "", mean_and_std(val["baseline"]), ""]
    assert len(table) == 5
    for label, cells in table.items():
        method = benchmark_row(label)
        scale = swept["methods"][method]["scale"]
        assert val[method + "+tuned"]["weight_scale"] == scale, label
        tune_ap = swept["methods"][method]["AP"]
        assert cells == [one_decimal(tune_ap["1"]), f"{one_decimal(tune_ap[f'{scale:g}'])} (x{scale:g})",
                         mean_and_std(val[method]), f"{mean_and_std(val[method + '+tuned'])} (x{scale:g})"], label
