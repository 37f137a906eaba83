"""PEFT's own custom-model test matrix, run on our HypLoRA and HydraLoRA rows.

The sdist of the installed PEFT version is fetched once (``peft_suite.sdist``); its
``tests/test_custom_models.py`` runs in a subprocess with our plugin (``peft_suite.plugin``), which
adds our rows on PEFT's tiny MLP and deselects every other row. Every test of our rows must pass,
or be an expected refusal: a merge entry point refused with our ``AdapterError`` naming the method
(``peft_suite.verdict``). A bare ``KeyError`` or a wrong result is a failure.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 540


def _rows() -> set[str]:
    from peft_suite import rows

    methods = rows.methods_under_test()
    return {row[0] for build in (rows.single_rows, rows.multi_rows, rows.mixed_rows) for row in build(methods)}


def _sdist():
    import peft

    from peft_suite import sdist

    found, why = sdist.fetch(peft.__version__)
    if found is None:
        if not sdist.pypi_reachable():
            pytest.skip(f"PyPI is unreachable and no PEFT {peft.__version__} sdist is cached in "
                        f"{sdist.cache_dir()}")
        pytest.fail(f"could not download the PEFT {peft.__version__} sdist although PyPI is reachable:\n{why}")
    return found


def _run_matrix(tests_dir: Path, report: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GEOPROBE_PEFT_SUITE_REPORT": str(report)}
    cmd = [sys.executable, "-m", "pytest", str(tests_dir / "test_custom_models.py"), "-p", "peft_suite.plugin",
           "-o", "addopts=", "-q", "-p", "no:cacheprovider", "--tb=short", "-W", "ignore::DeprecationWarning"]
    try:
        return subprocess.run(cmd, cwd=tests_dir.parent, env=env, capture_output=True, text=True,
                              timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"PEFT's custom-model tests on our rows took over {TIME_LIMIT_S} s")


def _failures(records: list[dict]) -> str:
    """The failed tests, grouped by test function, method, place and error."""
    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    messages: dict[tuple, str] = {}
    for r in records:
        if r["outcome"] == "failed":
            key = (r["test"], r["method"], r["where"], r["error"])
            groups[key].append(r["row"])
            messages.setdefault(key, (r["message"] or "").strip().splitlines()[0][:300] if r["message"] else "")
    return "\n".join(f"{test} [{method}] at {where}: {error}: {messages[(test, method, where, error)]}\n"
                     f"    rows: {sorted(set(names))}"
                     for (test, method, where, error), names in sorted(groups.items()))


@pytest.mark.slow
def test_peft_custom_model_matrix_on_our_methods(tmp_path):
    found = _sdist()
    report = tmp_path / "records.json"
    done = _run_matrix(found.tests, report)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode in (0, 1), f"PEFT's test run did not complete (exit {done.returncode}):\n{tail}"
    assert report.is_file(), f"the plugin wrote no records:\n{tail}"
    records = json.loads(report.read_text())
    assert {r["row"] for r in records} == _rows(), "some of our rows did not reach PEFT's tests"
    outcomes = collections.Counter(r["outcome"] for r in records)
    assert set(outcomes) <= {"passed", "refused", "skipped", "failed"}, outcomes
    failed = _failures(records)
    assert not failed, f"PEFT's tests fail on our rows ({dict(outcomes)}):\n{failed}"
    passed_rows = {r["row"] for r in records if r["outcome"] == "passed"}
    assert passed_rows == _rows(), f"rows with no passing test: {sorted(_rows() - passed_rows)}"
    assert done.returncode == 0, tail
