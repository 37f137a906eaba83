"""Fused HypLoRA kernels (adapters.hyplora.kernels.fused) against the literal map chain in float64.

GPU tests (marked ``gpu``) compare output and every gradient (x, A, B, raw curvature, raw scale) with
:func:`adapters.hyplora.hyplora_delta` on fresh random inputs that cover the series branches, the sinh
clamp, ranks that are not powers of two and token counts that are not multiples of a block. CPU tests
check that inputs the kernels do not cover go through the reference path with one logged line, and
(when Triton is importable) run the same kernels under Triton's interpreter.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.hyplora import (HypLoraLinear, hyplora_config, hyplora_delta, hyplora_delta_bottleneck,
                              inverse_positive, positive)
from adapters.hyplora.functional import bottleneck as _bottleneck
from adapters.hyplora.kernels import fused as hyplora_fused
from adapters.hyplora.kernels.fused import (fused_unsupported_reason, hyplora_bottleneck_fused,
                                            set_fused_enabled)
from adapters.kernels import _internals, native

REPO = Path(__file__).resolve().parents[1]
LOGGER = "adapters.hyplora.kernels.fused"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA (run on the GPU machine: pytest -m gpu)")


def _inputs(T, d_in, d_out, r, K, dtype, device, *, b_scale=0.3, lead=None, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64) * 2.0
    # one row per regime: zero, tiny (series in u), huge (sinh clamp at 12), the rest ordinary
    x[0] = 0.0
    x[1] *= 1e-5
    x[2] *= 1e4
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * b_scale
    rk = torch.tensor(inverse_positive(K), dtype=torch.float64)
    rs = torch.tensor(inverse_positive(math.sqrt(d_in)) + 0.3 * float(torch.randn(1, generator=g)),
                      dtype=torch.float64)
    if lead is not None:
        x = x.reshape(*lead, d_in)
    return [t.to(device=device, dtype=dtype) for t in (x, A, B, rk, rs)]


def _grads(fn, tensors, gout_seed=0):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(gout_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, g.to(out.device, out.dtype))
    return out.detach(), grads


def _chain(scale):
    def fn(x, A, B, rk, rs):
        return scale * hyplora_delta(x, A, B, positive(rk), positive(rs))
    return fn


def _fused(scale):
    def fn(x, A, B, rk, rs):
        return hyplora_bottleneck_fused(x, A, B, rk, rs, scale)
    return fn


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(params=["native", "python"])
def layer_node(request):
    """The layer's node: the C++ one of adapters.kernels.native where it is built, or the Python one."""
    previous = native.set_native_mode("auto" if request.param == "native" else "off")
    yield request.param
    native.set_native_mode(previous)


@pytest.fixture
def python_node():
    previous = native.set_native_mode("off")
    yield
    native.set_native_mode(previous)


# ============================================================================ CPU: the fallback
@pytest.fixture
def fresh_log():
    hyplora_fused._REPORTED.clear()
    yield
    hyplora_fused._REPORTED.clear()


@pytest.mark.skipif(torch.cuda.is_available() or hyplora_fused._interpreting(),
                    reason="checks the path taken without CUDA")
def test_cpu_uses_reference_path_with_one_log_line(fresh_log, caplog):
    t = _inputs(9, 12, 7, 4, 1.3, torch.float32, "cpu", seed=1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out, grads = _grads(_fused(2.0), t)
        out2, _ = _grads(_fused(2.0), t)
    lines = [r for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "reference path" in lines[0].getMessage()
    # the reference path is _bottleneck itself: identical values and gradients
    ref_out, ref_grads = _grads(lambda x, A, B, rk, rs: _bottleneck(x, A, B, positive(rk), positive(rs),
                                                                    official=False, out_scale=2.0), t)
    assert torch.equal(out, ref_out) and torch.equal(out2, ref_out)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case,expect", [
    ("bf16", "dtypes"),
    ("rank", "rank 65"),
    ("per_token_k", "per-token"),
    ("empty", "no tokens"),
    ("mixed", "dtypes"),
])
def test_unsupported_inputs_name_their_reason_and_match_reference(fresh_log, caplog, case, expect):
    x, A, B, rk, rs = _inputs(6, 10, 5, 65 if case == "rank" else 3, 0.8, torch.float32, "cpu", seed=2)
    if case == "bf16":
        x, A, B = x.bfloat16(), A.bfloat16(), B.bfloat16()
    elif case == "per_token_k":
        rk = rk.expand(6, 1).clone()
    elif case == "empty":
        x = x[:0]
    elif case == "mixed":
        x = x.double()
    reason = fused_unsupported_reason(x, A, B, rk, rs)
    assert reason is not None and expect in reason
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = hyplora_bottleneck_fused(x, A, B, rk, rs, 1.5)
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1
    ref = _bottleneck(*[t.to(out.dtype) for t in (x, A, B)], positive(rk).to(out.dtype),
                      positive(rs).to(out.dtype), official=False, out_scale=1.5)
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_switch_off_uses_reference_path(fresh_log, caplog):
    t = _inputs(5, 8, 6, 2, 1.0, torch.float32, "cuda" if torch.cuda.is_available() else "cpu", seed=3)
    previous = set_fused_enabled(False)
    try:
        assert "switched off" in fused_unsupported_reason(*t)
        with caplog.at_level(logging.INFO, logger=LOGGER):
            out = hyplora_bottleneck_fused(*t, 1.0)
        assert any("switched off" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    finally:
        set_fused_enabled(previous)
    ref = _bottleneck(t[0], t[1], t[2], positive(t[3]), positive(t[4]), official=False)
    assert torch.equal(out, ref)


def test_layer_on_cpu_matches_bottleneck_reference(fresh_log):
    torch.manual_seed(4)
    base = torch.nn.Linear(12, 9, bias=False)
    layer = HypLoraLinear(base, "default", config=hyplora_config(4, 8, ["x"], init_lora_weights=False),
                          r=4, lora_alpha=8)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        out = layer(x)
        K, s = layer.hyp_curvature("default"), layer.hyp_scale("default")
        ref = base(x) + 2.0 * hyplora_delta_bottleneck(x, layer.lora_A["default"].weight,
                                                        layer.lora_B["default"].weight, K, s)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)


def _layer(d_in, d_out, r, *, base_dtype=torch.float32, dropout=0.0, official=False, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=False).to(base_dtype).requires_grad_(False)
    cfg = hyplora_config(r, 2 * r, ["x"], init_lora_weights=False, official=official, lora_dropout=dropout)
    layer = HypLoraLinear(base, "default", config=cfg, r=r, lora_alpha=2 * r, lora_dropout=dropout)
    for name, prm in layer.named_parameters():  # adapter weights in float32, as PEFT's autocast keeps them
        if "lora" in name:
            prm.data = prm.data.float()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.3)
    return layer


@pytest.mark.parametrize("official", [False, True])
def test_layer_with_private_apis_off_gives_the_same_bits_without_native_nodes(python_node, official):
    """Without the native nodes the CPU layer never needs a private entry point: switching them off
    (adapters.kernels._internals.set_private_apis(False)) changes no value and no gradient."""
    layer = _layer(20, 14, 5, official=official, seed=9)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(9))
    runs = []
    for private in (True, False):
        previous = _internals.set_private_apis(private)
        try:
            out, grads = _grads(lambda xx: layer(xx), [x])
            params = torch.autograd.grad(layer(x).sum(), [p for p in layer.parameters() if p.requires_grad])
        finally:
            _internals.set_private_apis(previous)
        runs.append([out, *grads, *params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_lean_layer_path_is_chosen_only_for_one_plain_hyplora_adapter(monkeypatch):
    """The one-node layer path serves exactly: one active, unmerged, consistent-map HypLoRA adapter,
    no extra forward arguments, kernels available (forced here, whatever the machine has)."""
    import adapters.hyplora.layer as hyp

    calls = []
    monkeypatch.setattr(hyp, "linear_fast_path", lambda x, A, B: calls.append(1) or True)
    layer = _layer(12, 9, 4)
    x = torch.randn(2, 3, 12)
    assert layer._hyp_fast_adapter(x, (), {}) == "default"
    assert layer._hyp_fast_adapter(x, (1,), {}) is None
    assert layer._hyp_fast_adapter(x, (), {"adapter_names": ["default"] * 2}) is None
    from peft import LoraConfig

    layer.update_layer("plain", 4, lora_alpha=8, config=LoraConfig(r=4, lora_alpha=8))
    layer.set_adapter(["default", "plain"])
    assert layer._hyp_fast_adapter(x, (), {}) is None  # two active adapters
    layer.set_adapter("plain")
    assert layer._hyp_fast_adapter(x, (), {}) is None  # a plain LoRA adapter
    layer.set_adapter("default")
    assert layer._hyp_fast_adapter(x, (), {}) == "default"
    layer.enable_adapters(False)
    assert layer._hyp_fast_adapter(x, (), {}) is None
    official = _layer(12, 9, 4, official=True)
    assert official._hyp_fast_adapter(x, (), {}) is None
    monkeypatch.setattr(hyp, "linear_fast_path", lambda x, A, B: False)
    assert _layer(12, 9, 4)._hyp_fast_adapter(x, (), {}) is None


@pytest.mark.skipif(torch.cuda.is_available() or hyplora_fused._interpreting(),
                    reason="checks the path taken without CUDA")
def test_linear_fast_path_is_off_on_cpu():
    x, A, B, _, _ = _inputs(6, 10, 5, 3, 0.8, torch.float32, "cpu", seed=5)
    assert not hyplora_fused.linear_fast_path(x, A, B)


_INTERPRETER_SCRIPT = r"""
import math, sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_hyplora_fused import _inputs, _grads, _chain, _fused, _rel
from adapters.hyplora.kernels.fused import fused_unsupported_reason
worst = 0.0
for (T, d_in, d_out, r, K, b_scale) in [(19, 33, 21, 5, 1.7, 0.3), (8, 40, 12, 16, 0.4, 1e-5)]:
    t = _inputs(T, d_in, d_out, r, K, torch.float64, "cpu", b_scale=b_scale)
    assert fused_unsupported_reason(*t) is None
    out, grads = _grads(_fused(0.37), t)
    ref, ref_grads = _grads(_chain(0.37), t)
    worst = max([worst, _rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_grads)])
from tests.test_hyplora_fused import _layer_vs_chain
for base_dtype, shape in [(torch.float64, (2, 19, 33, 1100, 5)), (torch.float32, (1, 7, 40, 12, 16))]:
    errs = _layer_vs_chain(base_dtype, shape, "cpu")
    worst = max([worst] + errs) if base_dtype == torch.float64 else worst
print("WORST", worst)
"""


def _interpreter_works() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:
        return f"Triton is not importable ({exc})"
    return None


def test_kernels_under_triton_interpreter_match_chain():
    why = _interpreter_works()
    if why:
        pytest.skip(why)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, str(REPO)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "InterpreterError" in proc.stderr and "Python scalars" in proc.stderr:
        pytest.skip("this Triton's interpreter does not run with the installed numpy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[1])
    # the interpreter forms sinh/asinh from exp/log (≈ ε/√u relative error), hence 1e-9 not 1e-12
    assert worst < 1e-9, worst


# ============================================================================ GPU
CASES = [  # T, d_in, d_out, r, K, b_scale
    (37, 50, 70, 32, 1.0, 0.3),
    (5, 20, 9, 5, 0.3, 0.3),
    (300, 96, 130, 16, 2.5, 1e-5),   # ‖y‖²/K below the series cut-off
    (129, 64, 40, 64, 1.3, 0.3),
    (64, 33, 17, 1, 1.0, 3.0),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", CASES)
def test_fused_float64_matches_chain(case, fresh_log, caplog):
    T, d_in, d_out, r, K, b_scale = case
    t = _inputs(T, d_in, d_out, r, K, torch.float64, "cuda", b_scale=b_scale)
    assert fused_unsupported_reason(*t) is None
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out, grads = _grads(_fused(0.37), t)
    assert not [r for r in caplog.records if r.name == LOGGER]  # the kernels ran
    ref, ref_grads = _grads(_chain(0.37), t)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-12
    for name, a, b in zip(["x", "A", "B", "raw_k", "raw_s"], grads, ref_grads):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-10, (name, _rel(a, b))


@pytest.mark.gpu
@needs_cuda
def test_fused_float32_close_to_float64_chain_with_batch_dims():
    t = _inputs(3 * 41, 128, 96, 32, 1.0, torch.float64, "cuda", lead=(3, 41))
    ref, ref_grads = _grads(_chain(4.0), t)
    out, grads = _grads(_fused(4.0), [v.float() for v in t])
    assert out.dtype == torch.float32 and out.shape == (3, 41, 96)
    assert _rel(out, ref) < 1e-5
    for name, a, b in zip(["x", "A", "B", "raw_k", "raw_s"], grads, ref_grads):
        assert a.dtype == torch.float32 and _rel(a, b) < 1e-4, (name, _rel(a, b))


@pytest.mark.gpu
@needs_cuda
def test_fused_every_output_written():
    """Outputs come from torch.empty; two calls after filling the cache with NaN give equal results."""
    t = _inputs(257, 64, 48, 32, 1.0, torch.float32, "cuda")
    first, g1 = _grads(_fused(1.0), t)
    junk = torch.full((64 << 20,), float("nan"), device="cuda")  # recycle memory as NaN
    del junk
    second, g2 = _grads(_fused(1.0), t)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_backward_under_autocast_equals_backward_outside_it(layer_node):
    """A caller that runs backward() inside its bfloat16 autocast region (the engine hands that state to
    every node's backward) gets the gradients of one that runs it outside: the nodes' backward computes
    in the adapter's float32 either way. Before, the Python node's products came out in bfloat16 there
    and its last float32 product stopped the step with a dtype error."""
    layer = _layer(96, 80, 8, base_dtype=torch.bfloat16, seed=5).cuda()
    x0 = torch.randn(2, 17, 96, device="cuda", dtype=torch.bfloat16,
                     generator=torch.Generator("cuda").manual_seed(11))
    grads = {}
    for inside in (False, True):
        x = x0.clone().requires_grad_(True)
        for prm in layer.parameters():
            prm.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = layer(x).float().square().sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads[inside] = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    assert len(grads[True]) == 5 and all(g is not None for g in grads[True])
    for a, b in zip(grads[False], grads[True]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_layer_on_cuda_runs_fused_and_matches_chain(fresh_log, caplog, layer_node):
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    dev = torch.device("cuda")
    base = torch.nn.Linear(256, 192, bias=False).to(dev, torch.bfloat16).requires_grad_(False)
    layer = HypLoraLinear(base, "default", config=hyplora_config(32, 128, ["x"], init_lora_weights=False),
                          r=32, lora_alpha=128).to(dev)
    x = torch.randn(2, 50, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = layer(x)
        out.float().square().sum().backward()
    assert not [r for r in caplog.records if r.name == LOGGER]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    raw_k, raw_s = layer.lora_hyp_k["default"], layer.lora_hyp_s["default"]
    leaves = [v.detach().double().clone().requires_grad_(True) for v in (A, B, raw_k, raw_s)]
    ref = base(x.detach()).double() + 4.0 * hyplora_delta(x.detach().double(), leaves[0], leaves[1],
                                                          positive(leaves[2]), positive(leaves[3]))
    assert _rel(out, ref) < 1e-2  # bf16 output
    gref = torch.autograd.grad(ref.square().sum(), leaves)
    for name, p, g in zip(["A", "B", "raw_k", "raw_s"], (A, B, raw_k, raw_s), gref):
        assert _rel(p.grad, g) < 2e-2, name


@pytest.mark.gpu
@needs_cuda
def test_rank_above_limit_falls_back_on_cuda(fresh_log, caplog):
    t = _inputs(20, 30, 25, 80, 1.0, torch.float64, "cuda")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out, grads = _grads(_fused(1.0), t)
    assert len([r for r in caplog.records if r.name == LOGGER and "rank 80" in r.getMessage()]) == 1
    ref, ref_grads = _grads(_chain(1.0), t)
    assert _rel(out, ref) < 1e-12


def _float64_chain(layer, x, g):
    """Output and gradients (x, A, B, raw K, raw s) of base(x) + (α/r)·hyplora_delta in float64, on the
    layer's own values; ``g`` the incoming gradient, as the layer receives it."""
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_hyp_k["default"], layer.lora_hyp_s["default"]]
    leaves = [v.detach().double().clone().requires_grad_(True) for v in [x] + params]
    w = layer.base_layer.weight.detach().double()
    ref = leaves[0] @ w.T + layer.scaling["default"] * hyplora_delta(leaves[0], leaves[1], leaves[2],
                                                                    positive(leaves[3]), positive(leaves[4]))
    return ref.detach(), torch.autograd.grad(ref, leaves, g.double())


def _layer_vs_chain(base_dtype, shape, device, *, dropout=0.0, autocast=False, seed=None):
    """Relative errors of the layer's output and of the gradients of x, A, B, raw K, raw s against
    base(x) + (α/r)·hyplora_delta in float64 (the lean path must be the one taken)."""
    import adapters.hyplora.layer as hyp

    lead, T, d_in, d_out, r = shape
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    layer = _layer(d_in, d_out, r, base_dtype=base_dtype, dropout=dropout, seed=seed).to(device)
    if base_dtype == torch.float64:
        layer.double()
    x = (torch.randn(lead, T, d_in, dtype=torch.float64, device=device) * 2.0)
    x[0, 0] = 0.0
    x[0, 1] *= 1e-5
    x = x.to(base_dtype).requires_grad_(True)
    assert layer._hyp_fast_adapter(x, (), {}) == "default"
    taken = []
    original, original_layer = hyp.hyplora_linear_fused, hyp.hyplora_layer_native

    def whole_layer(*a):
        out = original_layer(*a)
        if out is not None:
            taken.append(1)
        return out

    hyp.hyplora_linear_fused = lambda *a: taken.append(1) or original(*a)
    hyp.hyplora_layer_native = whole_layer
    try:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
    finally:
        hyp.hyplora_linear_fused, hyp.hyplora_layer_native = original, original_layer
    assert len(taken) == 1 and out.dtype == base_dtype and out.shape == (lead, T, d_out)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    g = g.to(out.dtype).double()  # the reference gets the incoming gradient exactly as the layer does
    out.backward(g.to(device, out.dtype))
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_hyp_k["default"], layer.lora_hyp_s["default"]]
    ref, grads = _float64_chain(layer, x, g.to(device))
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in [x] + params)
    return [_rel(out, ref)] + [_rel(v.grad, q) for v, q in zip([x] + params, grads)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(2, 19, 33, 1100, 5), (1, 300, 96, 130, 32), (3, 41, 128, 64, 64)])
def test_lean_layer_float64_matches_chain(shape, layer_node):
    errs = _layer_vs_chain(torch.float64, shape, "cuda")
    assert max(errs) < 1e-10, errs


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_layer_bf16_base_float32_adapter_close_to_chain(autocast, layer_node):
    errs = _layer_vs_chain(torch.bfloat16, (2, 50, 256, 192, 32), "cuda", autocast=autocast)
    assert errs[0] < 1e-2 and max(errs[1:]) < 2e-2, errs  # bf16 output and incoming gradient


@pytest.mark.gpu
@needs_cuda
def test_lean_layer_with_dropout_matches_chain_on_the_same_mask(layer_node):
    """Dropout is drawn once, before the fused node; replaying the RNG gives the same mask, and the
    layer then equals base(x) + (α/r)·Δ(dropout(x)) in float64 in output and every gradient."""
    layer = _layer(96, 80, 16, dropout=0.2, seed=7).cuda().double()
    x = torch.randn(2, 33, 96, device="cuda", dtype=torch.float64, requires_grad=True)
    assert layer._hyp_fast_adapter(x, (), {}) == "default"
    torch.manual_seed(11)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_hyp_k["default"], layer.lora_hyp_s["default"]]
    leaves = [v.detach().clone().requires_grad_(True) for v in [x] + params]
    torch.manual_seed(11)
    xd = layer.lora_dropout["default"](leaves[0])
    assert 0 < int((xd == 0).sum()) < xd.numel()  # a real mask was drawn
    ref = leaves[0] @ layer.base_layer.weight.T + 2.0 * hyplora_delta(
        xd, leaves[1], leaves[2], positive(leaves[3]), positive(leaves[4]))
    grads = torch.autograd.grad(ref, leaves, g)
    assert _rel(out, ref) < 1e-12
    for name, v, q in zip(["x", "A", "B", "raw_k", "raw_s"], [x] + params, grads):
        assert _rel(v.grad, q) < 1e-10, name


@pytest.mark.gpu
@needs_cuda
def test_direct_launch_equals_triton_launch_across_specialisations(python_node):
    """Token counts 1, 16, 17 and 64 hit different Triton specialisations (== 1, divisible by 16);
    launching the cached compiled kernels directly gives the same bits as Triton's own launch."""
    layer = _layer(96, 80, 16, seed=3).cuda()
    outs = {}
    jit_runs = []
    kernel = hyplora_fused._fwd_linear_kernel
    original_run = kernel.run
    kernel.run = lambda *a, **k: jit_runs.append(1) or original_run(*a, **k)
    hyplora_fused._FWD_LINEAR.cache.clear()
    for direct in (True, False):
        previous = _internals.set_private_apis(direct)
        try:
            for T in (1, 16, 17, 64, 17, 1):
                x = torch.randn(T, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(T),
                                requires_grad=True)
                for prm in layer.parameters():
                    prm.grad = None
                out = layer(x)
                out.square().sum().backward()
                outs.setdefault(T, []).append([out.detach(), x.grad] + [p.grad for p in layer.parameters()
                                                                        if p.grad is not None])
        finally:
            _internals.set_private_apis(previous)
        if direct:  # T = 16 and 64 share a specialisation, 17 and 1 come back: 3 of 6 launches compile
            assert len(jit_runs) == 3, len(jit_runs)
    del kernel.run
    assert len(jit_runs) == 3 + 6  # Triton's own path for every launch when switched off
    for T, runs in outs.items():
        first = runs[0]
        for other in runs[1:]:
            assert len(other) == len(first) == 6
            for a, b in zip(first, other):
                assert torch.equal(a, b), T
