"""Fused HypLoRA kernels (adapters.kernels.hyplora_fused) against the literal map chain in float64.

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

from adapters.hyplora import (HypLoraLinear, _bottleneck, hyplora_config, hyplora_delta,
                              hyplora_delta_bottleneck, inverse_positive, positive)
from adapters.kernels import hyplora_fused
from adapters.kernels.hyplora_fused import (fused_unsupported_reason, hyplora_bottleneck_fused,
                                            set_fused_enabled)

REPO = Path(__file__).resolve().parents[1]
LOGGER = "adapters.kernels.hyplora_fused"
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


_INTERPRETER_SCRIPT = r"""
import math, sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_hyplora_fused import _inputs, _grads, _chain, _fused, _rel
from adapters.kernels.hyplora_fused import fused_unsupported_reason
worst = 0.0
for (T, d_in, d_out, r, K, b_scale) in [(19, 33, 21, 5, 1.7, 0.3), (8, 40, 12, 16, 0.4, 1e-5)]:
    t = _inputs(T, d_in, d_out, r, K, torch.float64, "cpu", b_scale=b_scale)
    assert fused_unsupported_reason(*t) is None
    out, grads = _grads(_fused(0.37), t)
    ref, ref_grads = _grads(_chain(0.37), t)
    worst = max([worst, _rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_grads)])
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
def test_layer_on_cuda_runs_fused_and_matches_chain(fresh_log, caplog):
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
