"""benchmarks/results/: one file per benchmark script, each a checked list of runs (label, date,
command, machine, settings, results); `append_run` adds a run and keeps the earlier ones; every
file and run label BENCHMARKS.md cites exists."""
from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path

import pytest

from benchmarks.results_log import RESULTS, append_run, as_run, read_runs
from geoprobe.errors import GeoprobeError

REPO = Path(__file__).resolve().parents[1]
RUN_KEYS = {"label", "date", "command", "title", "machine", "settings", "results"}


def _files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def test_one_results_file_per_benchmark_script():
    names = {p.stem for p in _files()}
    scripts = {p.stem.removeprefix("bench_") for p in (REPO / "benchmarks").glob("bench_*.py")}
    assert names <= scripts, names - scripts
    assert {p.name for p in RESULTS.iterdir()} == {p.name for p in _files()} | {"gpu_tests.txt"}


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.stem)
def test_results_file_holds_checked_runs(path):
    data = read_runs(path)
    assert data["benchmark"] == path.stem and (REPO / data["script"]).is_file()
    assert data["runs"]
    dates = []
    for run in data["runs"]:
        assert set(run) == RUN_KEYS
        assert isinstance(run["label"], str) and run["label"]
        dates.append(dt.datetime.fromisoformat(run["date"]))
        assert dates[-1].tzinfo is not None
        assert all(isinstance(run[k], dict) for k in ("machine", "settings", "results"))
        assert run["machine"] and run["results"]
    assert dates == sorted(dates), "runs are kept oldest first"


def test_append_run_keeps_earlier_runs_and_records_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_demo.py", "--repeats", "3"])
    out = tmp_path / "demo.json"
    first = {"benchmark": "demo", "device": "cpu", "repeats": 3, "rows": [{"ms": 1.5}], "note": None}
    append_run(out, first, label="cpu")
    append_run(out, {**first, "rows": [{"ms": 2.5}]})
    data = read_runs(out)
    assert data["benchmark"] == "demo" and data["script"] == "benchmarks/bench_demo.py"
    a, b = data["runs"]
    assert (a["label"], b["label"]) == ("cpu", "default")
    assert a["command"] == "python benchmarks/bench_demo.py --repeats 3"
    assert a["title"] == "demo" and a["settings"] == {"repeats": 3}
    assert a["results"] == {"rows": [{"ms": 1.5}], "note": None} and b["results"]["rows"] == [{"ms": 2.5}]
    assert a["machine"]["device"] == "cpu" and a["machine"]["system"]["cpu_count"] >= 1
    assert "python" in a["machine"]["system"]["versions"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"], "written atomically, nothing left behind"


def test_as_run_keeps_every_field_and_a_recorded_command():
    flat = {"benchmark": "t", "command": "python x.py --n 2", "versions": {"torch": "2"}, "shape": [4, 8],
            "seconds": 1.25}
    run = as_run(flat, label="cuda", date="2026-01-01T00:00:00+00:00", command="ignored")
    assert run["command"] == "python x.py --n 2"
    back = {"benchmark": run["title"], "command": run["command"], **run["machine"], **run["settings"],
            **run["results"]}
    assert back == flat


def test_a_foreign_file_is_refused(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}), encoding="utf-8")
    with pytest.raises(GeoprobeError, match="benchmark"):
        append_run(bad, {"rows": []})


def test_benchmarks_md_cites_existing_files_and_runs():
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    cited = re.findall(r"`([a-z0-9_]+\.json)`, runs? ((?:`[a-z0-9_]+`(?:, )?)+)", text)
    assert cited
    for name, labels in cited:
        runs = {r["label"] for r in read_runs(RESULTS / name)["runs"]}
        for label in re.findall(r"`([a-z0-9_]+)`", labels):
            assert label in runs, (name, label)
    for name in set(re.findall(r"`([a-z0-9_]+\.(?:json|txt))`", text)):
        assert (RESULTS / name).is_file(), name
