"""One `geoprobe compare` spread over several processes that share one GPU, then merged into one folder.

A 135M-parameter model leaves a large GPU mostly idle: its training step is bound by the host launching
kernels, not by the GPU. Several comparison processes, each with its own share of the methods, then run
side by side at nearly the speed of one. Each group of methods runs as its own comparison in
``OUT.parts/<k>`` (the same settings, so the same ``comparison.json``); the finished runs, predictions,
adapters and plans are then merged into OUT, and one last ``geoprobe compare`` over every method skips
the finished runs, trains any that a group did not finish, writes the summary and the report, and
probes the fine-tuned models when ``--probe-after`` is given (only the last pass probes).

Run times of runs that shared the GPU are those of a shared GPU: the summary's per-run seconds and
throughputs are not single-process figures (``benchmarks/bench_small_train.py`` measures those).

    python benchmarks/parallel_compare.py --groups "none,lora;dora;gelora;hyplora" -- MODEL --data ... --out OUT

Everything after ``--`` is passed to `geoprobe compare` (without ``--methods``, which the groups give).
Exit status: that of the last pass.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _value(args: list[str], flag: str) -> str:
    for k, a in enumerate(args):
        if a == flag and k + 1 < len(args):
            return args[k + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise SystemExit(f"parallel_compare: the compare arguments need {flag}")


def _without(args: list[str], flag: str, takes_value: bool) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = takes_value
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def merge(part: Path, dest: Path) -> list[str]:
    """Copy the finished runs of comparison folder ``part`` (with their predictions and adapters) and its
    plans into ``dest``; returns the run names copied."""
    dest.mkdir(parents=True, exist_ok=True)
    settings = part / "comparison.json"
    if not settings.is_file():
        return []
    if not (dest / "comparison.json").is_file():
        shutil.copy2(settings, dest / "comparison.json")
    elif json.loads(settings.read_text())["settings"] != json.loads((dest / "comparison.json").read_text())["settings"]:
        raise SystemExit(f"parallel_compare: {part} was run with other settings than {dest}")
    copied = []
    for run in sorted((part / "runs").glob("*.json")):
        name = run.stem
        for sub, item in (("predictions", f"{name}.json"), ("adapters", name)):
            src = part / sub / item
            if src.exists():
                (dest / sub).mkdir(exist_ok=True)
                target = dest / sub / item
                if src.is_dir():
                    shutil.copytree(src, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, target)
        (dest / "runs").mkdir(exist_ok=True)
        shutil.copy2(run, dest / "runs" / run.name)  # the run's own record last: it marks the run finished
        copied.append(name)
    for plan in sorted((part / "plans").glob("*")) if (part / "plans").is_dir() else []:
        (dest / "plans").mkdir(exist_ok=True)
        if not (dest / "plans" / plan.name).exists():
            shutil.copy2(plan, dest / "plans" / plan.name)
    return copied


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: parallel_compare.py --groups 'a,b;c' [--threads N] -- <geoprobe compare arguments>")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True, help="method groups, ';' between groups, ',' within one")
    ap.add_argument("--threads", type=int, default=4, help="CPU threads of each process (OMP_NUM_THREADS)")
    opts = ap.parse_args(argv[:cut])
    compare = _without(argv[cut + 1:], "--methods", True)
    dest = Path(_value(compare, "--out"))
    groups = [g.strip() for g in opts.groups.split(";") if g.strip()]
    parts = Path(str(dest) + ".parts")
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    t0 = time.perf_counter()
    procs = []
    for k, group in enumerate(groups):
        part = parts / str(k)
        part.mkdir(parents=True, exist_ok=True)
        args = _without(_without(compare, "--out", True), "--probe-after", False)
        cmd = [sys.executable, "-m", "geoprobe", "compare", *args, "--methods", group, "--out", str(part)]
        log = open(parts / f"{k}.log", "w")
        procs.append((group, part, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                         cwd=ROOT)))
        print(f"group {k} ({group}): started", flush=True)
    for group, part, log, proc in procs:
        rc = proc.wait()
        log.close()
        print(f"group {group}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            print((parts / f"{procs.index((group, part, log, proc))}.log").read_text()[-3000:], flush=True)
    parallel_s = time.perf_counter() - t0
    for group, part, _, _ in procs:
        print(f"merged from {part}: {', '.join(merge(part, dest)) or 'nothing'}", flush=True)
    methods = ",".join(m for g in groups for m in g.split(","))
    last = subprocess.run([sys.executable, "-m", "geoprobe", "compare", *compare, "--methods", methods], cwd=ROOT)
    total_s = time.perf_counter() - t0
    (dest / "parallel.json").write_text(json.dumps(
        {"groups": groups, "processes": len(groups), "threads_per_process": opts.threads,
         "parallel_wall_seconds": round(parallel_s, 1), "total_wall_seconds": round(total_s, 1)}, indent=1))
    print(f"parallel part {parallel_s:.0f} s, total {total_s:.0f} s", flush=True)
    return last.returncode


if __name__ == "__main__":
    sys.exit(main())
