"""The statistics of a comparison: mean ± standard deviation over seeds, the paired per-seed difference
against LoRA with its t interval, the verdict, and the rule that says when an evaluation set cannot
separate the methods.

Paired difference. For seed k both arms are trained with the same seed (same data order, same
initialisation stream), so the per-seed differences d_k = acc(arm, k) − acc(LoRA, k) are the unit of
analysis. With n seeds, mean d̄ and standard deviation s (ddof = 1), the 95 % interval is
d̄ ± t_(0.975, n−1)·s/√n (Student's t). With 3 seeds t_(0.975, 2) = 4.30, so the interval is wide; with
fewer than 2 paired seeds there is no interval. The untrained base model (``none``) has one value for all
seeds, paired with each LoRA seed.

The seed interval says how much the training seed moves a difference on *these* test questions; it
says nothing of how the difference would change on other questions drawn like them. For accuracy the
runs keep every question's 0/1 correctness, so a second interval covers that (:func:`question_difference`):
per question q, d_q = mean over the paired seeds of correct(arm, k, q) − correct(LoRA, k, q) (the base
model's one run is paired with every LoRA seed); the mean of d_q is the mean paired accuracy difference,
and its percentile bootstrap interval resamples the questions (:data:`N_BOOT` resamples, seeded). A
set of 120 questions gives intervals of several points even when every seed agrees.

Verdict: "better than LoRA" when the seed interval lies above 0, "worse than LoRA" when it lies below 0,
"within seed noise" otherwise (and "no interval" with fewer than 2 paired seeds). Where the question
interval is known, a better/worse verdict also needs it to lie on the same side of 0; otherwise the
verdict is "within test-set noise" (:func:`combined_verdict`).

Separation rule for an evaluation set: it cannot separate the methods when every arm's mean accuracy is
below :data:`FLOOR` (5 %: a handful of questions decide such numbers, and a small model's few correct
answers are mostly luck), or when no arm's interval against LoRA excludes 0. The same floor applies to
the set's headline metric where that is not accuracy (:data:`METRICS`): F1 below 5 % (the positive class
hardly ever predicted), Matthews' correlation below 0.05 (no better than chance, which scores 0).

Metrics (:data:`METRICS`): accuracy and F1 are fractions shown in percent, their differences in
percentage points; Matthews' correlation (in [−1, 1]) is shown as it is, its differences likewise.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["LEVEL", "FLOOR", "N_BOOT", "BETTER", "WORSE", "NOISE", "TEST_NOISE", "NO_INTERVAL", "METRICS",
           "mean_std", "paired_difference", "question_difference", "combined_verdict", "verdict", "separation",
           "metric_info", "metric_text"]

LEVEL = 0.95
FLOOR = 0.05
BETTER, WORSE, NOISE, NO_INTERVAL = ("better than LoRA", "worse than LoRA", "within seed noise",
                                     "no interval (fewer than 2 paired seeds)")
TEST_NOISE = "within test-set noise"
N_BOOT = 2000
"""Bootstrap resamples of the questions behind :func:`question_difference`."""


METRICS: dict[str, dict[str, Any]] = {
    "accuracy": {"name": "accuracy", "label": "accuracy", "percent": True},
    "f1": {"name": "f1", "label": "F1", "percent": True},
    "mcc": {"name": "mcc", "label": "MCC", "percent": False},
}
"""How each headline metric is named and shown: ``percent`` metrics (fractions) in %, differences in pp."""


def metric_info(metric: str) -> dict[str, Any]:
    """``{"name", "label", "percent"}`` of ``metric`` (:data:`METRICS`; an unknown name is shown as it is)."""
    return dict(METRICS.get(metric, {"name": metric, "label": metric, "percent": False}))


def metric_text(value: Optional[float], metric: str) -> str:
    """``value`` as the table shows it: ``61.2 %`` for a percent metric, ``0.412`` otherwise."""
    if value is None:
        return "—"
    info = metric_info(metric)
    return f"{info['label']} {100 * value:.1f} %" if info["percent"] else f"{info['label']} {value:.3f}"


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "mean", "std"}`` of ``values``: the sample standard deviation (ddof = 1), None for one value."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "mean": None, "std": None}
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None}


def paired_difference(arm: Sequence[float], lora: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """The paired difference arm − LoRA over seeds (equal-length sequences, seed k at index k): its
    ``n``, ``mean``, ``std``, Student-t interval ``low``/``high`` at ``level`` (None with n < 2), the
    ``t_quantile`` used and the :func:`verdict`."""
    from scipy import stats

    a, b = np.asarray(list(arm), dtype=np.float64), np.asarray(list(lora), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    d = a - b
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "mean": float(d.mean()) if n else None, "std": None, "low": None,
                           "high": None, "t_quantile": None, "level": level, "differences": d.tolist()}
    if n >= 2:
        s = float(d.std(ddof=1))
        q = float(stats.t.ppf(0.5 + level / 2, n - 1))
        half = q * s / math.sqrt(n)
        out.update(std=s, t_quantile=q, low=float(d.mean()) - half, high=float(d.mean()) + half)
    out["verdict"] = verdict(out["low"], out["high"])
    return out


def question_difference(arm: Sequence[Sequence[int]], lora: Sequence[Sequence[int]], level: float = LEVEL,
                        n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The paired accuracy difference arm − LoRA with an interval over test questions (module docstring).

    ``arm`` and ``lora`` hold one 0/1 correctness vector per paired seed (the same questions in the same
    order in every vector). Returns ``n_questions``, ``mean`` (= the mean over seeds of the accuracy
    difference), the percentile bootstrap ``low``/``high`` at ``level`` over ``n_boot`` resamples of the
    questions (numpy generator seeded with ``seed``), and ``how``.

    Raises:
        ValueError: no seeds, or vectors of unequal lengths.
    """
    a = np.asarray([list(v) for v in arm], dtype=np.float64)
    b = np.asarray([list(v) for v in lora], dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"paired correctness needs equal, non-empty seed × question arrays, got {a.shape} and "
                         f"{b.shape}")
    d = (a - b).mean(axis=0)  # per question, averaged over the paired seeds
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for i in range(n_boot):  # one resample at a time: memory stays O(questions)
        means[i] = d[rng.integers(0, d.size, d.size)].mean()
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return {"n_questions": int(d.size), "mean": float(d.mean()), "low": float(lo), "high": float(hi),
            "level": level, "n_boot": n_boot,
            "how": f"percentile bootstrap over {d.size} questions ({n_boot} resamples) of the per-question "
                   f"difference averaged over {a.shape[0]} paired seed(s)"}


def combined_verdict(difference: dict[str, Any]) -> str:
    """The verdict of a paired difference with its seed interval and, where present (``questions``), its
    interval over test questions: better/worse only when both lie on that side of 0."""
    seeds = verdict(difference.get("low"), difference.get("high"))
    q = difference.get("questions")
    if seeds not in (BETTER, WORSE) or not q:
        return seeds
    return seeds if verdict(q.get("low"), q.get("high")) == seeds else TEST_NOISE


def verdict(low: Optional[float], high: Optional[float]) -> str:
    """The plain reading of a difference's interval (module docstring)."""
    if low is None or high is None:
        return NO_INTERVAL
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NOISE


def separation(means: dict[str, Optional[float]], differences: dict[str, dict[str, Any]],
               floor: float = FLOOR, metric: str = "accuracy") -> dict[str, Any]:
    """Whether an evaluation set separates the methods (module docstring): ``{"separates", "reason"}``;
    ``means`` and ``differences`` are in ``metric``."""
    known = {k: v for k, v in means.items() if v is not None}
    if known and all(v < floor for v in known.values()):
        info, top = metric_info(metric), max(known.values())
        if info["percent"]:
            where = f"below {100 * floor:g} % (highest {100 * top:.1f} %)"
        else:
            where = f"below {floor:g} (highest {top:.3f}; chance scores 0)"
        return {"separates": False, "reason": f"every method's mean {info['label']} is {where}: too low to "
                                              "separate methods"}
    decided = [k for k, d in differences.items() if d.get("verdict") in (BETTER, WORSE)]
    if not decided:
        with_interval = [k for k, d in differences.items() if d.get("low") is not None]
        test_noise = [k for k, d in differences.items() if d.get("verdict") == TEST_NOISE]
        if test_noise:
            reason = (f"the seed interval against LoRA excludes 0 for {', '.join(test_noise)}, but the interval "
                      "over test questions does not: no method differs from LoRA beyond the noise of the test set")
        elif with_interval:
            reason = "every interval against LoRA contains 0: no method differs from LoRA beyond seed noise"
        else:
            reason = "no paired interval against LoRA (needs LoRA and at least 2 seeds)"
        return {"separates": False, "reason": reason}
    return {"separates": True, "reason": f"the intervals against LoRA exclude 0 for {', '.join(decided)}"}
