"""Compiled transformer blocks (adapters.train.compiled, ``--compile``) on the CPU: a fine-tune with
compiled blocks equals the eager fine-tune to rounding (the oracle: the same run without ``--compile``),
the caller's model leaves as it came, a first compiled step that fails is redone eagerly with one log
line, and the setting is checked (the flag reaching every training command: test_train_fast.py)."""
from __future__ import annotations

import pytest
import torch

from adapters.data import load_examples
from adapters.train import TrainSettings, finetune
from adapters.train.compiled import compile_blocks, find_blocks
from geoprobe.errors import AdapterError

from finetune_helpers import write_problems
from tiny_models import bpe_tokenizer, tiny_bert, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return load_examples(write_problems(tmp_path_factory.mktemp("data") / "train.jsonl", 12))


def _settings(compile_: bool, mode: str = "default") -> TrainSettings:
    return TrainSettings(lr=5e-3, max_steps=3, batch_size=2, max_length=96, seed=2, compile=compile_,
                         compile_mode=mode)


def _trained(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def test_blocks_are_the_decoder_or_encoder_layers():
    llama, bert = tiny_llama(), tiny_bert()
    assert find_blocks(llama) is llama.model.layers
    assert find_blocks(bert) is bert.encoder.layer
    record, handle = compile_blocks(llama, enabled=False)
    assert not record.applied and "--compile" in record.reason and handle is None
    record, handle = compile_blocks(llama, enabled=True, sharded=True)
    assert not record.applied and "FSDP" in record.reason and handle is None


@pytest.mark.slow
def test_compiled_blocks_train_the_eager_adapter(examples, tmp_path, monkeypatch):
    """LoRA fine-tuned 3 steps with compiled blocks: the same losses and adapter as eager, to float32
    rounding; the record says what was compiled; the caller's model leaves with its blocks eager."""
    import adapters.train.compiled as compiled

    real, calls = compiled.compile_blocks, [0]

    def counted(model, *, enabled, sharded=False, mode="default"):  # count calls through the compiled forward
        record, handle = real(model, enabled=enabled, sharded=sharded, mode=mode)
        for block in (handle.blocks if handle is not None else []):
            inner = block._compiled_call_impl

            def call(*args, _inner=inner, **kwargs):
                calls[0] += 1
                return _inner(*args, **kwargs)
            block._compiled_call_impl = call
        return record, handle

    monkeypatch.setattr(compiled, "compile_blocks", counted)
    tok = bpe_tokenizer()
    eager = finetune(tiny_llama(), tok, examples, "lora", out=tmp_path / "eager", settings=_settings(False),
                     progress=False, r=4, dropout=0.0)
    assert calls[0] == 0
    model = tiny_llama()
    fast = finetune(model, tok, examples, "lora", out=tmp_path / "compiled", settings=_settings(True),
                    progress=False, r=4, dropout=0.0)
    assert fast.result.loss_values == pytest.approx(eager.result.loss_values, rel=1e-5)
    a, b = _trained(eager), _trained(fast)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert calls[0] == 3 * len(model.model.layers)  # every block of every step went through the compiled call
    rec = fast.result.settings["compiled_blocks"]
    assert rec == {"applied": True, "reason": "", "block_class": "LlamaDecoderLayer",
                   "n_blocks": len(model.model.layers), "mode": "default"}
    assert eager.result.settings["compiled_blocks"]["applied"] is False
    assert all(block._compiled_call_impl is None for block in model.model.layers)


def test_a_failing_first_compiled_step_is_redone_eagerly(examples, tmp_path, monkeypatch, caplog):
    """A compiled forward that raises at the first step: one warning, the blocks eager again, and the
    run equal bit for bit to the eager run (the step redone from cleared gradients)."""
    import adapters.train.compiled as compiled

    real = compiled.compile_blocks

    def broken(model, *, enabled, sharded=False, mode="default"):
        record, handle = real(model, enabled=enabled, sharded=sharded, mode=mode)
        if handle is not None:
            def fails(*args, **kwargs):
                raise RuntimeError("the compiler cannot take this operation")
            for block in handle.blocks:
                block._compiled_call_impl = fails
        return record, handle

    monkeypatch.setattr(compiled, "compile_blocks", broken)
    tok = bpe_tokenizer()
    eager = finetune(tiny_llama(), tok, examples, "hyplora", out=tmp_path / "eager", settings=_settings(False),
                     progress=False, r=4)
    with caplog.at_level("WARNING", logger="adapters.train.trainer"):
        fell = finetune(tiny_llama(), tok, examples, "hyplora", out=tmp_path / "fell", settings=_settings(True),
                        progress=False, r=4)
    assert fell.result.loss_values == eager.result.loss_values
    a, b = _trained(eager), _trained(fell)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rec = fell.result.settings["compiled_blocks"]
    assert not rec["applied"] and "cannot take this operation" in rec["reason"]
    warned = [r.getMessage() for r in caplog.records if "compiled blocks failed" in r.getMessage()]
    assert len(warned) == 1 and "plain path" in warned[0]


@pytest.mark.parametrize("method", ["lora", "hyplora", "hydralora"])
def test_adapter_blocks_compile_as_one_graph(method):
    """With the C++ adapter nodes serving (GEOPROBE_NATIVE=all on the CPU, as on CUDA by default), a block
    compiles as one graph (``fullgraph=True`` raises at a graph break; each C++ node or Triton launch
    would be one) and gives the eager block's output and gradients, taken through the C++ nodes, to float32
    rounding: under the compiler the layers take their plain torch formulas."""
    import shutil

    from adapters.build import build
    from adapters.kernels import native

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native layers cannot be built here")
    previous = native.set_native_mode("all")
    try:
        assert native.native_module(torch.device("cpu")) is not None, native.native_unavailable_reason("cpu")
        torch.manual_seed(3)
        model = build(tiny_llama(), method, r=4, dropout=0.0)
        model.train()
        with torch.no_grad():  # B away from PEFT's zeros, so the update and its gradients are not trivial
            for name, p in model.named_parameters():
                if p.requires_grad and p.dim() == 2:
                    p.normal_(0.0, 0.1)
        block = find_blocks(model)[1]
        x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(4))
        rot = model.get_base_model().model.rotary_emb(x, torch.arange(12)[None].expand(2, -1))
        params = [p for p in block.parameters() if p.requires_grad]

        def run(fn):
            xi = x.clone().requires_grad_(True)
            out = fn(xi, position_embeddings=rot, attention_mask=None)
            out = out[0] if isinstance(out, tuple) else out
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), [xi, *params])
            return out.detach(), grads

        eager_out, eager_grads = run(block)
        fast_out, fast_grads = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    finally:
        native.set_native_mode(previous)
    torch.testing.assert_close(fast_out, eager_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


_ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device,mode", [("cpu", "default"), pytest.param("cuda", "reduce-overhead", marks=_ON_CUDA)])
@pytest.mark.parametrize("method", ["lora", "hyplora", "hydralora"])
def test_checkpointed_blocks_compile_with_the_checkpoint_inside(method, device, mode):
    """Blocks under activation checkpointing compile with the checkpoint inside the compiled function (CUDA
    graphs cannot record a compiled block rerun within the backward pass): no graph break, the eager
    checkpointed model's loss and gradients to float32 rounding, the blocks' own checkpointing off while
    compiled and back after revert (the oracle: the same model, eager). On CUDA with the blocks replayed
    as CUDA graphs."""
    from torch._dynamo.utils import counters

    from adapters.build import build

    torch.manual_seed(5)
    model = build(tiny_llama(layers=3).to(device), method, r=4, dropout=0.0)
    model.train()
    with torch.no_grad():  # B away from PEFT's zeros, so every adapter gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 200, (2, 14), generator=torch.Generator().manual_seed(6)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        return loss.detach(), torch.autograd.grad(loss, params)

    eager_loss, eager_grads = step()
    blocks = find_blocks(model)
    torch._dynamo.reset()
    counters.clear()
    record, handle = compile_blocks(model, enabled=True, mode=mode)
    try:
        assert record.applied and record.mode == mode and "activation checkpointing inside" in record.reason
        assert not any(b.gradient_checkpointing for b in blocks)
        fast_loss, fast_grads = step()
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] >= 1
    finally:
        handle.revert()
    assert all(b.gradient_checkpointing and b._compiled_call_impl is None for b in blocks)
    torch.testing.assert_close(fast_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(fast_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_setting_is_a_bool_and_not_part_of_the_run_identity():
    from adapters.train.settings import NOT_COMPARED

    assert TrainSettings().compile is False and "compile" in NOT_COMPARED
    with pytest.raises(AdapterError, match="compile = 'yes'.*--compile"):
        TrainSettings(compile="yes")


def test_cuda_graphs_need_cuda_and_modes_are_checked():
    """``reduce-overhead`` on a CPU model compiles in the default mode and says why; an unknown mode is
    refused by the settings, naming the flag."""
    from adapters.train.compiled import MODES, compile_blocks

    model = tiny_llama()
    rec, handle = compile_blocks(model, enabled=True, mode="reduce-overhead")
    assert rec.applied and rec.mode == "default" and "CUDA graphs need CUDA" in rec.reason
    handle.revert()
    assert "reduce-overhead" in MODES and TrainSettings(compile=True, compile_mode="reduce-overhead").compile
    with pytest.raises(AdapterError, match="--compile-mode 'fast'.*reduce-overhead"):
        TrainSettings(compile=True, compile_mode="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,mode", [("lora", "default"), ("hyplora", "default"), ("lora", "reduce-overhead"),
                                         ("hyplora", "reduce-overhead"), ("hydralora", "reduce-overhead")])
def test_compiled_blocks_on_cuda_train_the_eager_adapter(examples, tmp_path, method, mode):
    """On CUDA (bfloat16 autocast, the Triton and native adapter nodes where they serve), compiled blocks
    give the eager run's losses to bfloat16 rounding and its adapter to that rounding in 99 % of the
    elements (the rest within Adam's reach of 2·lr a step), with the blocks compiled in ``mode`` throughout."""
    tok = bpe_tokenizer()
    runs = {}
    for on in (False, True):
        runs[on] = finetune(tiny_llama().cuda(), tok, examples, method, out=tmp_path / str(on),
                            settings=_settings(on, mode), progress=False, r=4, dropout=0.0)
    assert runs[True].result.loss_values == pytest.approx(runs[False].result.loss_values, rel=2e-2)
    a, b = _trained(runs[False]), _trained(runs[True])
    s = _settings(True, mode)
    for k in a:
        got, want = b[k].float(), a[k].float()
        # bfloat16 rounding moves most elements a little; Adam's first steps are about ±lr each, so an
        # element whose gradient is within rounding of zero may walk the other way: at most 2·lr a step
        close = torch.isclose(got, want, rtol=5e-2, atol=5e-3)
        assert close.float().mean() >= 0.99, (k, close.float().mean())
        assert (got - want).abs().max() <= 2 * s.lr * s.max_steps, k
    rec = runs[True].result.settings["compiled_blocks"]
    assert rec["applied"] and rec["mode"] == mode, rec  # compiled, not the eager fallback
