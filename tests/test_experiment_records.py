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


README = EXPERIMENTS / "README.md"
SETS = {"GSM8K": "gsm8k", "SVAMP": "svamp", "MAWPS": "mawps", "AddSub": "addsub", "SingleEq": "singleeq",
        "MultiArith": "multiarith", "AQuA": "aqua", "ARC-Challenge": "arc_challenge", "ARC-Easy": "arc_easy",
        "BoolQ": "boolq", "OpenBookQA": "openbookqa", "PIQA": "piqa", "SIQA": "social_i_qa",
        "WinoGrande": "winogrande"}
METHODS = {"none (base model)": "none", "none": "none", "lora": "lora", "LoRA": "lora", "dora": "dora",
           "gelora": "gelora", "GeLoRA": "gelora", "hyplora": "hyplora", "HypLoRA": "hyplora",
           "hyplora-matched (α·√d_in)": "hyplora-matched", "HydraLoRA": "hydralora",
           "auto (Hydra + GeLoRA, 2 heads)": "auto"}


def _table_after(text: str, marker: str) -> list[list[str]]:
    """The cells of the first markdown table after ``marker`` (header first, the |---| line left out)."""
    lines = text[text.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not set(line) <= set("|- "):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _cell(entry: dict) -> str:
    return f"{100 * entry['mean']:.1f}" + (f" ± {100 * entry['std']:.1f}" if entry.get("std") is not None else "")


@pytest.mark.parametrize("marker,folder,by", [
    ("Accuracy in %, mean ± standard deviation over 3 seeds, n = 120 per set", "math-smollm2", "method"),
    ("## commonsense-smollm2", "commonsense-smollm2", "set"),
    ("**The earlier runs read again at the end token**", "commonsense-smollm2/reread-at-end-token", "set"),
])
def test_the_readme_tables_are_the_stored_summaries(marker, folder, by):
    """Every accuracy cell of the experiments README's tables (mean ± std over seeds, in %) is the stored
    summary's, to the printed digit: a table edited by hand or left from an earlier run fails."""
    table = json.loads((EXPERIMENTS / folder / "summary.json").read_text())["table"]
    header, *rows = _table_after(README.read_text(), marker)
    checked = 0
    for row in rows:
        for name, cell in zip(header[1:], row[1:]):
            if by == "method":
                ev, arm = SETS.get(name), METHODS[row[0]]
            else:
                ev, arm = SETS[row[0].split(" (")[0]], METHODS.get(name)
            if ev is None or arm is None:
                continue  # a column that is not an accuracy (final loss)
            assert cell == _cell(table[ev][arm]), (row[0], name)
            checked += 1
    columns = [n for n in header[1:] if (SETS if by == "method" else METHODS).get(n) is not None]
    assert len(columns) >= 6 and checked == len(rows) * len(columns)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_adapters_commonsense"
FOLDERS_OF = {"ARC-Challenge": "ARC-Challenge", "ARC-Easy": "ARC-Easy", "BoolQ": "boolq", "OpenBookQA": "openbookqa",
              "PIQA": "piqa", "SIQA": "social_i_qa", "WinoGrande": "winogrande"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_the_commonsense_majority_classes_are_counted_from_the_questions():
    """The majority class the commonsense table sets each accuracy beside (in brackets after the set's
    name) is the share of the most frequent gold answer among the 200 questions evaluated."""
    from collections import Counter

    from adapters.data import load_examples

    header, *rows = _table_after(README.read_text(), "## commonsense-smollm2")
    assert len(rows) == 7
    for row in rows:
        name, share = row[0].split(" (")
        gold = [e.answer for e in load_examples(SHARED / FOLDERS_OF[name] / "test.json")[:200]]
        assert share.rstrip(")") == f"{100 * Counter(gold).most_common(1)[0][1] / len(gold):.1f}", name
