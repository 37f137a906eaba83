"""Activation checkpointing in fine-tuning (adapters.train.checkpointing, ``--gradient-checkpointing``): a
checkpointed run equals the plain run to rounding (the oracle: the same run without the flag) while every
block runs its forward a second time in backward and far fewer bytes are kept from the forward pass;
the caller's model leaves as it came; a model without support is refused before anything is written; with
``--compile`` the checkpoint goes inside the compiled blocks."""
from __future__ import annotations

import pytest
import torch

from adapters.build import build
from adapters.data import load_examples
from adapters.train import TrainSettings, finetune
from adapters.train.checkpointing import enable
from adapters.train.settings import NOT_COMPARED
from geoprobe.errors import AdapterError

from finetune_helpers import write_problems
from tiny_models import bpe_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return load_examples(write_problems(tmp_path_factory.mktemp("data") / "train.jsonl", 12))


def _settings(on: bool, **kw) -> TrainSettings:
    return TrainSettings(lr=5e-3, max_steps=3, batch_size=2, max_length=96, seed=2, gradient_checkpointing=on, **kw)


def _trained(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def _count_block_forwards(model) -> list[int]:
    """Calls of every block's attention (inside the block's forward, so counted again where the backward
    pass recomputes the block; transformers keeps the block's own hooks outside the checkpoint)."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1
    for block in model.model.layers:
        block.self_attn.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("hyplora", 0.1), ("hydralora", 0.0)])
def test_checkpointed_run_trains_the_plain_adapter(examples, tmp_path, method, dropout):
    """Three steps with and without checkpointing: the same losses and adapter to float32 rounding (with
    dropout, the recompute draws the forward's mask again); each block ran its forward twice per
    micro-batch instead of once; the record says so; the caller's blocks leave uncheckpointed."""
    tok = bpe_tokenizer()
    runs, forwards, models = {}, {}, {}
    for on in (False, True):
        models[on] = tiny_llama()
        calls = _count_block_forwards(models[on])
        runs[on] = finetune(models[on], tok, examples, method, out=tmp_path / str(on), settings=_settings(on),
                            progress=False, r=4, dropout=dropout)
        forwards[on] = calls[0]
    assert runs[True].result.loss_values == pytest.approx(runs[False].result.loss_values, rel=1e-6)
    a, b = _trained(runs[False]), _trained(runs[True])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    n_blocks = len(models[True].model.layers)
    assert forwards[False] == 3 * n_blocks and forwards[True] == 2 * forwards[False]
    assert runs[True].result.settings["activation_checkpointing"] == {
        "applied": True, "reason": "", "model_class": "LlamaForCausalLM"}
    assert runs[False].result.settings["activation_checkpointing"]["applied"] is False
    assert not any(block.gradient_checkpointing for block in models[True].model.layers)


def test_the_forward_keeps_far_fewer_bytes():
    """What the forward pass keeps for backward (every tensor autograd saves outside the checkpoints): with
    checkpointing each block keeps its input alone, under half of what the plain forward keeps."""
    kept = {}
    for on in (False, True):
        torch.manual_seed(0)
        model = build(tiny_llama(layers=4), "lora", r=4, dropout=0.0)
        model.train()
        record, off = enable(model, enabled=on)
        assert record.applied is on and (off is not None) is on
        ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(1))
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
        kept[on] = sum(sizes)
        if off is not None:
            off()
        assert not any(block.gradient_checkpointing for block in model.get_base_model().model.layers)
    assert kept[True] < 0.5 * kept[False], kept


def test_a_model_already_checkpointed_stays_so():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    record, off = enable(model, enabled=True)
    assert record.applied and "came checkpointed" in record.reason and off is None
    record, off = enable(tiny_llama(), enabled=False)
    assert not record.applied and "--gradient-checkpointing" in record.reason and off is None


def test_a_model_without_support_is_refused_before_anything_is_written(examples, tmp_path, monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    with pytest.raises(AdapterError, match="--gradient-checkpointing: LlamaForCausalLM does not support"):
        finetune(model, bpe_tokenizer(), examples, "lora", out=tmp_path / "out", settings=_settings(True),
                 progress=False, r=4)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not hasattr(model, "peft_config") and not any(
        "lora" in n for n, _ in model.named_parameters())  # the adapters are removed again


def test_setting_is_a_bool_and_not_part_of_the_run_identity():
    assert TrainSettings().gradient_checkpointing is False and "gradient_checkpointing" in NOT_COMPARED
    with pytest.raises(AdapterError, match="gradient_checkpointing = 'yes'.*--gradient-checkpointing"):
        TrainSettings(gradient_checkpointing="yes")
    assert TrainSettings.from_dict({"lr": 1e-3}).gradient_checkpointing is False  # results written before it


@pytest.mark.slow
def test_compiled_blocks_hold_the_checkpoint(examples, tmp_path):
    """--compile with --gradient-checkpointing: the checkpoint inside the compiled blocks (the record says
    so), the plain run's losses and adapter to float32 rounding, the caller's blocks eager and
    uncheckpointed afterwards."""
    tok = bpe_tokenizer()
    plain = finetune(tiny_llama(), tok, examples, "lora", out=tmp_path / "plain", settings=_settings(False),
                     progress=False, r=4, dropout=0.0)
    model = tiny_llama()
    both = finetune(model, tok, examples, "lora", out=tmp_path / "both",
                    settings=_settings(True, compile=True, compile_mode="default"), progress=False, r=4, dropout=0.0)
    rec = both.result.settings["compiled_blocks"]
    assert rec["applied"] and "activation checkpointing inside" in rec["reason"]
    assert both.result.loss_values == pytest.approx(plain.result.loss_values, rel=1e-5)
    a, b = _trained(plain), _trained(both)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert all(not blk.gradient_checkpointing and blk._compiled_call_impl is None for blk in model.model.layers)
