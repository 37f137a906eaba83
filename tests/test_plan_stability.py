"""Adapter plans read from the bootstrap: GeLoRA ranks from the median ID curve, smoothed, with a
growth floor at the bootstrap noise; rank ranges over replicates; `auto` on the conservative δ
verdict; and, on the real SmolLM2 with GSM8K training prompts, plans that do not change with the seed.

Oracles: the moving average and the median written out by hand, the budget rule applied to hand-made
curves (`gelora_ranks` itself is tested against brute force in test_gelora.py), and the seed-stability
bound of the issue (Σ|r_a − r_b| / Σ r_a ≤ 0.25, curvature within 10 %, the same method).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from adapters.gelora import gelora_ranks
from adapters.plan import (DEFAULT_GROWTH_FLOOR, growth_noise, layer_dimensions, plan_adapters,
                           smooth_ids)
from geoprobe.errors import PlanError
from profile_factory import make_profile

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def _with_replicates(profile, reps: np.ndarray):
    """``profile`` with layer l's TwoNN replicates set to column l of ``reps`` (B × layers)."""
    layers = [dataclasses.replace(lg, twonn=dataclasses.replace(lg.twonn, replicates=[float(v) for v in reps[:, i]]))
              for i, lg in enumerate(profile.layers)]
    return profile.with_updates(layers=layers)


def test_smooth_ids_is_the_centred_three_layer_mean():
    d = np.array([1.0, 4.0, 2.0, 8.0, 5.0])
    assert smooth_ids(d).tolist() == pytest.approx([2.5, 7 / 3, 14 / 3, 5.0, 6.5])
    assert smooth_ids([3.0, 1.0]).tolist() == [3.0, 1.0]


def test_layer_dimensions_are_replicate_medians_and_skip_incomplete_replicates():
    profile = make_profile(n_layers=6)
    rng = np.random.default_rng(0)
    reps = rng.normal(5.0, 0.3, size=(41, 7))
    reps[3, 2] = np.nan  # a replicate where one layer had no estimate
    ids, kept = layer_dimensions(_with_replicates(profile, reps))
    full = np.delete(reps, 3, axis=0)
    assert kept.shape == (40, 7)
    assert ids.tolist() == pytest.approx(np.median(full, axis=0).tolist())
    ids0, none = layer_dimensions(profile)  # no replicates stored: the estimates
    assert none is None and ids0.tolist() == [lg.twonn.dimension for lg in profile.layers]


def test_growth_noise_is_the_median_bootstrap_sd_of_smoothed_growth():
    rng = np.random.default_rng(1)
    reps = np.cumsum(rng.normal(0.2, 0.1, size=(300, 9)), axis=1)
    sm = np.array([smooth_ids(r) for r in reps])
    expected = np.median(np.diff(sm, axis=1).std(axis=0, ddof=1))
    assert growth_noise(reps) == pytest.approx(expected)
    assert growth_noise(None) == DEFAULT_GROWTH_FLOOR
    assert growth_noise(np.ones((50, 9))) == DEFAULT_GROWTH_FLOOR  # no spread: the floor


def test_plan_ranks_and_ranges_come_from_the_replicates():
    profile = make_profile(n_layers=8)
    rng = np.random.default_rng(2)
    curve = np.array([2.0, 3.0, 4.5, 5.0, 6.5, 6.6, 6.4, 6.0, 5.5])
    reps = curve + rng.normal(0, 0.2, size=(200, 9))
    p = _with_replicates(profile, reps)
    plan = plan_adapters(p, method="gelora", r=8)
    ids, kept = layer_dimensions(p)
    eps = growth_noise(kept)
    costs = [2 * p.model.hidden_size * len(plan.target_modules)] * 8
    sm = smooth_ids(ids)
    assert plan.layer_ranks == gelora_ranks(sm[:-1], sm[1:], rule="budget", r=8, floor=1,
                                            n_params_fn=costs, eps=eps)
    per = np.array([gelora_ranks(smooth_ids(r)[:-1], smooth_ids(r)[1:], rule="budget", r=8, floor=1,
                                 n_params_fn=costs, eps=eps) for r in kept])
    lo, hi = np.quantile(per, [0.025, 0.975], axis=0)
    assert plan.rank_ranges == [[int(np.floor(a)), int(np.ceil(b))] for a, b in zip(lo, hi)]
    assert plan.id_curve == pytest.approx(sm.round(4).tolist())
    assert "bootstrap" in plan.reasons["ranks"]
    # identical replicates: every range collapses onto the planned rank
    same = _with_replicates(profile, np.tile(curve, (20, 1)))
    flat = plan_adapters(same, method="gelora", r=8)
    assert flat.rank_ranges == [[r, r] for r in flat.layer_ranks]


def test_auto_decides_on_the_conservative_verdict_and_quotes_the_intervals():
    for side, expected in (("below", "hyplora+gelora"), ("within", "gelora"), ("above", "gelora")):
        profile = make_profile(n_layers=6, delta_prompt_side=side)
        plan = plan_adapters(profile, method="auto", r=8)
        assert (profile.delta_prompts.verdict == "below") == (plan.method == "hyplora+gelora")
        assert plan.method == expected
        reason = plan.reasons["hyperbolic"]
        dp = profile.delta_prompts
        assert f"{dp.ci_low:.4f}" in reason and f"{dp.ci_high:.4f}" in reason
        for c in dp.nulls:
            assert f"[{c.diff_ci_low:+.4f}, {c.diff_ci_high:+.4f}]" in reason


def test_a_profile_without_layer_dimensions_is_refused():
    profile = make_profile(n_layers=4)
    broken = profile.with_updates(layers=profile.layers[:3])
    with pytest.raises(PlanError, match="needs 5"):
        plan_adapters(broken, method="gelora")


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason="needs ../shared/data/gsm8k")
def test_plans_on_smollm2_do_not_change_with_the_seed():
    """SmolLM2-135M-Instruct planned from the GSM8K training prompts (the quick probe `geoprobe run`
    makes) with seeds 0 and 1: the same method, curvature within 10 %, Σ|r_a − r_b|/Σ r_a ≤ 0.25."""
    import geoprobe as gp
    from adapters.data import load_examples
    from geoprobe.workflows import plan_for_training

    lm = gp.load_model()
    examples = load_examples(GSM8K_TRAIN)
    made = [plan_for_training(lm, examples, method="hyplora+gelora", seed=s) for s in (0, 1)]
    (a, pa), (b, pb) = made
    autos = [plan_adapters(prof, method="auto") for prof in (pa, pb)]
    assert abs(a.curvature - b.curvature) / a.curvature <= 0.10
    ra, rb = np.array(a.layer_ranks), np.array(b.layer_ranks)
    assert np.abs(ra - rb).sum() / ra.sum() <= 0.25, (a.layer_ranks, b.layer_ranks)
    assert autos[0].method == autos[1].method
    assert len(a.rank_ranges) == len(a.layer_ranks) and all(lo <= hi for lo, hi in a.rank_ranges)
