"""The HTML report of a ``geoprobe compare`` run, rendered from its summary JSON alone (the contract:
``OUT/summary.json``, see :mod:`geoprobe.compare`). One self-contained page: the results table per
evaluation set in its headline metric (accuracy; F1 for MRPC, Matthews' correlation for CoLA, as the
summary's ``metrics`` name them: mean ± std over seeds, the paired difference against LoRA with its
interval and the verdict), whether each set separates the methods, what ``auto`` chose, the parameter
budgets, the cost of every run, and the settings. Every string from the summary (model, data and method names, plan reasons, commands) is escaped
by :mod:`.markup`."""
from __future__ import annotations

import os
import string
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

from .. import __version__
from ..records import write_text
from .markup import DASH, Markup, el, esc, interval, join, kv_table, num, pm, raw, seconds, table, value_text

__all__ = ["render_comparison_html", "render_comparison"]

_SECTIONS = (("results", "Results against LoRA"), ("after", "Before and after fine-tuning"),
             ("budgets", "Equal parameter budgets"),
             ("plans", "Plans"), ("cost", "Time and memory per run"), ("settings", "Settings"))


def _template(name: str) -> str:
    return resources.files("geoprobe.report").joinpath("templates", name).read_text(encoding="utf-8")


def _pct(x: Any) -> str:
    return DASH if x is None else f"{100 * x:.1f} %"


_ACCURACY = {"name": "accuracy", "label": "accuracy", "percent": True}


def _pm_metric(cell: Optional[Mapping[str, Any]], percent: bool) -> str:
    mean, std = (cell or {}).get("mean"), (cell or {}).get("std")
    if mean is None:
        return DASH
    if percent:
        return pm(100 * mean, None if std is None else 100 * std, 2) + " %"
    return pm(mean, std, 2)


def _diff(d: Optional[Mapping[str, Any]], percent: bool = True) -> str:
    if not d or d.get("mean") is None:
        return DASH
    k = 100 if percent else 1
    scale = lambda v: None if v is None else k * v  # noqa: E731 - percentage points for a percent metric
    return interval(scale(d["mean"]), scale(d.get("low")), scale(d.get("high")), signed=True) + (
        " pp" if percent else "")


def _results(summary: Mapping[str, Any]) -> Markup:
    parts = [el("p", "Each evaluation set in its metric (accuracy; F1 for MRPC, Matthews' correlation for CoLA): "
                     "mean ± standard deviation over seeds; difference against LoRA paired by seed (percentage "
                     f"points for accuracy and F1), with its {100 * summary.get('level', 0.95):g} % "
                     "Student-t interval. ", esc(summary.get("rules", {}).get("interval", "")), " ",
                     esc(summary.get("rules", {}).get("question_interval", "")), " ",
                     esc(summary.get("rules", {}).get("verdict", "")))]
    for name, rows in summary.get("table", {}).items():
        sep = summary.get("separation", {}).get(name, {})
        info = summary.get("metrics", {}).get(name) or _ACCURACY
        percent, second = bool(info.get("percent")), info.get("name") != "accuracy"
        body = []
        for arm, cell in rows.items():
            d = cell.get("difference")
            row = [arm, str(cell.get("n", 0)), _pm_metric(cell, percent)]
            if second:
                row.append(_pm_metric(cell.get("accuracy"), True))
            q = (d or {}).get("questions")
            body.append(row + [_diff(d, percent), _diff(q, percent) if q else DASH,
                               (d or {}).get("verdict", "reference" if arm == summary.get("reference") else DASH)])
        label = str(info.get("label", "accuracy"))
        head = ["method", "seeds", label] + (["accuracy"] if second else []) + [
            f"{label} vs LoRA (same seed)", f"{label} vs LoRA over test questions", "verdict"]
        parts.append(el("h3", name))
        parts.append(table(head, body, numeric=set(range(1, len(head) - 1))))
        parts.append(el("p", el("strong", "Separates the methods: " if sep.get("separates")
                                else "Cannot separate the methods: "), esc(sep.get("reason", ""))))
    auto = summary.get("auto")
    if auto:
        items = [("auto built", auto.get("chosen")), ("why", auto.get("reason")),
                 ("HydraLoRA heads", auto.get("n_heads") if "hydralora" in str(auto.get("chosen")) else "none"),
                 ("heads: why", auto.get("heads_reason"))]
        parts.append(kv_table([(k, DASH if v is None else str(v)) for k, v in items], caption="What auto chose"))
    for note in summary.get("notes", []):
        parts.append(el("p", note, class_="note"))
    return join(parts)


def _signed(x: Any, digits: int = 3) -> str:
    return DASH if x is None else f"{x:+.{digits}f}".replace("-", "\u2212")


def _mean_sd(cell: Mapping[str, Any]) -> str:
    if cell.get("mean") is None:
        return DASH
    sd = cell.get("std")
    return _signed(cell["mean"]) + ("" if sd is None else f" ± {sd:.3f}")


def _shift_text(c: Optional[Mapping[str, Any]]) -> str:
    if not c:
        return DASH
    return interval(c["difference"], c.get("low"), c.get("high"), signed=True, sig=3) + (" *" if c.get("moved") else "")


def _after(summary: Mapping[str, Any]) -> Optional[Markup]:
    after = summary.get("after")
    if not after:
        return None
    rules = after.get("rules", {})
    parts = [el("p", "Each fine-tuned model probed on the training prompts with the base model's settings and seed, "
                     "against the base model. ", esc(rules.get("delta", "")), "; ", esc(rules.get("twonn", "")), "; ",
                     esc(rules.get("moved", "")), " (marked *). ", esc(rules.get("embeddings", "")), ".")]
    for method, agg in after.get("by_method", {}).items():
        rows = []
        for row in agg.get("layers", []):
            t, d = row["twonn"], row["delta"]
            rows.append([str(row["layer"]), num(t.get("before"), 3), _mean_sd(t), f"{t['moved']} of {t['n']}",
                         num(d.get("before"), 3), _mean_sd(d), f"{d['moved']} of {d['n']}"])
        parts.append(el("h3", method))
        parts.append(table(["layer", "ID before", "ID change (mean ± sd over seeds)", "runs moved", "δ_rel before",
                            "δ_rel change", "runs moved"], rows, numeric={0, 1, 2, 4, 5}))
    for run, shift in after.get("runs", {}).items():
        rows = [[str(x["layer"]), _shift_text(x.get("twonn")), _shift_text(x.get("delta"))]
                for x in shift.get("layers", [])]
        emb = shift.get("delta_prompts")
        how = after.get("how", {}).get(run, "")
        parts.append(el("details", el("summary", f"{run}: {how}"),
                        table(["layer", "ID change [interval]", "per-prompt δ_rel change [interval]"], rows,
                              numeric={0, 1, 2}),
                        el("p", "Input-embedding δ_rel change: ", _shift_text(emb), ".")))
    return join(parts)


def _budgets(summary: Mapping[str, Any]) -> Markup:
    b = summary.get("budget", {})
    rows = [[arm, v.get("method", ""), num(v.get("parameters")), f"{v.get('ratio', float('nan')):.4f}", v.get("rule", "")]
            for arm, v in summary.get("budgets", {}).items()]
    head = f" Besides the adapters, {b['head_rule']}." if b.get("head_rule") else ""
    return join([el("p", f"Budget: a LoRA of rank {b.get('r')} on the targets, {num(b.get('lora_parameters'))} "
                         f"trainable parameters; every method within ±{100 * b.get('tolerance', 0.05):g} %.{head}"),
                 table(["method", "built as", "parameters", "ratio to LoRA", "how"], rows, numeric={2, 3})])


def _plans(summary: Mapping[str, Any]) -> Optional[Markup]:
    plans = summary.get("plans", {})
    if not plans:
        return None
    parts = []
    for arm, plan in plans.items():
        items = [("method built", plan.get("method"))]
        for key in ("curvature", "n_heads", "layer_ranks", "rank_rule"):
            if plan.get(key) is not None:
                items.append((key, value_text(plan[key])))
        items.extend((f"reason: {k}", v) for k, v in (plan.get("reasons") or {}).items())
        parts.append(kv_table(items, caption=arm))
    return join(parts)


def _cost(summary: Mapping[str, Any]) -> Markup:
    rows = []
    for r in summary.get("runs", []):
        mem = r.get("peak_memory_bytes")
        rows.append([r.get("run", ""), r.get("device", ""), seconds(r.get("train_seconds")),
                     seconds(r.get("eval_seconds")),
                     num(r.get("tokens_per_second")) if r.get("tokens_per_second") else DASH,
                     DASH if mem is None else f"{mem / 2**30:.2f} GiB", r.get("peak_memory_kind", "")])
    total = summary.get("total", {})
    return join([table(["run", "device", "training", "evaluation", "tokens/s", "peak memory", "memory measured as"],
                       rows, numeric={2, 3, 4, 5}),
                 el("p", f"Total device time of the runs: {seconds(total.get('device_seconds'))} "
                         f"({total.get('runs_done', 0)} of {total.get('runs_total', 0)} runs done).")])


def _settings(summary: Mapping[str, Any], command: Optional[str]) -> Markup:
    items = [(k, value_text(v)) for k, v in (summary.get("settings") or {}).items()]
    if command:
        items.insert(0, ("command", command))
    items.append(("versions", value_text(summary.get("versions", {}))))
    return kv_table(items)


def render_comparison_html(summary: Mapping[str, Any], *, command: Optional[str] = None) -> str:
    """The report page of a comparison summary (a dict as written to ``OUT/summary.json``)."""
    builders = {"results": lambda: _results(summary), "after": lambda: _after(summary),
                "budgets": lambda: _budgets(summary),
                "plans": lambda: _plans(summary), "cost": lambda: _cost(summary),
                "settings": lambda: _settings(summary, command or summary.get("command"))}
    sections = []
    for key, title in _SECTIONS:
        content = builders[key]()
        if content is not None:
            sections.append((key, title, el("section", el("h2", title), content, id=key, class_="report-section")))
    toc = el("ol", [el("li", el("a", title, href=f"#{key}")) for key, title, _ in sections])
    title = f"Comparison: {summary.get('model', '')}"
    subtitle = join([f"trained on {summary.get('data', '')} · evaluated on {', '.join(summary.get('evals', []))} · "
                     f"{len(summary.get('seeds', []))} seed(s) · geoprobe {__version__}"])
    footer = join([f"Written by geoprobe {__version__}. Self-contained: styles are inline; the page loads nothing."])
    return string.Template(_template("report.html")).substitute(
        title=esc(title), subtitle=subtitle, generator=esc(f"geoprobe {__version__}"),
        css=raw(_template("report.css")), toc=toc, body=Markup("\n").join(s for _, _, s in sections), footer=footer)


def render_comparison(summary: Mapping[str, Any], path: str | os.PathLike, *, command: Optional[str] = None) -> Path:
    """Render ``summary`` (:func:`render_comparison_html`) and write it to ``path`` atomically."""
    return write_text(path, render_comparison_html(summary, command=command))
