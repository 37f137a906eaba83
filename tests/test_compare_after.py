"""Before and after fine-tuning (geoprobe.compare.after): the move of per-prompt δ_rel against scipy's paired
bootstrap at the expanded level, the move of the intrinsic dimension from paired replicates and from two
standard errors, and the fine-tuned model given merged (equal to the model through the adapter) or through
the adapter, the base model left as it was either way. The probe of a real comparison is in
tests/test_compare_glue_e2e.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

import adapters
import tiny_models
from geoprobe.compare.after import MERGED, THROUGH, delta_shift, how_probed, id_shift, tuned_model
from geoprobe.models.common import finish
from geoprobe.probes.uncertainty import expanded_level
from geoprobe.profile import DeltaStat, IDResult

pytestmark = pytest.mark.usefixtures("one_thread")


def _delta(values) -> DeltaStat:
    v = np.asarray(values, dtype=np.float64)
    return DeltaStat(what="prompts", mean=float(v.mean()), std=float(v.std()), n_points=10, dim=8, n_sets=v.size,
                     mode="fixed", values=v.tolist())


def _id(dimension, error, replicates, *, groups=12, seed=0) -> IDResult:
    return IDResult(dimension=dimension, error=error, estimator="twonn", n_points=500, n_duplicates_removed=0,
                    replicates=list(replicates), n_groups=groups, n_boot=len(replicates), seed=seed)


def test_delta_shift_is_the_paired_bootstrap_of_the_mean_difference():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.3, 15)
    tuned = base + rng.normal(0.02, 0.03, 15)
    got = delta_shift(_delta(base), _delta(tuned), n_boot=20000, level=0.95, seed=1)
    assert got["paired"] and got["n"] == 15
    assert got["difference"] == pytest.approx((tuned - base).mean()) and got["before"] == pytest.approx(base.mean())
    ref = sps.bootstrap((tuned - base,), np.mean, confidence_level=expanded_level(0.95, 15), n_resamples=20000,
                        method="percentile", random_state=2).confidence_interval
    width = ref.high - ref.low
    assert got["low"] == pytest.approx(ref.low, abs=0.03 * width)
    assert got["high"] == pytest.approx(ref.high, abs=0.03 * width)
    assert got["moved"] == (got["low"] > 0 or got["high"] < 0)


def test_delta_shift_of_identical_and_shifted_sets():
    base = np.linspace(0.1, 0.3, 9)
    same = delta_shift(_delta(base), _delta(base), n_boot=500, level=0.95, seed=0)
    assert same["difference"] == 0 and same["low"] == same["high"] == 0 and not same["moved"]
    up = delta_shift(_delta(base), _delta(base + 0.05), n_boot=500, level=0.95, seed=0)
    assert up["low"] == pytest.approx(0.05) and up["high"] == pytest.approx(0.05) and up["moved"]
    unpaired = delta_shift(_delta(base), _delta(np.r_[base, 0.2] + 0.1), n_boot=4000, level=0.95, seed=0)
    assert not unpaired["paired"] and unpaired["low"] < unpaired["difference"] < unpaired["high"]
    assert delta_shift(_delta(base), None, n_boot=10, level=0.95, seed=0) is None


def test_id_shift_from_paired_replicates_and_from_standard_errors():
    rng = np.random.default_rng(3)
    reps = rng.normal(7.0, 0.4, 300)
    moved = reps + 0.3 + rng.normal(0, 0.05, 300)
    got = id_shift(_id(7.0, 0.4, reps), _id(7.3, 0.4, moved), level=0.9)
    low, high = np.quantile(moved - reps, [0.05, 0.95])
    assert got["paired"] and (got["low"], got["high"]) == pytest.approx((low, high))
    assert got["difference"] == pytest.approx(0.3) and got["moved"]
    # the paired interval is far narrower than one that ignores the pairing
    other = id_shift(_id(7.0, 0.4, reps, groups=11), _id(7.3, 0.4, moved), level=0.9)
    z = sps.norm.ppf(0.95) * np.hypot(0.4, 0.4)
    assert not other["paired"] and (other["low"], other["high"]) == pytest.approx((0.3 - z, 0.3 + z))
    assert not other["moved"] and got["high"] - got["low"] < (other["high"] - other["low"]) / 5


def _tiny_lm():
    return finish(tiny_models.tiny_llama(0), tiny_models.bpe_tokenizer(), name="tiny-llama", source="folder",
                  device="cpu", dtype=None, causal=True)


def _saved_adapter(lm, method, folder, **kw):
    """An adapter of ``method`` with every weight random (so that it changes the model), saved to ``folder``."""
    peft_model = adapters.build(lm.model, method, r=4, **kw)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and p.dtype.is_floating_point and "lora_" in name:
                p.normal_(0, 0.3)
    adapters.save(peft_model, folder)
    from adapters.build import unload

    unload(peft_model)


def _hidden(model, ids):
    with torch.no_grad():
        return torch.stack(model(input_ids=ids, output_hidden_states=True).hidden_states)


@pytest.mark.parametrize("method, kw", [("lora", {}), ("hyplora", {})])
def test_tuned_model_merged_or_through_the_adapter_leaves_the_base_as_it_was(tmp_path, method, kw):
    lm = _tiny_lm()
    _saved_adapter(lm, method, tmp_path / "adapter", **kw)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 12))
    base_h = _hidden(lm.model, ids)
    reference = adapters.load(_tiny_lm().model, tmp_path / "adapter")  # the adapter in the forward pass
    ref_h = _hidden(reference, ids)
    assert how_probed(method) == (MERGED if method == "lora" else THROUGH)
    with tuned_model(lm, tmp_path / "adapter", method) as tuned:
        tuned_h = _hidden(tuned.model, ids)
        if method == "lora":  # merged into a copy: a plain model, not the base
            assert tuned.model is not lm.model and not any("lora_" in n for n, _ in tuned.model.named_parameters())
        else:  # through the adapter, on the base model itself
            assert tuned.model.get_base_model() is lm.model
    torch.testing.assert_close(tuned_h, ref_h, rtol=1e-4, atol=1e-5)
    assert (tuned_h - base_h).abs().max() > 1e-3  # the adapter changed the model
    after = lm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(_hidden(lm.model, ids), base_h, rtol=0, atol=0)
