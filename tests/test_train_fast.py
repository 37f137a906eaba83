"""adapters.train.fast: the decision record for every reason the fast kernels stay off (switched off,
CPU, liger-kernel missing, Triton failing to import, an architecture Liger does not cover), applying and
reverting Liger's per-architecture patches (with a stand-in that patches as Liger does), the fused-loss
plumbing of answer_loss_sum against the plain loss, the setting and the --no-fast-kernels flag, and that
with the fast path off a run is bit for bit the run without it. GPU tests (marked gpu, skipped without
CUDA and liger-kernel): Liger's fused linear cross-entropy against F.cross_entropy, and one training step
of each method with Liger against the plain path."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.data import load_examples
from adapters.train import TrainSettings, Trainer, answer_loss_sum, answer_targets, fast, finetune
from geoprobe.cli import main
from geoprobe.errors import AdapterError

from finetune_helpers import write_problems
from tiny_models import bpe_tokenizer, tiny_bert, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return load_examples(write_problems(tmp_path_factory.mktemp("data") / "train.jsonl", 16))


def _hide_liger(monkeypatch) -> None:
    for name in [n for n in sys.modules if n == "liger_kernel" or n.startswith("liger_kernel.")]:
        monkeypatch.delitem(sys.modules, name)


# --------------------------------------------------------------------------- a stand-in for Liger
class _Stand:
    """Patches as Liger's apply_liger_kernel_to_llama does (module globals, instance forwards), with
    forwards that compute the same values and count their calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.counts = {"norm": 0, "mlp": 0, "rope": 0}

    def apply_llama(self, rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                    swiglu=True, model=None):
        from transformers.models.llama import modeling_llama

        self.calls.append(dict(rope=rope, cross_entropy=cross_entropy, rms_norm=rms_norm, swiglu=swiglu,
                               fused_linear_cross_entropy=fused_linear_cross_entropy))
        counts, original_rope = self.counts, modeling_llama.apply_rotary_pos_emb

        def rope_fn(*args, **kwargs):
            counts["rope"] += 1
            return original_rope(*args, **kwargs)

        def norm_forward(self, x):
            counts["norm"] += 1
            return modeling_llama.LlamaRMSNorm.forward(self, x)

        def mlp_forward(self, x):
            counts["mlp"] += 1
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

        modeling_llama.apply_rotary_pos_emb = rope_fn
        modeling_llama.LlamaRMSNorm = type("StandNorm", (nn.Module,), {})
        modeling_llama.LlamaMLP = type("StandMLP", (nn.Module,), {})
        norm_cls = type(model.model.norm)
        for m in model.modules():
            if type(m) is norm_cls:
                m.__dict__["forward"] = norm_forward.__get__(m)
                m.casting_mode = "llama"
            elif type(m).__name__ == "LlamaMLP":
                m.__dict__["forward"] = mlp_forward.__get__(m)


class _ReferenceFLCE(nn.Module):
    """Σ −log softmax(x Wᵀ + b)_y in float64: the stand-in for LigerFusedLinearCrossEntropyLoss(sum)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        assert reduction == "sum"

    def forward(self, weight, x, target, bias=None):
        logits = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
        return F.cross_entropy(logits, target, reduction="sum").float()


@pytest.fixture
def stand_in(monkeypatch):
    """liger_kernel.transformers(.monkey_patch) replaced by the stand-in, for model type llama."""
    _hide_liger(monkeypatch)
    stand = _Stand()
    pkg, tr, mp = (types.ModuleType(n) for n in ("liger_kernel", "liger_kernel.transformers",
                                                  "liger_kernel.transformers.monkey_patch"))
    mp.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": stand.apply_llama}
    tr.LigerFusedLinearCrossEntropyLoss = _ReferenceFLCE
    for m in (pkg, tr, mp):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield stand
    for name in set(vars(modeling_llama)) - set(saved):
        delattr(modeling_llama, name)
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


# --------------------------------------------------------------------------- why not
def test_switched_off_names_the_flag_and_imports_nothing(monkeypatch):
    _hide_liger(monkeypatch)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # an import would fail loudly
    rec = fast.decide(tiny_llama(), enabled=False, device=CUDA)
    assert not rec.applied and "--no-fast-kernels" in rec.reason and not rec.fused_loss
    assert fast.FastKernels.from_dict(rec.to_dict()) == rec


def test_cpu_model_stays_plain(monkeypatch):
    _hide_liger(monkeypatch)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    rec = fast.decide(tiny_llama())  # the model's own device: the CPU
    assert not rec.applied and "on cpu" in rec.reason and "CUDA" in rec.reason


def test_missing_package_names_the_extra(monkeypatch):
    _hide_liger(monkeypatch)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    rec = fast.decide(tiny_llama(), device=CUDA)
    assert not rec.applied and "liger-kernel is not installed" in rec.reason
    assert "pip install 'geoprobe[fast]'" in rec.reason


def test_triton_import_error_is_recorded_with_its_message(monkeypatch, tmp_path):
    _hide_liger(monkeypatch)
    root = tmp_path / "liger_kernel"
    (root / "transformers").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "transformers" / "__init__.py").write_text("")
    (root / "transformers" / "monkey_patch.py").write_text("import triton\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "triton", None)  # Triton absent (or broken) whatever is installed
    rec = fast.decide(tiny_llama(), device=CUDA)
    assert not rec.applied and rec.reason.startswith("liger-kernel cannot be imported") and "triton" in rec.reason


def test_uncovered_model_type(stand_in):
    rec = fast.decide(tiny_bert(), device=CUDA)
    assert not rec.applied and "'bert'" in rec.reason and rec.model_type == "bert"
    assert fast.apply(tiny_bert(), rec) == (rec, None)


def test_sharded_parameters_stay_plain(stand_in):
    rec = fast.decide(tiny_llama(), device=CUDA, sharded=True)
    assert not rec.applied and "FSDP" in rec.reason


# --------------------------------------------------------------------------- applying and reverting
def test_apply_patches_the_instance_only_and_reverts(stand_in):
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama import modeling_llama

    model, twin = tiny_llama(), tiny_llama()
    globals_before = dict(vars(modeling_llama))
    rec = fast.decide(model, device=CUDA)
    assert rec.applied and rec.model_type == "llama" and rec.patches == ("rope", "rms_norm", "swiglu")
    rec, handle = fast.apply(model, rec)
    # Liger's cross-entropy patches are never asked for
    assert stand_in.calls == [dict(rope=True, cross_entropy=False, rms_norm=True, swiglu=True,
                                   fused_linear_cross_entropy=False)]
    layers = model.config.num_hidden_layers
    assert rec.patched_modules == 3 * layers + 1  # final norm, two norms and the MLP per layer
    # the class swaps are undone at once; the rotary function serves CUDA tensors only
    assert modeling_llama.LlamaRMSNorm is globals_before["LlamaRMSNorm"]
    assert modeling_llama.LlamaMLP is globals_before["LlamaMLP"]
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is globals_before["apply_rotary_pos_emb"]
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        patched, plain = model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert torch.equal(patched, plain)
    assert stand_in.counts == {"norm": 2 * layers + 1, "mlp": layers, "rope": 0}  # CPU: the original RoPE
    # adapters built on the patched model run inside the patched MLP; reverting keeps them
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["up_proj", "down_proj"]))
    handle.revert()
    assert {k: v for k, v in vars(modeling_llama).items()} == globals_before
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ in ("LlamaMLP", "LlamaRMSNorm"))
    assert all(not hasattr(m, "casting_mode") for m in model.modules())
    assert peft_model.get_nb_trainable_parameters()[0] > 0
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, plain)  # LoRA B starts at zero
    handle.revert()  # idempotent
    assert {k: v for k, v in vars(modeling_llama).items()} == globals_before


def test_compiled_blocks_patch_no_module_and_keep_the_fused_loss(stand_in):
    model = tiny_llama()
    rec = fast.decide(model, device=CUDA, compiled_blocks=True)
    assert rec.applied and rec.patches == ()
    rec, handle = fast.apply(model, rec)
    assert stand_in.calls == []  # Liger's per-architecture function is not called at all
    assert rec.patched_modules == 0 and not any("forward" in vars(m) for m in model.modules())
    rec, fused = fast.fused_cross_entropy(rec, model.get_output_embeddings())
    assert rec.fused_loss and fused is not None
    assert "no module patched: the blocks are compiled" in fast.describe(rec)
    handle.revert()


def test_failed_patching_leaves_nothing_patched(stand_in):
    from transformers.models.llama import modeling_llama

    model = tiny_llama()
    globals_before = dict(vars(modeling_llama))
    real = stand_in.apply_llama

    def half_then_fail(**kwargs):
        real(**kwargs)
        raise AttributeError("no attribute 'layers'")

    sys.modules["liger_kernel.transformers.monkey_patch"].MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": half_then_fail}
    rec, handle = fast.apply(model, fast.decide(model, device=CUDA))
    assert handle is None and not rec.applied and "could not patch" in rec.reason and "'layers'" in rec.reason
    assert dict(vars(modeling_llama)) == globals_before
    assert not any("forward" in vars(m) or hasattr(m, "casting_mode") for m in model.modules())


# --------------------------------------------------------------------------- the fused loss
def _batch(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    index, target = answer_targets(labels)
    return {"input_ids": ids}, index, target


@pytest.mark.parametrize("head_kind", ["plain", "bias", "tied"])
def test_fused_loss_feeds_the_answer_rows_and_head(stand_in, head_kind):
    model = tiny_llama()
    if head_kind == "bias":
        torch.manual_seed(5)
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    elif head_kind == "tied":
        model.lm_head.weight = model.model.embed_tokens.weight
        model.model.embed_tokens.weight.requires_grad_(True)
    rec, handle = fast.apply(model, fast.decide(model, device=CUDA))
    rec, fused = fast.fused_cross_entropy(rec, model.get_output_embeddings())
    assert rec.fused_loss and rec.fused_loss_reason == "" and isinstance(fused, _ReferenceFLCE)
    inputs, index, target = _batch(model)
    shapes = []
    model.lm_head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    got = answer_loss_sum(model, inputs, index, target, fused=fused)
    assert shapes == [(0, model.config.vocab_size)]  # the output layer computed no logits itself
    grads_fused = torch.autograd.grad(got, [p for p in model.parameters() if p.requires_grad])
    want = answer_loss_sum(model, inputs, index, target)  # the plain path
    grads_plain = torch.autograd.grad(want, [p for p in model.parameters() if p.requires_grad])
    logits = model(**inputs).logits.double().flatten(0, 1)[index]  # the formula, from the full logits
    assert float(got.detach()) == pytest.approx(float(F.cross_entropy(logits, target, reduction="sum")), rel=1e-6)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for a, b in zip(grads_fused, grads_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    handle.revert()


def test_fused_loss_refused_for_wrapped_head_and_other_architectures(stand_in):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    rec, handle = fast.apply(model, fast.decide(model, device=CUDA))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    off, fused = fast.fused_cross_entropy(rec, peft_model.get_output_embeddings())
    assert fused is None and not off.fused_loss and "not a plain Linear" in off.fused_loss_reason
    other, fused = fast.fused_cross_entropy(fast.FastKernels(applied=True, model_type="gemma2"), nn.Linear(4, 8))
    assert fused is None and "'gemma2'" in other.fused_loss_reason
    double, fused = fast.fused_cross_entropy(rec, nn.Linear(4, 8).double())
    assert fused is None and "float64" in double.fused_loss_reason
    handle.revert()


def test_no_answer_rows_take_the_plain_path(stand_in):
    model = tiny_llama()
    inputs, _, _ = _batch(model)
    empty = torch.zeros(0, dtype=torch.long)
    calls = []
    loss = answer_loss_sum(model, inputs, empty, empty, fused=lambda *a: calls.append(a))
    assert calls == [] and float(loss) == 0.0


# --------------------------------------------------------------------------- the setting and the flag
def test_setting_is_a_bool_and_not_part_of_the_run_identity():
    assert TrainSettings().fast_kernels is True
    with pytest.raises(AdapterError, match="fast_kernels = 'no'.*--no-fast-kernels"):
        TrainSettings(fast_kernels="no")
    from adapters.train.settings import NOT_COMPARED

    assert "fast_kernels" in NOT_COMPARED  # a run may resume on a machine with or without Liger
    assert TrainSettings.from_dict({"lr": 1e-3}).fast_kernels is True  # results written before the setting


@pytest.mark.parametrize("command", ["finetune", "run", "compare"])
def test_flags_reach_the_settings(command, monkeypatch):
    """--no-fast-kernels, --compile and --gradient-checkpointing reach the TrainSettings of every training
    command."""
    import geoprobe.cli as cli

    seen = []
    real = cli._train_settings

    def stop_after(args):  # the settings are made before any data or model is read: stop there
        seen.append(real(args))
        raise SystemExit(7)

    monkeypatch.setattr(cli, "_train_settings", stop_after)
    base = {"finetune": ["finetune", "--data", "x.jsonl"], "run": ["run", "--data", "x", "--eval", "y"],
            "compare": ["compare", "--data", "x", "--eval", "y", "--out", "o"]}[command]
    for extra, field, want in (([], "fast_kernels", True), (["--no-fast-kernels"], "fast_kernels", False),
                               ([], "compile", False), (["--compile"], "compile", True),
                               ([], "compile_mode", "auto"), (["--compile-mode", "reduce-overhead"], "compile", True),
                               (["--compile-mode", "reduce-overhead"], "compile_mode", "reduce-overhead"),
                               ([], "gradient_checkpointing", False),
                               (["--gradient-checkpointing"], "gradient_checkpointing", True)):
        with pytest.raises(SystemExit):
            main([*base, *extra])
        assert getattr(seen.pop(), field) == want


def test_flag_is_refused_where_nothing_trains(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--data", "x.jsonl", "--no-fast-kernels"])
    assert exc.value.code == 2 and "--no-fast-kernels" in capsys.readouterr().err


def test_fast_path_off_changes_nothing(examples, tmp_path, monkeypatch, caplog):
    """On the CPU (kernels off whatever the setting) and switched off, the runs are the same bit for bit,
    and each records why the fast path was off, in one log line."""
    tok = bpe_tokenizer()
    runs = {}
    for on in (True, False):
        s = TrainSettings(lr=5e-3, max_steps=2, batch_size=2, max_length=160, seed=1, fast_kernels=on)
        with caplog.at_level("INFO", logger="adapters.train.trainer"):
            runs[on] = finetune(tiny_llama(), tok, examples, "hyplora", out=tmp_path / str(on), settings=s,
                                progress=False, r=4)
    a, b = ({n: p for n, p in r.model.named_parameters() if p.requires_grad} for r in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[True].result.loss_values == runs[False].result.loss_values
    on, off = (r.result.settings["fast_kernels"] for r in runs.values())
    assert not on["applied"] and "on cpu" in on["reason"]
    assert not off["applied"] and "--no-fast-kernels" in off["reason"]
    assert runs[False].result.settings["fast_kernels"] == fast.FastKernels.from_dict(off).to_dict()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast kernels")]
    assert lines == ["fast kernels off: " + on["reason"], "fast kernels off: " + off["reason"]]


# --------------------------------------------------------------------------- on a GPU, with Liger
def _liger_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


gpu_liger = [pytest.mark.gpu, pytest.mark.skipif(not _liger_ready(), reason="needs CUDA and liger-kernel")]


@pytest.mark.gpu
@pytest.mark.skipif(not _liger_ready(), reason="needs CUDA and liger-kernel")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_fused_ce_matches_cross_entropy(bias, dtype):
    """Liger's fused linear cross-entropy (sum) against F.cross_entropy of the materialised logits in
    float64: the loss and the gradients of the rows, the weight and the bias."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 37, 64, 1000
    x = torch.randn(n, h, device="cuda", generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, device="cuda", generator=g) / h ** 0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(v, device="cuda", generator=g) / 10).to(dtype).requires_grad_(True) if bias else None
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products in float32
    try:
        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, x, y, b)
        leaves = [x, w] + ([b] if bias else [])
        got = torch.autograd.grad(loss * 0.5, leaves)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True) if bias else None
    ref = F.cross_entropy(F.linear(x64, w64, b64), y, reduction="sum")
    want = torch.autograd.grad(ref * 0.5, [x64, w64] + ([b64] if bias else []))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert float(loss) == pytest.approx(float(ref), rel=tol)
    for a, e in zip(got, want):
        assert float((a.double() - e).norm() / e.norm()) < tol


@pytest.mark.parametrize("method,extra", [
    pytest.param("lora", {}, marks=gpu_liger),
    pytest.param("dora", {}, marks=gpu_liger),
    pytest.param("hyplora", {}, marks=gpu_liger),
    pytest.param("hydralora", {"n_heads": 3}, marks=gpu_liger),
    pytest.param("gelora", {"layer_ranks": [2, 5]}, marks=gpu_liger),
])
def test_liger_step_matches_the_plain_step(method, extra, examples, tmp_path):
    """One training step of a tiny Llama on CUDA (bf16 autocast) with Liger's kernels and fused loss and
    without: the same loss and adapter gradients to bf16 rounding."""
    tok = bpe_tokenizer()
    grads, losses, records = {}, {}, {}
    for on in (False, True):
        s = TrainSettings(lr=1e-3, max_steps=1, batch_size=2, max_length=160, max_grad_norm=None, seed=4,
                          fast_kernels=on)
        trainer = Trainer(tiny_llama().cuda(), tok, examples, method, out=tmp_path / str(on), settings=s,
                          build_kwargs=dict(r=4, dropout=0.0, **extra))
        trainer.setup()
        trainer.start(progress=False)
        trainer.step()
        grads[on] = {n: p.grad.detach().double() for n, p in trainer.named}
        losses[on], records[on] = trainer.loss_values[-1], trainer.fast
        trainer.finish()
    rec = records[True]
    assert rec.applied and rec.fused_loss and rec.model_type == "llama" and rec.patched_modules == 3 * 2 + 1
    assert not records[False].applied
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
    assert grads[True].keys() == grads[False].keys()
    for name, want in grads[False].items():
        scale = float(want.norm())
        if scale > 0:
            assert float((grads[True][name] - want).norm()) / scale < 3e-2, name


def test_liger_optional_backend_warnings_are_dropped_and_others_kept(caplog):
    """Liger's per-kernel warnings about optional backends it could not import (the text its registry
    logs) are dropped once the filter is on; any other warning of that logger still shows."""
    fast.quiet_optional_backends()
    fast.quiet_optional_backends()  # installed once
    logger = logging.getLogger(fast.LIGER_BACKEND_LOGGER)
    assert sum(isinstance(f, fast._QuietOptionalBackends) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=fast.LIGER_BACKEND_LOGGER):
        logger.warning("Backend impl '%s' for op '%s' could not be imported: %s: %s",
                       "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError", "no CuTe DSL")
        logger.warning("no implementation of op %s for device %s", "rope", "cuda")
    assert [r.getMessage() for r in caplog.records] == ["no implementation of op rope for device cuda"]
