"""``geoprobe compare``: a fair multi-seed comparison of adapter methods at an equal parameter budget.

* :mod:`.arms`: what ``--methods`` names and how every arm meets the LoRA budget within ±5 %;
* :mod:`.stats`: mean ± std over seeds, the paired per-seed difference against LoRA with its t interval,
  the verdict and the rule for evaluation sets that cannot separate the methods;
* :mod:`.workflow`: :func:`compare`, resumable run by run, writing OUT/runs/*.json, OUT/summary.json and
  OUT/report.html; a causal LM generates its answers, an encoder on GLUE data classifies them with a
  head trained beside the adapters (:func:`check_protocol`), each set scored by its task's metric.

With :mod:`geoprobe.workflows` and :mod:`geoprobe.cli`, this package is the part of ``geoprobe`` that
imports ``adapters``, inside its functions.
"""
from .arms import MATCHED, NONE, OFFICIAL, TOLERANCE, Arm, Budget, arms, choices, match_budget, parameter_count, parse_methods
from .stats import paired_difference, separation, verdict
from .workflow import (ComparisonResult, EvalSet, check_eval_sets, check_protocol, compare, format_table, run_name,
                       summarize)

__all__ = ["MATCHED", "NONE", "OFFICIAL", "TOLERANCE", "Arm", "Budget", "arms", "choices", "parse_methods", "match_budget",
           "parameter_count", "paired_difference", "verdict", "separation", "EvalSet", "ComparisonResult",
           "compare", "check_eval_sets", "check_protocol", "summarize", "format_table", "run_name"]
