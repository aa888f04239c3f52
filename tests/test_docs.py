"""The README and docs pages agree with the committed benchmarks, and their links resolve."""
import glob
import json
import os
import re

from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# README row label -> the benchmark's row name.
ROWS = {"student R18 alone": "baseline", **{f"+ {m}": m.lower().replace("+", "_")
                                            for m in ("FITNET", "FGFI", "FGD", "PKD", "CWD", "TID", "TBD", "BCKD", "BCKD+TID")}}


def readme_results_table():
    """{row label: [RetinaNet cell, FCOS cell]} of the README's results table."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text.split("| AP | RetinaNet | FCOS |", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[1:]]
    return {label: cells for label, *cells in rows}


def test_readme_results_are_the_committed_benchmark():
    with open(os.path.join(ROOT, "benchmarks", "accuracy_trained.json")) as f:
        detectors = json.load(f)["detectors"]
    table = readme_results_table()
    assert set(table) == {"teacher R34", *ROWS}
    for column, detector in enumerate(("retinanet", "fcos")):
        bench = detectors[detector]
        assert table["teacher R34"][column] == f"{bench['teacher']['metrics']['AP']:.1f}", detector
        for label, row in ROWS.items():
            summary = bench["rows"][row]
            assert table[label][column] == f"{summary['mean']['AP']:.1f} ± {summary['std']['AP']:.1f}", (detector, label)


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
