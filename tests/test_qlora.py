"""4-bit bases (QLoRA, ``--quantize 4bit``): every adapter method on a bitsandbytes NF4 base.

The oracle for a layer on a 4-bit base is the same adapter on an ordinary ``nn.Linear`` whose weight is
the dequantized NF4 weight (``bitsandbytes.functional.dequantize_4bit``): a Linear4bit computes
x · dequantize_4bit(W)ᵀ, so output and adapter gradients must agree to float32 rounding. bitsandbytes
computes NF4 on the CPU too; the product refuses the CPU for the user-facing option, which the CLI tests
check, and the ``gpu`` test does the same on CUDA.
"""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")

import adapters  # noqa: E402
from adapters.kernels.frozen_linear import frozen_plain_linear, is_4bit_linear  # noqa: E402
from adapters.train import TrainSettings, finetune  # noqa: E402
from adapters.data import load_examples  # noqa: E402
from finetune_helpers import write_model_folder, write_problems  # noqa: E402
from geoprobe.cli import main  # noqa: E402
from geoprobe.models.quantize import (BLOCKSIZE, dequantized_weight, linear_4bit, quantization_of,  # noqa: E402
                                      quantize_model)
from tiny_models import bpe_tokenizer, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (method, build options): every registered method, and HypLoRA's reference formula
CASES = [("lora", {}), ("dora", {}), ("gelora", {"layer_ranks": [2, 6]}), ("hyplora", {}),
         ("hyplora", {"official": True}), ("hydralora", {"n_heads": 3}), ("hyplora+gelora", {"layer_ranks": [2, 6]}),
         ("hydralora+gelora", {"layer_ranks": [2, 6], "n_heads": 3})]
IDS = ["lora", "dora", "gelora", "hyplora", "hyplora-official", "hydralora", "hyplora+gelora", "hydralora+gelora"]


def _quantized_and_reference(device: str = "cpu", compute_dtype=torch.float32):
    """A tiny Llama with 4-bit linear layers, and the same Llama (float32) whose linear weights are the
    dequantized NF4 weights of the first."""
    quantized = tiny_llama(0).to(device)
    quantize_model(quantized, device=device, compute_dtype=compute_dtype)
    reference = tiny_llama(0).to(device)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_4bit_linear(module):
                reference.get_submodule(name).weight.copy_(dequantized_weight(module).float())
    return quantized, reference


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _same_adapters(pq, pr, seed: int = 3) -> None:
    """Give both models the same adapter weights, moved off their initialisation (B = 0 would make the
    gradients of A vanish and hide a wrong base product)."""
    q, r = _trainable(pq), _trainable(pr)
    assert sorted(q) == sorted(r) and q
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(q):
            noise = 0.05 * torch.randn(q[name].shape, generator=gen, dtype=torch.float32)
            value = r[name].detach().float().cpu() + noise
            q[name].copy_(value.to(q[name].device, q[name].dtype))
            r[name].copy_(value.to(r[name].device, r[name].dtype))


def _forward_backward(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in _trainable(model).items()}


# --------------------------------------------------------------------------- the quantized base itself
def test_linear_4bit_is_nf4_and_computes_with_the_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=True)
    q = linear_4bit(linear, compute_dtype=torch.float32)
    w = dequantized_weight(q)
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 128 * 48 // 2  # two codes a byte
    assert q.weight.quant_type == "nf4" and q.weight.compress_statistics  # double quantization
    # NF4: every block of 64 weights is absmax × one of 16 levels in [−1, 1] with ±1 and 0 among them
    blocks = w.reshape(-1, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.unique(torch.round(blocks / absmax, decimals=5))
    assert len(levels) <= 16 and levels.min() == -1 and levels.max() == 1 and (levels == 0).any()
    # a 4-bit grid: close to the original, not equal to it. The widest NF4 gap is −1 … −0.6962, so rounding
    # to the nearest level errs by at most 0.152·absmax, plus the 8-bit double quantization of absmax
    err = (w - linear.weight).detach().abs().reshape(-1, BLOCKSIZE) / absmax
    assert err.max() > 0 and err.max() < 0.17
    x = torch.randn(5, 128)
    torch.testing.assert_close(q(x), x @ w.T + linear.bias, rtol=1e-5, atol=1e-5)


def test_quantize_model_keeps_the_head_and_records_itself():
    model = tiny_llama(0)
    record = quantize_model(model, compute_dtype=torch.float32)
    linears = [n for n, m in model.named_modules() if is_4bit_linear(m)]
    assert record.n_layers == len(linears) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert record.kept == ["lm_head"] and type(model.lm_head) is torch.nn.Linear
    assert (record.quant_type, record.bits, record.double_quant) == ("nf4", 4, True)
    assert model.is_loaded_in_4bit and quantization_of(model) == record
    assert quantization_of(tiny_llama(0)) is None
    assert not frozen_plain_linear(model.model.layers[0].self_attn.q_proj, torch.zeros(1, 64))


# --------------------------------------------------------------------------- every method: layer = oracle
@pytest.mark.parametrize("method,options", CASES, ids=IDS)
def test_method_on_4bit_base_matches_dequantized_linear(method, options):
    quantized, reference = _quantized_and_reference()
    pq = adapters.build(quantized, method, r=4, dropout=0.0, **options)
    pr = adapters.build(reference, method, r=4, dropout=0.0, **options)
    layer = pq.get_base_model().model.layers[1].mlp.down_proj
    assert is_4bit_linear(layer.get_base_layer())  # the adapter wraps the 4-bit module, not a copy
    _same_adapters(pq, pr)
    ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(5))
    for model in (pq, pr):
        model.train()
    logits_q, grads_q = _forward_backward(pq, ids)
    logits_r, grads_r = _forward_backward(pr, ids)
    torch.testing.assert_close(logits_q, logits_r, rtol=1e-4, atol=1e-5)
    for name, g in grads_r.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_q[name], g, rtol=1e-3, atol=1e-6, msg=name)


def test_hydralora_refuses_to_merge_into_nf4_codes():
    from geoprobe.errors import AdapterError

    quantized, _ = _quantized_and_reference()
    pm = adapters.build(quantized, "hydralora", r=4, n_heads=2, dropout=0.0)
    layers = [m for m in pm.modules() if hasattr(m, "lora_hydra_B")]
    before = layers[0].get_base_layer().weight.data.clone()
    for m in layers:  # frozen gates: mergeable on a full-precision base
        m.lora_hydra_gates["default"] = torch.tensor([0.5, 0.5])
    with pytest.raises(AdapterError, match="4-bit base"):
        layers[0].merge()
    assert torch.equal(layers[0].get_base_layer().weight.data, before)


# --------------------------------------------------------------------------- a short fine-tune
@pytest.mark.parametrize("method", ["lora", "hyplora", "hydralora"])
def test_short_finetune_on_4bit_base_lowers_the_loss(method, tmp_path):
    examples = load_examples(write_problems(tmp_path / "train.jsonl", 16))
    model = tiny_llama(0)
    quantize_model(model)  # bfloat16 compute, as on a GPU
    codes = {n: m.weight.data.clone() for n, m in model.named_modules() if is_4bit_linear(m)}
    settings = TrainSettings(lr=2e-2, max_steps=12, batch_size=4, max_length=160, warmup_ratio=0.0, save_every=100)
    run = finetune(model, bpe_tokenizer(), examples, method, out=tmp_path / "run", settings=settings,
                   progress=False, r=4, dropout=0.0)
    losses = run.result.loss_values
    assert len(losses) == 12 and all(map(lambda v: v == v, losses))
    assert sum(losses[-2:]) / 2 < losses[0] - 0.15, losses
    record = json.loads(run.results_path.read_text())
    assert record["settings"]["quantization"]["quant_type"] == "nf4"
    assert record["settings"]["quantization"]["n_layers"] == 14
    base = run.model.get_base_model()  # the 4-bit codes did not move
    for name, value in codes.items():
        module = base.get_submodule(name)  # adapted (q, k, v, up, down) or left alone (o, gate)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        assert is_4bit_linear(module) and torch.equal(module.weight.data, value), name


def test_loader_quantizes_a_model_folder(tmp_path, monkeypatch):
    """load_model(quantize="4bit") on the CPU (its device check lifted): the folder is read, linear layers
    become NF4, the head and embeddings stay bfloat16, and the logits are the dequantized model's."""
    import geoprobe.models as models

    folder = write_model_folder(tmp_path / "model")
    monkeypatch.setattr(models, "check_quantization", lambda q, d: "4bit" if q else None)
    lm = models.load_model(folder, device="cpu", quantize="4bit")
    assert quantization_of(lm.model).n_layers == 14
    assert lm.model.lm_head.weight.dtype == torch.bfloat16 and lm.info.dtype == "bfloat16"
    assert lm.info.n_parameters == sum(p.numel() for p in tiny_llama(0).parameters())
    reference = tiny_llama(0).to(torch.bfloat16)
    with torch.no_grad():
        for name, module in lm.model.named_modules():
            if is_4bit_linear(module):
                reference.get_submodule(name).weight.copy_(dequantized_weight(module))
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits.float(), reference(ids).logits.float(), rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- bad input, via the CLI
def _cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


COMMANDS = [["finetune", "--data", "train.jsonl"], ["run", "--data", "train.jsonl", "--eval", "test.jsonl"],
            ["evaluate", "--data", "test.jsonl"], ["compare", "--data", "train.jsonl", "--eval", "test.jsonl"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_cli_unknown_quantize_value_lists_the_choices(command, capsys, tmp_path):
    code, err = _cli(command + ["--quantize", "8bit", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert "--quantize 8bit" in err and "choose one of: 4bit" in err


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_cli_refuses_the_cpu(command, capsys, tmp_path):
    code, err = _cli(command + ["--quantize", "4bit", "--device", "cpu", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--quantize 4bit needs a CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_cli_names_the_install_command_without_bitsandbytes(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    code, err = _cli(["finetune", "--data", "train.jsonl", "--quantize", "4bit", "--device", "cpu",
                      "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "pip install bitsandbytes" in err and "geoprobe[qlora]" in err


def test_library_refuses_the_cpu_before_reading_the_model(tmp_path):
    from geoprobe.errors import DeviceError
    from geoprobe.models import load_model

    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        load_model(tmp_path / "no-such-model", device="cpu", quantize="4bit")


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("method,options", CASES, ids=IDS)
def test_gpu_method_on_4bit_base_matches_dequantized_linear(method, options):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    quantized, reference = _quantized_and_reference("cuda")
    pq = adapters.build(quantized, method, r=4, dropout=0.0, **options)
    pr = adapters.build(reference, method, r=4, dropout=0.0, **options)
    _same_adapters(pq, pr)
    ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(5)).cuda()
    logits_q, grads_q = _forward_backward(pq.train(), ids)
    logits_r, grads_r = _forward_backward(pr.train(), ids)
    torch.testing.assert_close(logits_q, logits_r, rtol=1e-3, atol=1e-4)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_q[name], g, rtol=1e-2, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "dora", "gelora", "hyplora", "hydralora"])
def test_gpu_finetune_through_the_loader(method, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from geoprobe.models import load_model

    folder = write_model_folder(tmp_path / "model")
    lm = load_model(folder, device="cuda", quantize="4bit")
    assert quantization_of(lm.model).compute_dtype == "bfloat16" and lm.model.lm_head.weight.is_cuda
    examples = load_examples(write_problems(tmp_path / "train.jsonl", 16))
    # 16 steps (4 epochs): HypLoRA's update starts at its small initial scale and takes longer to move the
    # loss; at 8 steps it fell 0.09 on the unquantized float32 model too (6.046 → 5.958 on a CPU)
    settings = TrainSettings(lr=1e-2, max_steps=16, batch_size=4, max_length=160, warmup_ratio=0.0, save_every=100)
    options = {"layer_ranks": [2, 6]} if method == "gelora" else {}
    run = finetune(lm.model, lm.tokenizer, examples, method, out=tmp_path / "run", settings=settings,
                   progress=False, r=4, dropout=0.0, **options)
    losses = run.result.loss_values
    assert sum(losses[-2:]) / 2 < losses[0] - 0.15, losses
    assert json.loads(run.results_path.read_text())["settings"]["quantization"]["quant_type"] == "nf4"


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_quiets_bitsandbytes_hub_kernel_notice_unless_verbose(verbose, capsys):
    from geoprobe import cli

    name = cli.NOISY_LOGGERS[0]
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.NOTSET)  # setLevel, not assignment: it also clears the loggers' level caches
    try:
        assert main(["--version"] + (["-v"] if verbose else [])) == 0
        assert "geoprobe" in capsys.readouterr().out
        assert logger.isEnabledFor(logging.WARNING) == verbose
        assert logger.isEnabledFor(logging.ERROR)  # its errors still reach the user
    finally:
        logger.setLevel(before)

