"""The committed comparison tables (reports/experiments/*/summary.json) follow from their own run records:
`geoprobe.compare.summarize` on each folder's runs/*.json gives the stored table (means, stds, paired
differences, intervals, verdicts) and the stored verdict on whether the set separates the methods. A
table edited by hand, or a summary left behind when runs were replaced, fails here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from geoprobe.compare.workflow import summarize

EXPERIMENTS = Path(__file__).resolve().parents[1] / "reports" / "experiments"
FOLDERS = sorted(p.parent for p in EXPERIMENTS.glob("**/summary.json") if (p.parent / "runs").is_dir())


def test_the_committed_experiments_are_found():
    names = {str(p.relative_to(EXPERIMENTS)) for p in FOLDERS}
    assert {"math-smollm2", "commonsense-smollm2", "glue-sst2"} <= names


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_a_stored_table_is_the_summary_of_its_runs(folder):
    stored = json.loads((folder / "summary.json").read_text())
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))}
    seeds = stored["seeds"] if isinstance(stored["seeds"], int) else len(stored["seeds"])
    again = summarize(runs, stored["methods"], seeds, settings=stored["settings"])
    assert set(again["table"]) == set(stored["settings"]["evals"])
    for ev, rows in stored["table"].items():
        assert again["table"][ev] == rows, ev
    assert again["separation"] == stored["separation"]
    n_runs = sum(1 if m == "none" else seeds for m in stored["methods"])
    assert len(runs) == n_runs
