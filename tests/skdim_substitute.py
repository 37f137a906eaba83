"""pytest plugin: run scikit-dimension's own TwoNN/GRIDE tests against :mod:`geoprobe.estimators`.

Loaded with ``-p skdim_substitute`` on the test files of the installed scikit-dimension wheel
(``skdim/tests``). Before those files are imported it puts ``geoprobe.estimators.TwoNN`` and
``GRIDE`` in place of ``skdim.id.TwoNN`` / ``skdim.id.GRIDE`` (and the modules they are defined in),
and :func:`geoprobe.estimators.gride_from_distances` in place of skdim's private ``_gride``. The tests
whose failure is a documented convention difference (:data:`DIFFERENCES`) are marked strict xfail
with the reason, so they are reported, and a change that makes them pass is reported too.
"""
from __future__ import annotations

from typing import Any

import pytest

#: skdim test (file name::test function) → why our estimator gives a different answer.
DIFFERENCES = {
    "test_reference.py::test_dadapy": (
        "GRIDE error_: observed Fisher information with (N − 1)/d², the information of the "
        "likelihood that is maximised (DADApy and skdim use N/d²); the estimates agree, the errors "
        "differ by a factor of about 1 + 1/(2N), above the test's rtol 1e-6"),
}

SUBSTITUTED = "scikit-dimension TwoNN, GRIDE and _gride substituted by geoprobe.estimators"


def pytest_configure(config: pytest.Config) -> None:
    import skdim.id
    import skdim.id._GRIDE as skdim_gride
    import skdim.id._TwoNN as skdim_twonn

    from geoprobe.estimators import GRIDE, TwoNN, gride_from_distances

    for module in (skdim.id, skdim_twonn):
        module.TwoNN = TwoNN
    for module in (skdim.id, skdim_gride):
        module.GRIDE = GRIDE
    skdim_gride._gride = gride_from_distances


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(SUBSTITUTED)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        key = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if key in DIFFERENCES:
            item.add_marker(pytest.mark.xfail(reason=DIFFERENCES[key], strict=True))
