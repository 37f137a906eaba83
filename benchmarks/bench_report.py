"""Rendering the HTML report: our figure settings beside matplotlib's defaults, same figures.

Ours: fixed margins in inches (no layout-engine pass), plain-text decade tick labels on log axes,
SVG text as ``<text>`` (``svg.fonttype = 'none'``). Matplotlib defaults: constrained layout,
mathtext tick labels (``$10^{3}$``, parsed by pyparsing on every draw), glyphs as paths
(``svg.fonttype = 'path'``). Both render the same synthetic 30-layer profile (tests/profile_factory)
to the same page; we report the median wall time of interleaved runs and the page size.

Run: python benchmarks/bench_report.py   → appends a run to benchmarks/results/report.json
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from profile_factory import make_profile  # noqa: E402

from benchmarks.results_log import append_run, results_path  # noqa: E402
from geoprobe.report import plots, render_html  # noqa: E402


@contextlib.contextmanager
def matplotlib_defaults():
    """Swap our figure settings for matplotlib's defaults for the duration of the block."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    saved = plots._RC.copy(), plots._figure, plots._log

    def figure(width=plots.SMALL[0], height=plots.SMALL[1], **_margins):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        return fig, [fig.add_subplot(1, 1, 1)]

    def log(ax, axis="both"):
        for name in ("x", "y") if axis == "both" else (axis,):
            getattr(ax, f"set_{name}scale")("log")

    plots._RC["svg.fonttype"] = "path"
    plots._figure, plots._log = figure, log
    try:
        yield
    finally:
        plots._RC.clear()
        plots._RC.update(saved[0])
        plots._figure, plots._log = saved[1], saved[2]


def main(repeats: int = 5) -> dict:
    single = [make_profile(adapter_plan=True, finetune=True)]
    pair = [make_profile(), make_profile("all-MiniLM-L6-v2", seed=1, n_layers=6, hidden=384,
                                         vocab=30522, zipf_s=1.05)]
    render_html(single)                                   # warm up imports and font cache
    with matplotlib_defaults():
        render_html(single)
    out: dict = {"machine": platform.machine(), "python": platform.python_version(),
                 "cpu_count": os.cpu_count(), "repeats": repeats, "cases": {}}
    for name, profiles in (("one model", single), ("two models", pair)):
        times: dict[str, list[float]] = {"ours": [], "matplotlib defaults": []}
        sizes: dict[str, int] = {}
        for _ in range(repeats):                          # interleaved runs
            for variant in times:
                ctx = matplotlib_defaults() if variant != "ours" else contextlib.nullcontext()
                with ctx:
                    t0 = time.perf_counter()
                    page = render_html(profiles)
                    times[variant].append(time.perf_counter() - t0)
                sizes[variant] = len(page.encode("utf-8"))
        out["cases"][name] = {
            v: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
                "page_bytes": sizes[v]} for v, t in times.items()}
        out["cases"][name]["figures"] = page.count('<figure class="plot')
        ours = out["cases"][name]["ours"]["median_s"]
        base = out["cases"][name]["matplotlib defaults"]["median_s"]
        out["cases"][name]["speedup"] = round(base / ours, 2)
        print(f"{name} ({out['cases'][name]['figures']} figures): ours {ours:.2f} s ({sizes['ours'] / 1e3:.0f} kB), matplotlib defaults "
              f"{base:.2f} s ({sizes['matplotlib defaults'] / 1e3:.0f} kB), ×{base / ours:.2f}")
    append_run(results_path("report"), out)
    return out


if __name__ == "__main__":
    main()
