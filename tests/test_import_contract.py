"""The import rules of DESIGN.md (pyproject.toml's [tool.importlinter]) hold for the repository, and
each contract is real: on a stand-in tree holding every module the contracts name, it is kept while
the tree is clean, breaks on one offending import, and a missing module fails the check instead of
passing it."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("importlinter") is None,
                                reason="import-linter is not installed (pip install -e '.[test]')")

# one offending import per contract: (importing module, line added to it)
OFFENCES = {
    "measuring-never-imports-adapters": ("geoprobe.probes", "import adapters"),
    "report-reads-only-the-contract": ("geoprobe.report", "import geoprobe.probes"),
    "kernels-never-import-layers": ("adapters.hyplora.kernels", "import adapters.hyplora.layer"),
    "one-way-layers": ("geoprobe.profile", "import geoprobe.pipeline"),
    "no-cycles": ("geoprobe.models", "import geoprobe.corpus"),
}
CYCLE_PARTNER = ("geoprobe.corpus", "import geoprobe.models")  # closes the cycle of "no-cycles"


def _lint(root: Path, *contracts: str) -> subprocess.CompletedProcess:
    args = [arg for c in contracts for arg in ("--contract", c)]
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo", *args], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})


def _config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]


def _named_modules(config: dict) -> set[str]:
    """Every module a contract names (layer entries split on ':' and '|', parentheses dropped)."""
    names: set[str] = set(config["root_packages"])
    for contract in config["contracts"]:
        for key in ("protected_modules", "allowed_importers", "source_modules", "forbidden_modules",
                    "ancestors", "layers"):
            for entry in contract.get(key, []):
                for part in entry.replace("|", ":").split(":"):
                    names.add(part.strip().strip("()"))
    return names


def _stand_in_tree(root: Path, modules: set[str], extra: dict[str, str]) -> None:
    """Each named module and its parents as packages (`__init__.py`), with the given import lines added."""
    modules = {".".join(name.split(".")[:k]) for name in modules for k in range(1, name.count(".") + 2)}
    config = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    (root / "pyproject.toml").write_text(config, encoding="utf-8")
    for name in modules:
        folder = root.joinpath(*name.split("."))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text(extra.get(name, "") + "\n", encoding="utf-8")


def test_repository_keeps_the_import_contracts():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_contracts_are_kept_by_a_clean_stand_in_tree(tmp_path):
    _stand_in_tree(tmp_path, _named_modules(_config()), {})
    proc = _lint(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Contracts: {len(_config()['contracts'])} kept, 0 broken." in proc.stdout


@pytest.mark.parametrize("contract", sorted(OFFENCES))
def test_each_contract_breaks_on_an_offending_import(tmp_path, contract):
    assert {c["id"] for c in _config()["contracts"]} == set(OFFENCES)
    extra = dict([OFFENCES[contract]] + ([CYCLE_PARTNER] if contract == "no-cycles" else []))
    _stand_in_tree(tmp_path, _named_modules(_config()), extra)
    proc = _lint(tmp_path, contract)
    assert proc.returncode == 1 and "0 kept, 1 broken" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("missing", ["geoprobe.workflows", "adapters.hydralora.layer", "geoprobe.probes"])
def test_a_missing_module_fails_the_check(tmp_path, missing):
    _stand_in_tree(tmp_path, _named_modules(_config()) - {missing}, {})
    proc = _lint(tmp_path)
    assert proc.returncode != 0 and missing in proc.stdout + proc.stderr, proc.stdout + proc.stderr
