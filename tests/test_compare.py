"""`geoprobe compare`: the paired interval against scipy, the verdict and separation rules, the method
list, equal budgets counted against PEFT's own parameter count, the summary recomputed from the run
records, the report's escaping, and refusals before any training. The end-to-end runs on the real
SmolLM2 are in tests/test_compare_e2e.py."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy import stats as sps

import adapters
from adapters.build import LLAMA_TARGETS
from geoprobe.cli import main
from geoprobe.compare import (MATCHED, NONE, OFFICIAL, TOLERANCE, arms, choices, match_budget, paired_difference,
                              parameter_count, parse_methods, separation, summarize, verdict)
from geoprobe.compare.arms import target_modules_of
from geoprobe.compare.stats import BETTER, NO_INTERVAL, NOISE, WORSE
from geoprobe.compare.workflow import _check_out, check_eval_sets, EvalSet
from geoprobe.errors import ComparisonError, DataFormatError
from geoprobe.report.comparison import render_comparison_html

from tiny_models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_paired_interval_is_scipys_paired_t_interval(n):
    rng = np.random.default_rng(n)
    a, b = rng.uniform(0.2, 0.6, n), rng.uniform(0.2, 0.6, n)
    got = paired_difference(a, b)
    ci = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert got["low"] == pytest.approx(ci.low, rel=1e-12) and got["high"] == pytest.approx(ci.high, rel=1e-12)
    assert got["mean"] == pytest.approx(np.mean(a - b)) and got["n"] == n
    assert got["t_quantile"] == pytest.approx(sps.t.ppf(0.975, n - 1))


def test_paired_interval_needs_two_seeds_and_verdicts_follow_the_interval():
    one = paired_difference([0.5], [0.3])
    assert one["low"] is None and one["high"] is None and one["verdict"] == NO_INTERVAL
    assert paired_difference([0.5, 0.52, 0.51], [0.3, 0.31, 0.3])["verdict"] == BETTER
    assert paired_difference([0.1, 0.12, 0.11], [0.3, 0.31, 0.3])["verdict"] == WORSE
    assert paired_difference([0.3, 0.5, 0.1], [0.3, 0.3, 0.3])["verdict"] == NOISE
    assert verdict(-0.01, 0.02) == NOISE and verdict(0.0, 0.1) == NOISE and verdict(1e-9, 0.1) == BETTER
    assert verdict(None, None) == NO_INTERVAL


def test_separation_rule():
    noise = {"dora": paired_difference([0.02, 0.03, 0.01], [0.02, 0.01, 0.03])}
    low = separation({"lora": 0.02, "dora": 0.02, NONE: 0.01}, noise)
    assert not low["separates"] and "below 5 %" in low["reason"]
    high_noise = separation({"lora": 0.4, "dora": 0.41}, noise)
    assert not high_noise["separates"] and "contains 0" in high_noise["reason"]
    clear = {"dora": paired_difference([0.5, 0.52, 0.51], [0.3, 0.31, 0.3])}
    assert separation({"lora": 0.3, "dora": 0.51}, clear)["separates"]


# --------------------------------------------------------------------------- methods
def test_method_names_come_from_the_registry():
    from adapters import registry

    names = choices()
    assert names[0] == NONE and names[-1] == registry.AUTO
    assert set(registry.names()) <= set(names) and OFFICIAL in names
    official = {a.name: a for a in arms()}[OFFICIAL]
    assert official.method == "hyplora" and official.official
    config = registry.get(official.method).config_class  # the arm sets this field of HypLoRA's config
    assert "hyplora_official" in {f.name for f in dataclasses.fields(config)}
    matched = {a.name: a for a in arms()}[MATCHED]
    assert matched.method == "hyplora" and matched.scale_matched and not matched.official
    assert [a.name for a in parse_methods(" LoRA, dora ,none")] == ["lora", "dora", NONE]
    with pytest.raises(ComparisonError, match="unknown method.*qlora.*choose from none, lora"):
        parse_methods("lora,qlora")
    with pytest.raises(ComparisonError, match="more than once"):
        parse_methods("lora,lora")
    with pytest.raises(ComparisonError, match="empty"):
        parse_methods(" , ")


# --------------------------------------------------------------------------- budgets
def _peft_count(method: str, budget, **kw) -> int:
    torch.manual_seed(0)
    extra = {"n_heads": budget.n_heads} if budget.n_heads else {}
    if budget.layer_ranks is not None:
        extra["layer_ranks"] = budget.layer_ranks
    else:
        extra.update(r=budget.r, alpha=budget.alpha)
    model = adapters.build(tiny_llama(0), method, **extra, **kw)
    trainable, _ = model.get_nb_trainable_parameters()
    return trainable


@pytest.mark.parametrize("name", ["lora", "dora", "hyplora", OFFICIAL, MATCHED, "hydralora", "gelora",
                                  "hydralora+gelora"])
def test_budgets_match_peft_counts_within_five_percent(name):
    arm = {a.name: a for a in arms()}[name]
    mods = target_modules_of(tiny_llama(0), LLAMA_TARGETS)
    ranks = [9, 23] if "gelora" in name else None  # GeLoRA-shaped per-block ranks (plans give such)
    heads = 2 if "hydralora" in name else None
    b = match_budget(arm, arm.method, mods, r=16, alpha=32.0, layer_ranks=ranks, n_heads=heads)
    lora = _peft_count("lora", match_budget(parse_methods("lora")[0], "lora", mods, r=16, alpha=32.0))
    assert b.lora_parameters == lora
    assert b.parameters == _peft_count(arm.method, b, official=arm.official, scale_matched=arm.scale_matched)
    assert ("scale-matched" in b.rule) == arm.scale_matched
    assert abs(b.parameters / lora - 1) <= TOLERANCE and b.ratio == pytest.approx(b.parameters / lora)
    if b.layer_ranks is None:
        assert b.alpha / b.r == pytest.approx(2.0)  # α/r kept when the rank changes


def test_unmatchable_budget_is_refused_with_the_closest_budget():
    mods = target_modules_of(tiny_llama(0), ["q_proj"])  # 64 → 64: a magnitude vector is 1/(2r) of LoRA
    dora = parse_methods("dora")[0]
    with pytest.raises(ComparisonError, match=r"--methods dora: .*LoRA budget of 256 \(rank 1\).*closest is 384"):
        match_budget(dora, "dora", mods, r=1, alpha=2.0)
    lowered = match_budget(dora, "dora", mods, r=16, alpha=32.0)  # 16·128 + 64 = +3.1 %: kept
    assert lowered.r == 16 and not lowered.rank_changed
    assert parameter_count("dora", mods, [16, 16]) == 2 * (16 * 128 + 64)


# --------------------------------------------------------------------------- summary and report
def _run(method, seed, accs, *, lora_params=1000):
    return {"method": method, "seed": seed, "device": "cpu", "trainable_parameters": lora_params,
            "budget_ratio": 1.0, "lora_parameters": lora_params, "train_seconds": 1.0, "eval_seconds": 0.5,
            "wall_seconds": 1.5, "tokens_per_second": 10.0, "peak_memory_bytes": 2**30,
            "peak_memory_kind": "cpu_peak_rss_of_process",
            "eval": {k: {"accuracy": v} for k, v in accs.items()}}


def test_summary_recomputed_from_runs():
    rng = np.random.default_rng(3)
    lora = rng.uniform(0.2, 0.4, 3)
    dora = lora + rng.normal(0.02, 0.01, 3)
    runs = {f"lora-seed{k}": _run("lora", k, {"gsm8k": lora[k]}) for k in range(3)}
    runs.update({f"dora-seed{k}": _run("dora", k, {"gsm8k": dora[k]}) for k in range(3)})
    runs[NONE] = _run(NONE, None, {"gsm8k": 0.1})
    s = summarize(runs, [NONE, "lora", "dora"], 3, settings={"evals": {"gsm8k": {}}, "r": 8})
    cell = s["table"]["gsm8k"]["dora"]
    assert cell["mean"] == pytest.approx(dora.mean()) and cell["std"] == pytest.approx(dora.std(ddof=1))
    ci = sps.ttest_rel(dora, lora).confidence_interval(0.95)
    assert cell["difference"]["low"] == pytest.approx(ci.low) and cell["difference"]["high"] == pytest.approx(ci.high)
    base = s["table"]["gsm8k"][NONE]
    assert base["n"] == 1 and base["mean"] == 0.1 and base["std"] is None
    assert base["difference"]["mean"] == pytest.approx(0.1 - lora.mean())  # the one base value against each seed
    assert s["total"]["runs_done"] == s["total"]["runs_total"] == 7 and s["complete"]
    assert s["total"]["device_seconds"] == pytest.approx(7 * 1.5)
    assert any("t(0.975, 2) = 4.30" in n for n in s["notes"])


def test_question_interval_is_scipys_percentile_bootstrap_of_the_per_question_difference():
    """The mean is the mean paired accuracy difference (closed form); the interval agrees with
    scipy.stats.bootstrap's percentile interval of the per-question differences (an independent
    resampler: equal up to Monte Carlo error)."""
    from geoprobe.compare.stats import question_difference

    rng = np.random.default_rng(11)
    n_q = 1500
    lora = (rng.random((3, n_q)) < 0.30).astype(int)
    arm = (rng.random((3, n_q)) < 0.36).astype(int)
    got = question_difference(arm, lora, n_boot=4000, seed=5)
    assert got["mean"] == pytest.approx(float(np.mean(arm.mean(axis=1) - lora.mean(axis=1))))
    d = (arm - lora).mean(axis=0)
    ref = sps.bootstrap((d,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                        random_state=np.random.default_rng(99)).confidence_interval
    width = ref.high - ref.low
    assert got["low"] == pytest.approx(ref.low, abs=0.05 * width)
    assert got["high"] == pytest.approx(ref.high, abs=0.05 * width)
    assert got["n_questions"] == n_q
    with pytest.raises(ValueError):
        question_difference(arm[:, :10], lora[:, :11])


def test_seed_interval_alone_does_not_make_a_verdict_when_the_questions_do_not_support_it():
    """Three seeds that agree exactly give a seed interval of zero width; on 20 questions a 1-question
    gain is still within the noise of the test set, and the verdict says so; on 4,000 questions with a
    large gain both intervals agree and the verdict stands."""
    from geoprobe.compare.stats import BETTER, TEST_NOISE
    from geoprobe.compare.workflow import format_table

    def runs_for(n_q, gain, jitter):
        rng = np.random.default_rng(2)
        base = (rng.random(n_q) < 0.3).astype(int)
        out = {}
        for k in range(3):
            lora = base.copy()
            flip = rng.integers(0, n_q, jitter)  # seeds disagree on a few questions
            lora[flip] = 1 - lora[flip]
            dora = lora.copy()
            wrong = np.flatnonzero(dora == 0)[:gain]
            dora[wrong] = 1
            for name, c in (("lora", lora), ("dora", dora)):
                r = _run(name, k, {"gsm8k": float(c.mean())})
                r["eval"]["gsm8k"]["correct"] = c.tolist()
                out[f"{name}-seed{k}"] = r
        return out

    small = summarize(runs_for(20, 1, 0), ["lora", "dora"], 3, settings={"evals": {"gsm8k": {}}})
    d = small["table"]["gsm8k"]["dora"]["difference"]
    assert d["low"] == d["high"] == pytest.approx(0.05)  # the seeds agree exactly
    assert d["questions"]["low"] <= 0 and d["verdict"] == TEST_NOISE
    assert not small["separation"]["gsm8k"]["separates"]
    assert "noise of the test set" in small["separation"]["gsm8k"]["reason"]
    large = summarize(runs_for(4000, 400, 40), ["lora", "dora"], 3, settings={"evals": {"gsm8k": {}}})
    d = large["table"]["gsm8k"]["dora"]["difference"]
    assert d["questions"]["low"] > 0 and d["low"] > 0 and d["verdict"] == BETTER
    assert "q[" in format_table(large)


def test_report_escapes_every_model_provided_string():
    hostile = "<script>alert(1)</script>"
    runs = {f"lora-seed{k}": _run("lora", k, {hostile: 0.3 + k / 100}) for k in range(2)}
    s = summarize(runs, ["lora"], 2, settings={"evals": {hostile: {}}, "model": hostile, "paths": {"data": hostile}})
    s["plans"] = {"auto": {"method": "gelora", "reasons": {"method": hostile}}}
    s["budgets"] = {"lora": {"method": "lora", "parameters": 1, "ratio": 1.0, "rule": hostile}}
    page = render_comparison_html(s, command=f"geoprobe compare {hostile}")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("&lt;script&gt;") >= 5


# --------------------------------------------------------------------------- refusals before training
def test_eval_set_of_unknown_answer_format_is_refused():
    from adapters.data import Example

    good = Example(prompt="2+2?", answer="4", label="4", task="gsm8k")
    odd = Example(prompt="Name a colour.", answer="red", label="red", task="generic")
    check_eval_sets([EvalSet("gsm8k", "g.jsonl", [good])])
    with pytest.raises(DataFormatError, match="--eval odd.json: the answer format of example 0 is not known"):
        check_eval_sets([EvalSet("odd", "odd.json", [odd])])
    unlabelled = Example(prompt="2+2?", answer="", label=None, task="gsm8k")
    with pytest.raises(DataFormatError, match="no gold answer"):
        check_eval_sets([EvalSet("t", "t.jsonl", [unlabelled])])


def test_output_folder_with_other_settings_is_refused(tmp_path):
    (tmp_path / "comparison.json").write_text(json.dumps({"settings": {"r": 32, "train": {"lr": 3e-4}}}))
    _check_out(tmp_path, {"r": 32, "train": {"lr": 3e-4}})
    with pytest.raises(ComparisonError, match=r"other settings \(train.lr: 0.0003 stored, 0.001 now\)"):
        _check_out(tmp_path, {"r": 32, "train": {"lr": 1e-3}})
    # the same weights loaded from a file of another name (another machine) resume; other weights do not
    (tmp_path / "comparison.json").write_text(json.dumps({"settings": {"model": "smol", "model_fingerprint": "ab"}}))
    _check_out(tmp_path, {"model": "SmolLM2-135M-Instruct", "model_fingerprint": "ab"})
    with pytest.raises(ComparisonError, match=r'model: "smol" stored, "SmolLM2-135M-Instruct" now; '
                                              r'model_fingerprint: "ab" stored, "cd" now'):
        _check_out(tmp_path, {"model": "SmolLM2-135M-Instruct", "model_fingerprint": "cd"})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ComparisonError, match="not empty"):
        _check_out(other, {})


@pytest.mark.parametrize("args, message", [
    (["--methods", "lora,qlora"], "unknown method(s) qlora; choose from none, lora, dora"),
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--eval-limit", "0"], "--eval-limit must be ≥ 1"),
])
def test_cli_bad_input_one_line_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "cmp"
    rc = main(["compare", "--data", str(tmp_path / "train.json"), "--eval", str(tmp_path / "test.json"),
               "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_lists_methods(capsys):
    assert main(["compare", "--methods", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in choices()) and "use_dora" in listed


# --------------------------------------------------------------------------- the task's metric
def _scored(method, seed, mcc, acc):
    rec = _run(method, seed, {})
    rec["eval"] = {"cola": {"metric": "mcc", "score": mcc, "accuracy": acc, "metrics": {"mcc": mcc, "accuracy": acc}}}
    return rec


def test_summary_table_and_report_use_the_sets_metric():
    rng = np.random.default_rng(5)
    lora_mcc, lora_acc = rng.uniform(0.1, 0.3, 3), rng.uniform(0.6, 0.7, 3)
    gel_mcc, gel_acc = lora_mcc + rng.normal(0.05, 0.02, 3), rng.uniform(0.6, 0.7, 3)
    runs = {f"lora-seed{k}": _scored("lora", k, lora_mcc[k], lora_acc[k]) for k in range(3)}
    runs.update({f"gelora-seed{k}": _scored("gelora", k, gel_mcc[k], gel_acc[k]) for k in range(3)})
    s = summarize(runs, ["lora", "gelora"], 3, settings={"evals": {"cola": {}}, "r": 8})
    assert s["metrics"]["cola"] == {"name": "mcc", "label": "MCC", "percent": False}
    cell = s["table"]["cola"]["gelora"]
    assert cell["mean"] == pytest.approx(gel_mcc.mean()) and cell["accuracy"]["mean"] == pytest.approx(gel_acc.mean())
    ci = sps.ttest_rel(gel_mcc, lora_mcc).confidence_interval(0.95)
    assert (cell["difference"]["low"], cell["difference"]["high"]) == pytest.approx((ci.low, ci.high))
    from geoprobe.compare import format_table

    text = format_table(s)
    assert "MCC" in text and "accuracy %" not in text and f"{gel_mcc.mean():.3f}" in text
    assert f"{(gel_mcc - lora_mcc).mean():+.3f}" in text
    page = render_comparison_html(s)
    assert "MCC vs LoRA (same seed)</th>" in page and ">accuracy</th>" in page


def test_separation_floor_speaks_the_metric():
    chance = separation({"lora": 0.01, "gelora": 0.02}, {}, metric="mcc")
    assert not chance["separates"] and "mean MCC is below 0.05 (highest 0.020; chance scores 0)" in chance["reason"]
    f1 = separation({"lora": 0.01, "gelora": 0.02}, {}, metric="f1")
    assert "mean F1 is below 5 % (highest 2.0 %)" in f1["reason"]


def test_records_without_a_metric_count_accuracy():
    runs = {f"lora-seed{k}": _run("lora", k, {"gsm8k": 0.2 + k / 10}) for k in range(2)}
    s = summarize(runs, ["lora"], 2, settings={"evals": {"gsm8k": {}}})
    assert s["metrics"]["gsm8k"]["name"] == "accuracy" and s["table"]["gsm8k"]["lora"]["mean"] == pytest.approx(0.25)
    assert "accuracy" not in s["table"]["gsm8k"]["lora"]  # no second column beside accuracy itself


# --------------------------------------------------------------------------- several training sets, heads
def _gsm_file(path, n):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": f"{path.parent.name} {i}+1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(n)))
    return path


def test_several_training_sets_are_their_union_in_the_order_given(tmp_path):
    from geoprobe.cli import _train_sets

    a, b = _gsm_file(tmp_path / "a" / "train.jsonl", 5), _gsm_file(tmp_path / "b" / "train.jsonl", 3)
    examples, sizes, name = _train_sets([str(b), str(a)], limit=4)
    assert sizes == {"b/train.jsonl": 3, "a/train.jsonl": 4} and name == f"{b} + {a}"
    assert [ex.prompt for ex in examples] == [f"b {i}+1?" for i in range(3)] + [f"a {i}+1?" for i in range(4)]
    with pytest.raises(Exception, match="given twice"):
        _train_sets([str(a), str(a)], limit=None)


def test_cli_refusals_of_heads_and_training_sets_before_loading(tmp_path, capsys):
    gsm = _gsm_file(tmp_path / "gsm8k" / "train.jsonl", 3)
    out = tmp_path / "cmp"
    base = ["compare", str(tmp_path / "no-such-model"), "--eval", str(gsm), "--out", str(out)]
    for extra, message in (
            (["--data", str(gsm), "--head", "classification"], "needs generation: its answers are written out"),
            (["--data", str(gsm), "--data", str(gsm)], f"--data {gsm} is given twice")):
        rc = main(base + extra)
        err = capsys.readouterr().err
        assert rc != 0 and message in err and err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()


def test_comparison_evaluates_every_set_in_one_call_as_each_alone(tmp_path):
    """`compare` answers all its evaluation sets in one generation call; each set's score and
    predictions equal those of `evaluate` on that set alone (a tiny random Llama, float32, greedy)."""
    import tiny_models
    from adapters.data import Example
    from adapters.evaluate import evaluate
    from geoprobe.compare.workflow import _evaluate
    from geoprobe.models import load_model

    tok = tiny_models.bpe_tokenizer()
    folder = tiny_models.save_sharded(tiny_llama(seed=3, vocab=len(tok)), tmp_path / "m", tokenizer=tok)
    lm = load_model(str(folder), device="cpu")
    prompts = ["What is 2 + 2?", "x = 3\nprint(x)", "The function returns a new list of the items.", "ok ok",
               " ".join(["the module imports the name"] * 6)]
    evals = [EvalSet(name, f"{name}.json", [Example(prompt=p, answer="", label=str(i), task="gsm8k")
                                           for i, p in enumerate(ps)])
             for name, ps in (("first", prompts[:3]), ("second", prompts[2:]))]
    scores, predictions = _evaluate(lm, lm.model, evals, batch_size=3, max_new_tokens=6, max_length=64)
    assert list(scores) == ["first", "second"]
    for ev in evals:
        alone = evaluate(lm.model, lm.tokenizer, ev.examples, batch_size=2, max_new_tokens=6)
        assert predictions[ev.name] == alone.predictions
        got = scores[ev.name]
        assert (got["n"], got["accuracy"], got["n_unreadable"]) == (alone.n, alone.accuracy, alone.n_unparsed)
        assert got["correct"] == [int(bool(p["correct"])) for p in alone.predictions]


# --------------------------------------------------------------------------- --jobs
def test_deal_gives_every_method_once_and_balances_the_runs():
    """Every method with unfinished runs lands in exactly one group, finished methods in none; the
    groups' run counts are as even as whole methods allow (checked against every assignment by brute
    force on small cases: the largest group is within one method's count of the best possible)."""
    import itertools

    from geoprobe.compare.parallel import deal

    rng = np.random.default_rng(4)
    for _ in range(40):
        names = [f"m{i}" for i in range(int(rng.integers(1, 7)))]
        counts = {n: int(rng.integers(0, 4)) for n in names}
        jobs = int(rng.integers(1, 5))
        groups = deal(counts, jobs)
        dealt = [m for g in groups for m in g]
        assert sorted(dealt) == sorted(n for n in names if counts[n]) and len(groups) <= jobs
        assert all(g == sorted(g, key=names.index) for g in groups)
        todo = [n for n in names if counts[n]]
        if todo:
            best = min(max(sum(counts[m] for m, k in zip(todo, pick) if k == j) for j in range(jobs))
                       for pick in itertools.product(range(jobs), repeat=len(todo)))
            worst = max(sum(counts[m] for m in g) for g in groups)
            assert worst <= best + max(counts.values())  # greedy largest-first: never a whole method off
    assert deal({"none": 1, "lora": 3, "dora": 3, "gelora": 3, "hyplora": 3}, 4) == \
        [["none", "lora"], ["dora"], ["gelora"], ["hyplora"]]
    with pytest.raises(ValueError):
        deal({"lora": 1}, 0)


def test_worker_arguments_keep_the_flags_and_replace_methods_out_and_jobs(tmp_path):
    from geoprobe.compare.parallel import arm_of, unfinished, worker_argv

    argv = ["m.gguf", "--data", "a.json", "--methods", "lora,dora", "--jobs=3", "--out", "o", "--probe-after",
            "--seeds", "2", "--quiet", "--r", "8"]
    got = worker_argv(argv, ["dora"], tmp_path / "p")
    assert got == ["compare", "m.gguf", "--data", "a.json", "--seeds", "2", "--r", "8", "--methods", "dora",
                   "--out", str(tmp_path / "p"), "--quiet"]
    assert [arm_of(n) for n in ("lora-seed2", "none", "hyplora-official-seed0", "auto-seedx")] == \
        ["lora", "none", "hyplora-official", "auto-seedx"]
    (tmp_path / "runs").mkdir()
    for n in ("none", "lora-seed0", "lora-seed2"):
        (tmp_path / "runs" / f"{n}.json").write_text("{}")
    assert unfinished(tmp_path, ["none", "lora", "dora"], 3) == {"none": 0, "lora": 1, "dora": 3}
