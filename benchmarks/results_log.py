"""One results file per benchmark: ``benchmarks/results/<name>.json`` (``<name>`` is the script's name
without ``bench_``) holds every run of that benchmark, oldest first. Each run records

- ``label``: which variant ran (``cpu``, ``cuda``, ``small`` …; earlier runs keep the suffix of the
  file they came from, e.g. ``cuda_run2``),
- ``date``: when it was recorded (UTC, ISO 8601),
- ``command``: how to run it again,
- ``machine``: the system it ran on (``system``: platform, CPU, cores, load average, GPU, package
  versions) and the script's own machine fields (``device``, ``versions``, ``machine`` …),
- ``title``: what the script says it measures,
- ``settings``: the inputs (shapes, model, repeats, data …),
- ``results``: every other field the script wrote.

A script hands its flat result dictionary to :func:`append_run`, which sorts its fields into these
parts and appends the run atomically (``geoprobe.records.write_json``).
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from geoprobe.errors import GeoprobeError
from geoprobe.records import check_schema, read_json, write_json
from geoprobe.runtime import versions

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "geoprobe-benchmark-runs"
SCHEMA_VERSION = 1

# fields of a script's flat result that describe the machine, and those that describe the inputs
MACHINE_KEYS = ("machine", "device", "host", "versions", "threads", "python", "cpu_count")
SETTINGS_KEYS = ("settings", "what", "shape", "dtype", "repeats", "iters_per_timing", "model", "adapters",
                 "tokens", "step", "native_layers", "steps_per_round", "calls_per_measurement", "data",
                 "corpus", "n_documents", "n_tokens", "n_characters", "tokenizer")


def results_path(name: str) -> Path:
    """The results file of benchmark ``name`` (``bench_<name>.py``)."""
    return RESULTS / f"{name}.json"


def system_description() -> dict[str, Any]:
    """The machine running this process: platform, CPU, core count, load average, GPU, versions."""
    out: dict[str, Any] = {"platform": platform.platform(),
                           "cpu": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count()}
    if hasattr(os, "getloadavg"):
        out["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    out["versions"] = versions()
    return out


def as_run(result: dict[str, Any], *, label: str, date: str, command: Optional[str] = None,
           system: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One run record from a script's flat ``result``: its fields sorted into title, command,
    machine, settings and results (none dropped). ``system`` (the auto-detected machine) goes
    under ``machine["system"]``."""
    machine = {"system": system} if system is not None else {}
    run: dict[str, Any] = {"label": label, "date": date, "command": result.get("command", command),
                           "title": result.get("benchmark"), "machine": machine, "settings": {},
                           "results": {}}
    for key, value in result.items():
        if key in ("benchmark", "command"):
            continue
        part = "machine" if key in MACHINE_KEYS else "settings" if key in SETTINGS_KEYS else "results"
        run[part][key] = value
    return run


def read_runs(path: str | os.PathLike) -> dict[str, Any]:
    """The results file at ``path``, checked (schema, a list of runs)."""
    data = read_json(path, "benchmark results")
    check_schema(data, f"benchmark results {path}", schema=SCHEMA, version=SCHEMA_VERSION)
    if not isinstance(data.get("runs"), list):
        raise GeoprobeError(f"benchmark results {path}: 'runs' is not a list")
    return data


def append_run(path: str | os.PathLike, result: dict[str, Any], *, label: str = "default") -> Path:
    """Append ``result`` (a script's flat result dictionary) as a new run of the results file at
    ``path``, with today's date, this machine and the command line; the file is created if absent
    and rewritten atomically. Returns the path."""
    path = Path(path)
    data = read_runs(path) if path.exists() else {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "benchmark": path.stem,
        "script": f"benchmarks/{Path(sys.argv[0]).name}", "runs": []}
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    command = shlex.join(["python", *sys.argv])
    data["runs"].append(as_run(result, label=label, date=date, command=command,
                               system=system_description()))
    return write_json(path, data)
