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


def _single_rows() -> list:
    from peft_suite import rows

    return rows.single_rows(rows.methods_under_test())


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
    # a row of two adapters may reach only tests that end in a merge or a weighted combination, which our
    # methods refuse (after PEFT checked the several-active-adapters forward pass): a checked refusal counts
    ran_rows = {r["row"] for r in records if r["outcome"] in ("passed", "refused")}
    assert ran_rows == _rows(), f"rows with no passing test or checked refusal: {sorted(_rows() - ran_rows)}"
    assert {r["row"] for r in records if r["outcome"] == "passed"} >= {row[0] for row in _single_rows()}
    assert done.returncode == 0, tail


# ---------------------------------------------------------------------------------- the refusal check
def _frames(entry: str) -> list[tuple[str, str]]:
    return [("/x/_pytest/python.py", "pytest_pyfunc_call"), ("/peft/tests/test_custom_models.py", "test_x"),
            ("/peft/tests/testing_common.py", "_test_x"), ("/sp/peft/tuners/tuners_utils.py", entry),
            ("/repo/adapters/hyplora.py", "merge")]


def test_entry_point_is_the_call_below_the_test_code():
    from peft_suite import verdict

    skip = Path("/repo/tests/peft_suite/untouched.py")
    frames = _frames("merge_adapter")
    assert verdict.entry_point(frames, Path("/peft/tests"), skip) == "merge_adapter"
    wrapped = frames[:3] + [(str(skip), "guarded")] + frames[3:]
    assert verdict.entry_point(wrapped, Path("/peft/tests"), skip) == "merge_adapter"
    assert verdict.entry_point(frames[:3], Path("/peft/tests"), skip) is None


@pytest.mark.parametrize("error, entry, mergeable, changes, refusal", [
    ("HypLoRA is not mergeable: nonlinear", "merge_adapter", False, [], True),
    ("HypLoRA is not mergeable: nonlinear", "merge_and_unload", False, [], True),
    ("HypLoRA cannot combine adapters", "add_weighted_adapter", False, [], True),
    ("HypLoRA is not mergeable: nonlinear", "merge", False, None, True),  # a layer's own merge
    ("HypLoRA is not mergeable: nonlinear", "unmerge_adapter", False, [], False),  # must only warn
    ("HypLoRA is not mergeable: nonlinear", "forward", False, [], False),
    ("HypLoRA is not mergeable: nonlinear", "merge_adapter", True, [], False),
    ("HypLoRA is not mergeable: nonlinear", "merge_adapter", False, ["tensor lin0.weight changed"], False),
    ("HypLoRA cannot combine adapters", "add_weighted_adapter", False, ["adapter 'mix' added"], False),
    ("HydraLoRA is not mergeable", "merge_adapter", False, [], False),  # names another method
    ("something went wrong", "merge_adapter", False, [], False),
])
def test_judge_accepts_only_our_clean_merge_refusals(error, entry, mergeable, changes, refusal):
    from geoprobe.errors import AdapterError
    from peft_suite import verdict

    judged = verdict.judge(AdapterError(error), entry, "HypLoRA", mergeable, AdapterError, changes)
    assert judged.refusal is refusal, judged.reason


def test_judge_refuses_a_bare_key_error():
    from geoprobe.errors import AdapterError
    from peft_suite import verdict

    judged = verdict.judge(KeyError("HypLoRA cannot"), "add_weighted_adapter", "HypLoRA", False, AdapterError, [])
    assert not judged.refusal and "KeyError" in judged.reason


def test_untouched_sees_a_clean_refusal_and_a_half_built_adapter():
    import torch
    from peft import get_peft_model

    from geoprobe.errors import AdapterError
    from peft_suite import rows, untouched

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model = get_peft_model(base, rows.methods_under_test()[0].config_cls(target_modules=["0", "2"], r=2))
    weight = model.base_model.model[0].base_layer.weight.detach().clone()
    merge_adapter = untouched.guard(type(model.base_model).merge_adapter, AdapterError)
    with pytest.raises(AdapterError) as caught:
        merge_adapter(model.base_model)
    assert getattr(caught.value, untouched.CHANGES_ATTR) == []
    assert torch.equal(model.base_model.model[0].base_layer.weight, weight)
    before = untouched.snapshot(model.base_model)
    model.base_model.model[0].base_layer.weight.data += 1.0
    assert untouched.changes(before, model.base_model) == ["tensor model.0.base_layer.weight changed"]


# ---------------------------------------------------------------------------------- fetching the sdist
def _fake_tarball(cache: Path, version: str) -> None:
    import io
    import tarfile

    cache.mkdir(parents=True)
    with tarfile.open(cache / f"peft-{version}.tar.gz", "w:gz") as archive:
        data = b"def test_nothing():\n    pass\n"
        info = tarfile.TarInfo(f"peft-{version}/tests/test_custom_models.py")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


def test_a_cached_sdist_is_unpacked_without_pypi(tmp_path, monkeypatch):
    from peft_suite import sdist

    monkeypatch.setenv(sdist.CACHE_ENV, str(tmp_path / "cache"))
    _fake_tarball(tmp_path / "cache", "0.0.1")
    monkeypatch.setattr(sdist, "_download", lambda *a: pytest.fail("downloaded although a tarball is cached"))
    found, why = sdist.fetch("0.0.1")
    assert found is not None and why == ""
    assert (found.tests / "test_custom_models.py").is_file()
    assert (found.tests / "__init__.py").is_file()  # PEFT's tests import their helpers relatively
    assert sdist.fetch("0.0.1")[0] == found  # unpacked once, reused


@pytest.mark.parametrize("reachable", [False, True])
def test_no_sdist_skips_only_when_pypi_is_unreachable(tmp_path, monkeypatch, reachable):
    from peft_suite import sdist

    monkeypatch.setenv(sdist.CACHE_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(sdist, "_download", lambda *a: (None, "pip: no route to host"))
    monkeypatch.setattr(sdist, "pypi_reachable", lambda *a, **k: reachable)
    outcome = pytest.fail.Exception if reachable else pytest.skip.Exception
    with pytest.raises(outcome, match="pip: no route to host" if reachable else "PyPI is unreachable"):
        _sdist()
