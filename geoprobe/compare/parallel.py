"""Several runs of one comparison side by side: ``geoprobe compare --jobs N``.

A small model leaves a large GPU mostly idle: its training step is bound by the host launching kernels,
so N comparison processes sharing the GPU finish N runs in about the time of one (13 SmolLM2-135M runs
in 488 s on one H100 with 4 processes, against 1,361 s of their own wall times added up). The methods
are dealt to N worker processes (:func:`deal`: whole methods, largest count of unfinished runs first,
each to the least loaded worker); worker k runs ``geoprobe compare`` with the same flags on its methods
in ``OUT.jobs/<k>`` (the runs OUT already holds are copied in first, so they are skipped there too),
with its output in ``OUT.jobs/<k>.log``. Their finished runs, predictions, adapters and plans are then
merged into OUT (:func:`merge`), and the caller's own pass over every method finds them finished, runs
any that a worker did not finish, writes the summary and the report and probes the fine-tuned models
(``--probe-after`` runs there only). ``OUT.jobs`` is removed once merged, its logs kept in
``OUT/logs``.

The per-run seconds, throughputs and peak memories of runs that shared the GPU are those of a shared
GPU; ``summary.json`` says so in its notes while OUT/jobs.json is there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import ComparisonError

__all__ = ["deal", "merge", "arm_of", "unfinished", "worker_argv", "run_jobs", "JOBS_FILE"]

JOBS_FILE = "jobs.json"
"""OUT/jobs.json: how the last ``--jobs`` pass dealt the methods and how long its workers took."""

_DROP = {"--jobs": True, "--methods": True, "--out": True, "--probe-after": False, "--quiet": False}


def deal(counts: dict[str, int], jobs: int) -> list[list[str]]:
    """The methods dealt to at most ``jobs`` workers: ``counts`` maps a method to its unfinished runs
    (methods with none are left out); the largest count first, each to the worker with the fewest runs
    so far (ties: the lower worker). Returns the non-empty groups, each in the order of ``counts``."""
    if jobs < 1:
        raise ValueError(f"jobs must be ≥ 1, got {jobs}")
    order = list(counts)
    todo = sorted((m for m in order if counts[m] > 0), key=lambda m: (-counts[m], order.index(m)))
    groups: list[list[str]] = [[] for _ in range(jobs)]
    load = [0] * jobs
    for m in todo:
        k = min(range(jobs), key=lambda i: (load[i], i))
        groups[k].append(m)
        load[k] += counts[m]
    return [sorted(g, key=order.index) for g in groups if g]


def arm_of(run: str) -> str:
    """The method (arm) name of a run name: ``lora-seed2`` → ``lora``, ``none`` → ``none``."""
    head, sep, tail = run.rpartition("-seed")
    return head if sep and tail.isdigit() else run


def unfinished(out: Path, arm_names: Sequence[str], seeds: int, none: str = "none") -> dict[str, int]:
    """Per method, how many of its runs OUT/runs does not hold yet (the base model ``none`` has one run)."""
    runs = out / "runs"
    names = {a: [a] if a == none else [f"{a}-seed{k}" for k in range(seeds)] for a in arm_names}
    return {a: sum(not (runs / f"{n}.json").is_file() for n in ns) for a, ns in names.items()}


def merge(src: Path, dest: Path, names: Optional[set[str]] = None, *, records_only: bool = False) -> list[str]:
    """Copy the finished runs of comparison folder ``src`` (those of the methods ``names``, or all), with
    their predictions and adapters unless ``records_only``, and its settings and plans into ``dest``
    (nothing already there is replaced but the runs copied); returns the run names copied. A run's own
    record is copied last, so a run counts as finished in ``dest`` only once its adapter is there.
    ``records_only`` serves a worker, which needs a finished run's record to skip it and nothing else."""
    dest.mkdir(parents=True, exist_ok=True)
    if not (src / "comparison.json").is_file():
        return []
    if not (dest / "comparison.json").is_file():
        shutil.copy2(src / "comparison.json", dest / "comparison.json")
    copied = []
    for run in sorted((src / "runs").glob("*.json")) if (src / "runs").is_dir() else []:
        if names is not None and arm_of(run.stem) not in names:
            continue
        for sub, item in () if records_only else (("predictions", f"{run.stem}.json"), ("adapters", run.stem)):
            there = src / sub / item
            if there.is_dir():
                shutil.copytree(there, dest / sub / item, dirs_exist_ok=True)
            elif there.is_file():
                (dest / sub).mkdir(exist_ok=True)
                shutil.copy2(there, dest / sub / item)
        (dest / "runs").mkdir(exist_ok=True)
        shutil.copy2(run, dest / "runs" / run.name)
        copied.append(run.stem)
    if (src / "plans").is_dir():
        (dest / "plans").mkdir(exist_ok=True)
        for plan in sorted((src / "plans").iterdir()):
            if plan.is_file() and not (dest / "plans" / plan.name).exists():
                shutil.copy2(plan, dest / "plans" / plan.name)
    return copied


def worker_argv(argv: Sequence[str], methods: Sequence[str], out: Path) -> list[str]:
    """The ``geoprobe compare`` arguments of one worker: ``argv`` (the caller's, after ``compare``) less
    ``--jobs``, ``--methods``, ``--out``, ``--probe-after`` and ``--quiet``, plus its ``methods`` and
    ``out`` and ``--quiet`` (its output goes to a log)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _DROP:
            skip = _DROP[flag] and "=" not in arg
            continue
        kept.append(arg)
    return ["compare", *kept, "--methods", ",".join(methods), "--out", str(out), "--quiet"]


def run_jobs(argv: Sequence[str], counts: dict[str, int], jobs: int, out: Path, *,
             echo: Callable[[str], None] = print) -> dict:
    """Run the unfinished runs of the methods in ``counts`` (method → unfinished runs) in at most ``jobs``
    worker processes and merge them into ``out`` (module docstring). ``argv`` holds the caller's
    ``compare`` arguments. Returns the record written to OUT/jobs.json."""
    groups = deal(counts, jobs)
    root = Path(str(out) + ".jobs")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, len(groups)))))
    t0 = time.perf_counter()
    workers = []
    for k, group in enumerate(groups):
        part = root / str(k)
        if part.exists():
            shutil.rmtree(part)
        merge(out, part, set(group), records_only=True)  # what OUT has finished of these is skipped there
        log = open(root / f"{k}.log", "w", encoding="utf-8")
        cmd = [sys.executable, "-m", "geoprobe", *worker_argv(argv, group, part)]
        workers.append((k, group, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        echo(f"[job {k + 1}/{len(groups)}] {', '.join(group)}: started ({sum(counts[m] for m in group)} run(s))")
    results = []
    for k, group, log, proc in workers:
        rc = proc.wait()
        log.close()
        seconds = time.perf_counter() - t0
        lines = (root / f"{k}.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        last = lines[-1] if lines else "no output"
        if rc:
            echo(f"[job {k + 1}/{len(groups)}] {', '.join(group)}: failed (exit {rc}) after {seconds:.0f} s: "
                 f"{last}; its unfinished runs follow here")
        else:
            echo(f"[job {k + 1}/{len(groups)}] {', '.join(group)}: finished after {seconds:.0f} s")
        results.append({"job": k, "methods": group, "exit": rc, "seconds": round(seconds, 1), "last_line": last})
    wall = time.perf_counter() - t0
    for k, group, _, _ in workers:
        merge(root / str(k), out)
    if not (out / "comparison.json").is_file():  # no worker got as far as its settings: say why, keep the logs
        first = next(r for r in results if r["exit"])
        raise ComparisonError(f"--jobs: every worker failed before its first run; job {first['job'] + 1} said: "
                              f"{first['last_line']} (logs in {root})")
    (out / "logs").mkdir(exist_ok=True)
    for k, _, _, _ in workers:
        shutil.copy2(root / f"{k}.log", out / "logs" / f"job{k}.log")
    shutil.rmtree(root, ignore_errors=True)
    record = {"jobs": len(groups), "asked": jobs, "workers": results, "wall_seconds": round(wall, 1),
              "threads_per_worker": env["OMP_NUM_THREADS"]}
    tmp = out / f".{JOBS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(out / JOBS_FILE)
    return record
