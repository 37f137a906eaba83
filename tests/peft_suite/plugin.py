"""pytest plugin that runs PEFT's ``tests/test_custom_models.py`` on our rows only.

Load it with ``-p peft_suite.plugin`` (``tests/`` of this repository on ``PYTHONPATH``) in a pytest run
of PEFT's unpacked test folder. It

1. stands in for ``diffusers`` and ``datasets`` when they are not installed (PEFT's shared test
   helpers import them at module level; the custom-model tests never call them);
2. teaches PEFT's ``set_init_weights_false`` helper (it compares config classes with ``==``) that a
   ``LoraConfig`` subclass takes ``init_lora_weights=False`` like ``LoraConfig`` itself;
3. replaces the rows of PEFT's three row lists with ours (:mod:`peft_suite.rows`) before the first
   test function is parametrised; ``pytest.mark.parametrize`` holds these very list objects;
4. wraps PEFT's merge entry points to check that a refusal leaves the model as it was
   (:mod:`peft_suite.untouched`);
5. deselects every test that is not parametrised by one of our rows, and the (test, row) pairs of
   ``rows.LEFT_OUT`` (each with its reason there);
6. turns an expected refusal (:mod:`peft_suite.verdict`) into an xfail, and
7. writes one JSON record per test to the file named by ``GEOPROBE_PEFT_SUITE_REPORT``;
8. loads saved folders of our methods as their method where PEFT's tests load them with stock calls
   (``PeftModel.from_pretrained(model, folder)``, ``load_adapter``): PEFT builds a config from
   ``adapter_config.json`` by its ``peft_type`` alone, and ``LORA`` names ``LoraConfig``, so without help a
   third-party ``LoraConfig`` subclass comes back as plain LoRA (with a warning naming the fields it
   dropped). A user passes ``config=`` or calls ``adapters.load``; this plugin does the same inside PEFT's
   config loader (``PeftConfigMixin.from_peft_type``), for folders whose saved fields name one of our
   methods (``adapters.io.saved_method``), and leaves every other folder to PEFT.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

import pytest

from peft_suite import rows, untouched, verdict

REPORT_ENV = "GEOPROBE_PEFT_SUITE_REPORT"
_ROW_LISTS = {
    "TEST_CASES": rows.single_rows,
    "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES": rows.multi_rows,
    "MIXED_ADAPTER_TEST_CASES": rows.mixed_rows,
}
_METHODS = pytest.StashKey[tuple]()
_RECORDS = pytest.StashKey[dict]()
_INSTALLED = "_geoprobe_rows_installed"


def _stand_in(name: str, attributes: tuple[str, ...]) -> None:
    """Register module ``name`` whose listed attributes refuse to be used (only when not installed)."""
    if importlib.util.find_spec(name) is not None:
        return

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError(f"{name} is not installed; this PEFT test needs it and is not one of our rows")

    module = types.ModuleType(name)
    for attribute in attributes:
        setattr(module, attribute, refuse)
    sys.modules[name] = module


def pytest_configure(config: pytest.Config) -> None:
    _stand_in("diffusers", ("StableDiffusionPipeline",))
    _stand_in("datasets", ("load_dataset",))
    from geoprobe.errors import AdapterError

    untouched.install(AdapterError)
    _load_our_folders_as_their_method()
    config.stash[_METHODS] = rows.methods_under_test()
    config.stash[_RECORDS] = {}


def _load_our_folders_as_their_method() -> None:
    """Item 8 of the module docstring."""
    from peft.config import PeftConfigMixin

    from adapters import io

    stock = PeftConfigMixin.from_peft_type.__func__

    def from_peft_type(cls: type, **kwargs: Any) -> Any:
        method = io.saved_method(kwargs)
        if method.layer is None:
            return stock(cls, **kwargs)
        return io.config_from_saved(method, kwargs, where="adapter_config.json")

    PeftConfigMixin.from_peft_type = classmethod(from_peft_type)


def _lora_aware(helper: Callable[[type, dict], dict]) -> Callable[[type, dict], dict]:
    """Wrap PEFT's ``set_init_weights_false(config_cls, kwargs)`` for ``LoraConfig`` subclasses."""
    from peft import LoraConfig

    def init_weights_false(config_cls: type, kwargs: dict) -> dict:
        if isinstance(config_cls, type) and issubclass(config_cls, LoraConfig) and config_cls is not LoraConfig:
            return {**kwargs, "init_lora_weights": False}
        return helper(config_cls, kwargs)

    return init_weights_false


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Put our rows into PEFT's row lists, in place, before the first parametrisation reads them."""
    module = metafunc.module
    if getattr(module, _INSTALLED, False) or not hasattr(module, "TEST_CASES"):
        return
    methods = metafunc.config.stash[_METHODS]
    for list_name, build in _ROW_LISTS.items():
        row_list = getattr(module, list_name, None)
        if not isinstance(row_list, list):
            raise pytest.UsageError(f"PEFT's test module has no list {list_name}; its layout changed")
        row_list[:] = build(methods)
    helper = getattr(module, "set_init_weights_false", None)
    if helper is not None:
        module.set_init_weights_false = _lora_aware(helper)
    setattr(module, _INSTALLED, True)


def _row_of(item: pytest.Item) -> Any:
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = params.get("test_name")
    return rows.method_of(name, item.config.stash[_METHODS]) if isinstance(name, str) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if _row_of(item) is not None
            and (item.originalname, item.callspec.params.get("test_name")) not in rows.LEFT_OUT]
    others = [item for item in items if _row_of(item) is None]
    if others:
        config.hook.pytest_deselected(items=others)
    items[:] = ours


def _frames(excinfo: pytest.ExceptionInfo) -> list[tuple[str, str]]:
    return [(str(entry.path), entry.name) for entry in excinfo.traceback]


def _test_line(item: pytest.Item, excinfo: pytest.ExceptionInfo) -> str:
    """``file:line: statement`` of the innermost frame in PEFT's test folder (where the test failed)."""
    test_dir = Path(str(item.path)).parent
    inside = [e for e in excinfo.traceback if Path(str(e.path)).parent == test_dir]
    if not inside:
        return "?"
    try:
        statement = " ".join(str(inside[-1].statement).split())[:160]
    except Exception:  # the source may be unavailable; the place is enough then
        statement = ""
    return f"{Path(str(inside[-1].path)).name}:{inside[-1].lineno + 1}: {statement}"


def _judge(item: pytest.Item, excinfo: pytest.ExceptionInfo) -> verdict.Verdict:
    from geoprobe.errors import AdapterError

    method = _row_of(item)
    entry = verdict.entry_point(_frames(excinfo), Path(str(item.path)).parent, Path(untouched.__file__))
    changes = getattr(excinfo.value, untouched.CHANGES_ATTR, None)
    return verdict.judge(excinfo.value, entry, method.name, method.mergeable, AdapterError, changes)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    excinfo = call.excinfo
    record = item.config.stash[_RECORDS].setdefault(item.nodeid, {
        "nodeid": item.nodeid, "test": item.originalname, "row": item.callspec.params["test_name"],
        "method": _row_of(item).name, "outcome": "passed", "where": None, "error": None, "message": None, "verdict": None})
    if report.skipped and record["outcome"] == "passed":
        record["outcome"] = "skipped"
        record["message"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else None
    if not report.failed or excinfo is None:
        return report
    judged = _judge(item, excinfo) if call.when == "call" else verdict.Verdict(False, f"fails in {call.when}")
    record.update(error=type(excinfo.value).__name__, message=str(excinfo.value)[:2000], verdict=judged.reason,
                  where=_test_line(item, excinfo),
                  outcome="refused" if judged.refusal else "failed")
    if judged.refusal:
        report.outcome = "skipped"
        report.wasxfail = judged.reason
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(REPORT_ENV)
    if target:
        records = sorted(session.config.stash[_RECORDS].values(), key=lambda r: r["nodeid"])
        Path(target).write_text(json.dumps(records, indent=1))
