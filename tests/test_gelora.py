"""GeLoRA rank rules and their PEFT config (adapters.gelora).

Oracles: hand-computed ranks, brute-force enumeration of integer rank vectors, and stock PEFT
itself (the ranks/alphas it builds from the config, its trainable-parameter count, its save/load).
"""
from __future__ import annotations

import functools
import itertools
import math
import random
import re

import pytest
import torch

from adapters.gelora import (
    gelora_config,
    gelora_ranks,
    lora_parameter_count,
    params_per_rank,
    target_layers,
)
from geoprobe.errors import AdapterError, InputDataError, PlanError

import tiny_models

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


tiny_llama = functools.partial(tiny_models.tiny_llama, vocab=128, inter=96, positions=64)


def lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# --------------------------------------------------------------------------- rank rules
def test_diff_rule_hand_example():
    # block j reads d[j] and writes d[j+1]: d = [3.0, 5.2, 8.0, 7.5]
    d = [3.0, 5.2, 8.0, 7.5]
    assert gelora_ranks(d[:-1], d[1:], rule="diff") == [3, 3, 0]  # ceil(2.2), ceil(2.8), max(ceil(-0.5), 0)
    assert gelora_ranks(d[:-1], d[1:], rule="diff", cap=2) == [2, 2, 0]


def test_diff_rule_ignores_float_roundoff():
    # 4.4 − 1.4 = 3.0000000000000004 in binary floating point: rank 3, not 4
    assert 4.4 - 1.4 > 3.0
    assert gelora_ranks([1.4], [4.4], rule="diff") == [3]
    assert gelora_ranks([1.0], [3.0001], rule="diff") == [3]


def test_max_rule_hand_example():
    d = [3.0, 5.2, 8.0, 7.5]
    assert gelora_ranks(d[:-1], d[1:], rule="max") == [6, 8, 8]
    assert gelora_ranks(d[:-1], d[1:], rule="max", cap=7) == [6, 7, 7]


def test_budget_flat_ids_give_plain_rank():
    ids = [6.0] * 5
    assert gelora_ranks(ids, ids, rule="budget", r=8) == [8] * 5
    costs = [100, 300, 100, 200, 100]
    assert gelora_ranks(ids, ids, rule="budget", r=8, n_params_fn=costs) == [8] * 5


def test_budget_hand_examples():
    # scores 1+eps and 3+eps, budget 2·2 = 4 ranks → continuous 1.0005, 2.9995 → [1, 3]
    assert gelora_ranks([2.0, 3.0], [3.0, 6.0], rule="budget", r=2) == [1, 3]
    # growths 1, 4, 0, 0, budget 4·4 = 16: t = 16/5.004 → 3.198, 12.79, 0.003, 0.003 → floors 3, 12, 0, 0,
    # the last rank goes to the largest remainder (block 1)
    assert gelora_ranks([1, 2, 6, 6], [2, 6, 6, 6], rule="budget", r=4, floor=0) == [3, 13, 0, 0]
    # one growing block takes everything above the floor of the three flat ones
    assert gelora_ranks([2, 2, 6, 6], [2, 6, 6, 6], rule="budget", r=4, floor=1) == [1, 13, 1, 1]
    # with a cap of 8 the rest is spread over the flat blocks: 3·(8/3) + 8 = 16
    capped = gelora_ranks([2, 2, 6, 6], [2, 6, 6, 6], rule="budget", r=4, floor=1, cap=8)
    assert capped[1] == 8 and sum(capped) == 16 and sorted(capped[::2] + capped[3:]) == [2, 3, 3]


def _best_reachable(costs, budget, floor, cap):
    """Brute force: the largest parameter count ≤ budget any integer rank vector reaches."""
    best = -1
    for ranks in itertools.product(range(floor, cap + 1), repeat=len(costs)):
        used = sum(c * x for c, x in zip(costs, ranks))
        if used <= budget:
            best = max(best, used)
    return best


def test_budget_never_exceeds_and_hits_within_one_rank_step():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 5)
        d = [rng.uniform(1, 12) for _ in range(n + 1)]
        costs = [rng.choice([3, 5, 8, 13, 40]) for _ in range(n)]
        r = rng.randint(1, 6)
        floor = rng.randint(0, r)
        cap = rng.choice([None, rng.randint(max(floor, 1), 3 * r)])
        ranks = gelora_ranks(d[:-1], d[1:], rule="budget", r=r, floor=floor, cap=cap, n_params_fn=costs)
        budget = r * sum(costs)
        used = sum(c * x for c, x in zip(costs, ranks))
        assert used <= budget
        assert all(x >= floor and (cap is None or x <= cap) for x in ranks)
        free = [c for c, x in zip(costs, ranks) if cap is None or x < cap]
        if free:  # no block below its cap fits in what is left: within one rank step
            assert budget - used < min(free)
        if n <= 3:  # and close to the best any integer vector can do
            best = _best_reachable(costs, budget, floor, cap if cap is not None else 3 * r + 1)
            assert used <= best and best - used < max(costs)
        # the rank order follows the ID growth when every block costs the same
        uni = gelora_ranks(d[:-1], d[1:], rule="budget", r=r, floor=floor, cap=cap)
        growth = [max(o - i, 0.0) for i, o in zip(d[:-1], d[1:])]
        for a, b in itertools.combinations(range(n), 2):
            if growth[a] > growth[b] + 1e-9:
                assert uni[a] >= uni[b]


def test_budget_impossible_raises_with_numbers():
    with pytest.raises(PlanError, match=r"budget of a rank-2 LoRA is 40 parameters.*needs 60"):
        gelora_ranks([1, 2], [2, 3], rule="budget", r=2, floor=3, n_params_fn=[10, 10])
    with pytest.raises(PlanError, match="cap = 1 is below floor = 2"):
        gelora_ranks([1], [2], rule="budget", r=4, floor=2, cap=1)
    with pytest.raises(PlanError, match="unknown GeLoRA rule"):
        gelora_ranks([1], [2], rule="mean")


def test_bad_ids_raise():
    with pytest.raises(InputDataError, match="ids_in has 2 values and ids_out 1"):
        gelora_ranks([1, 2], [3])
    with pytest.raises(InputDataError, match=r"ids_out\[1\] = nan"):
        gelora_ranks([1, 2], [3, math.nan])
    with pytest.raises(InputDataError, match="no layer IDs"):
        gelora_ranks([], [])


# --------------------------------------------------------------------------- PEFT config
def test_config_gives_planned_rank_and_alpha_in_stock_peft():
    model = tiny_llama()
    cfg = gelora_config(model, {0: 3, 1: 5}, target_modules=TARGETS, alpha_over_r=2.0)
    peft_model = peft.get_peft_model(model, cfg)
    mods = lora_modules(peft_model)
    assert len(mods) == 6
    for name, m in mods.items():
        r = 3 if ".layers.0." in name else 5
        base = m.get_base_layer()
        assert m.r["default"] == r
        assert m.lora_alpha["default"] == 2 * r and m.scaling["default"] == pytest.approx(2.0)
        assert tuple(m.lora_A["default"].weight.shape) == (r, base.in_features)
        assert tuple(m.lora_B["default"].weight.shape) == (base.out_features, r)


def test_rank_zero_blocks_are_left_out():
    model = tiny_llama()
    cfg = gelora_config(model, [0, 4], target_modules=TARGETS)
    assert sorted(cfg.exclude_modules) == sorted(f"model.layers.0.mlp.{t}" for t in TARGETS)
    assert all(v > 0 for v in cfg.rank_pattern.values())
    mods = lora_modules(peft.get_peft_model(model, cfg))
    assert sorted(mods) == sorted(f"model.layers.1.mlp.{t}" for t in TARGETS)
    assert {m.r["default"] for m in mods.values()} == {4}
    with pytest.raises(PlanError, match="every block has rank 0"):
        gelora_config(tiny_llama(), [0, 0], target_modules=TARGETS)


def test_keys_escaped_layer_1_does_not_match_layer_11():
    model = tiny_llama(layers=12, hidden=32, inter=48)
    ranks = [j + 1 for j in range(12)]
    cfg = gelora_config(model, ranks, target_modules=TARGETS)
    names = [n for n, _ in model.named_modules()]
    for key in cfg.rank_pattern:
        assert "." not in key.replace(r"\.", "")  # every dot escaped
        assert key == re.escape(re.sub(r"\\(.)", r"\1", key))
        # PEFT's matching rule (peft.utils.other.get_pattern_key): exactly one module per key
        hits = [n for n in names if re.match(rf"(.*\.)?({key})$", n)]
        assert hits == [re.sub(r"\\(.)", r"\1", key)]
    mods = lora_modules(peft.get_peft_model(model, cfg))
    assert len(mods) == 36
    for name, m in mods.items():
        j = int(name.split(".")[2])
        assert m.r["default"] == j + 1 and m.lora_alpha["default"] == 2 * (j + 1)
    assert mods["model.layers.1.mlp.up_proj"].r["default"] == 2
    assert mods["model.layers.11.mlp.up_proj"].r["default"] == 12


def test_budget_parameter_count_matches_plain_lora_in_peft():
    model = tiny_llama(layers=4, hidden=32, inter=48)
    costs = params_per_rank(model, TARGETS)
    assert costs == [3 * (32 + 48)] * 4
    d = [2.0, 3.5, 7.9, 8.3, 6.0]
    ranks = gelora_ranks(d[:-1], d[1:], rule="budget", r=4, floor=1, n_params_fn=costs)
    plain = peft.get_peft_model(tiny_llama(layers=4, hidden=32, inter=48),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    n_plain = plain.get_nb_trainable_parameters()[0]
    geo = peft.get_peft_model(model, gelora_config(model, ranks, target_modules=TARGETS))
    n_geo = geo.get_nb_trainable_parameters()[0]
    assert n_geo == lora_parameter_count(tiny_llama(layers=4, hidden=32, inter=48), ranks, TARGETS)
    assert n_geo <= n_plain and n_plain - n_geo < min(costs)
    assert ranks != [4, 4, 4, 4]  # the IDs reshaped the budget


def test_save_and_load_with_stock_peft_reproduces_outputs(tmp_path):
    model = tiny_llama()
    cfg = gelora_config(model, [2, 6], target_modules=TARGETS, init_lora_weights=False)  # random B
    peft_model = peft.get_peft_model(model, cfg).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = peft_model(ids).logits
        base_out = tiny_llama()(ids).logits
    assert not torch.allclose(out, base_out)  # the adapter does something
    peft_model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()  # stock PEFT, no extra config
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    for name, m in lora_modules(loaded).items():
        assert m.r["default"] == (2 if ".layers.0." in name else 6)


def test_config_errors():
    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"\['o_proj_typo'\] match no linear layer"):
        gelora_config(model, [1, 1], target_modules=["up_proj", "o_proj_typo"])
    with pytest.raises(AdapterError, match="belongs to no numbered block"):
        gelora_config(model, [1, 1], target_modules=["lm_head"])
    with pytest.raises(AdapterError, match="lists 3 ranks"):
        gelora_config(model, [1, 1, 1], target_modules=TARGETS)
    with pytest.raises(AdapterError, match=r"no rank for block\(s\) \[1\]"):
        gelora_config(model, {0: 2}, target_modules=TARGETS)
    with pytest.raises(AdapterError, match=r"block\(s\) \[5\]"):
        gelora_config(model, {0: 2, 1: 2, 5: 1}, target_modules=TARGETS)
    with pytest.raises(AdapterError, match="rank -1"):
        gelora_config(model, [2, -1], target_modules=TARGETS)
    with pytest.raises(AdapterError, match="sets .*rank_pattern"):
        gelora_config(model, [2, 2], target_modules=TARGETS, rank_pattern={"x": 1})
    layers = target_layers(model, TARGETS)
    assert list(layers) == [0, 1] and all(len(v) == 3 for v in layers.values())
