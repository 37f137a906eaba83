"""HypLoRA: the pure map against 50-digit and float64 oracles, the reference code's formula, and the
PEFT layer against PEFT's own bar for a new method (tests/test_custom_models.py in PEFT)."""
from __future__ import annotations

import copy
import functools
import math
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from adapters.hyplora import (NOT_MERGEABLE, REFERENCE_DEFAULT_CURVATURE, HypLoraLinear, HypLoraOptions,
                              hyplora_config, hyplora_delta, hyplora_delta_bottleneck, hyplora_options,
                              inverse_positive, positive, register_hyplora)
from geoprobe.errors import AdapterError, InputDataError

import tiny_models

mpmath.mp.dps = 50
REPO = Path(__file__).resolve().parents[1]


# ============================================================================ oracles
def _mp_delta(x, A, B, K, s) -> np.ndarray:
    """HypLoRA Δ in 50-digit arithmetic, literally as written in the paper / METHODS §6."""
    K, s = mpmath.mpf(float(K)), mpmath.mpf(float(s))
    sk = mpmath.sqrt(K)
    xm = [mpmath.mpf(float(c)) for c in x]
    nx = mpmath.sqrt(sum(c * c for c in xm))
    if nx == 0:
        return np.zeros(B.shape[0])
    t = min(nx / s / sk, mpmath.mpf(12))
    xs = [sk * mpmath.sinh(t) * c / nx for c in xm]
    a = [sum(mpmath.mpf(float(A[i, j])) * xs[j] for j in range(A.shape[1])) for i in range(A.shape[0])]
    y = [sum(mpmath.mpf(float(B[i, j])) * a[j] for j in range(B.shape[1])) for i in range(B.shape[0])]
    ny = mpmath.sqrt(sum(c * c for c in y))
    if ny == 0:
        return np.zeros(B.shape[0])
    y0 = mpmath.sqrt(ny * ny + K)
    d = sk * mpmath.acosh(y0 / sk)
    return np.array([float(d * c / ny) for c in y])


def _reference_numpy(x, A, B, K, s) -> np.ndarray:
    """The reference implementation's formula (METHODS §6), float64 numpy: time part sqrt(‖y‖² + 1/K),
    norms clamped at 1e-7, arccosh guard where(θ < 1.01, sqrt(2·max(θ−1, 1e-6)), arccosh(max(θ, 1+1e-7)))."""
    sk = np.sqrt(K)
    xn = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
    x_space = sk * np.sinh(np.minimum(xn / s / sk, 12.0)) * x / xn
    y = x_space @ A.T @ B.T
    y0 = np.sqrt((y ** 2).sum(-1, keepdims=True) + 1.0 / max(K, 1e-6))
    yn = np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-7)
    theta = y0 / sk
    eps = np.maximum(theta - 1.0, 1e-6)
    with np.errstate(invalid="ignore"):
        ac = np.where(theta < 1.01, np.sqrt(2.0 * eps), np.arccosh(np.maximum(theta, 1.0 + 1e-7)))
    return sk * ac * y / yn


def _inputs(seed, n=7, d_in=12, r=3, d_out=10, dtype=torch.float64, x_norms=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    if x_norms is not None:
        x = x / x.norm(dim=-1, keepdim=True) * torch.tensor(x_norms, dtype=dtype)[:, None]
    A = torch.randn(r, d_in, generator=g, dtype=dtype) / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=g, dtype=dtype) / math.sqrt(r)
    return x, A, B


# ============================================================================ the pure map
X_NORMS = [0.0, 1e-9, 1e-4, 0.3, 2.0, 9.0, 40.0, 400.0, 2.7e4]  # 40+ hit the sinh clamp at s = 3


@pytest.mark.parametrize("K", [0.3, 1.0, 2.5])
def test_delta_matches_50_digit_closed_form(K):
    x, A, B = _inputs(10 + int(K * 10), n=len(X_NORMS), x_norms=X_NORMS)
    s = 3.0
    want = np.stack([_mp_delta(xr, A.numpy(), B.numpy(), K, s) for xr in x.numpy()])
    for fn in (hyplora_delta, hyplora_delta_bottleneck):
        got = fn(x, A, B, K, s).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300, err_msg=fn.__name__)
    # float32 on the same inputs (LLM-sized norms included)
    got32 = hyplora_delta_bottleneck(x.float(), A.float(), B.float(), K, s).double().numpy()
    rel = np.linalg.norm(got32 - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-300)
    assert np.all(rel[1:] < 2e-6), rel
    assert np.all(got32[0] == 0)


def test_bottleneck_equals_plain_on_fresh_inputs_float32_vs_float64():
    rng = np.random.default_rng(11)
    for trial in range(5):
        norms = 10 ** rng.uniform(-3, 4.5, size=64)  # up to ~3e4: attention-sink rows
        x, A, B = _inputs(100 + trial, n=64, d_in=64, r=8, d_out=48, x_norms=norms)
        K = float(rng.uniform(0.2, 3.0))
        s = float(rng.uniform(2.0, 10.0))
        ref = hyplora_delta(x, A, B, K, s)
        for official in (False, True):
            got64 = hyplora_delta_bottleneck(x, A, B, K, s, official=official)
            ref_o = hyplora_delta(x, A, B, K, s, official=official)
            torch.testing.assert_close(got64, ref_o, rtol=1e-11, atol=1e-14)
        got32 = hyplora_delta_bottleneck(x.float(), A.float(), B.float(), K, s).double()
        rel = (got32 - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert float(rel.max()) < 1e-5, float(rel.max())


def test_direction_is_exactly_that_of_BAx_and_zero_when_B_is_zero():
    x, A, B = _inputs(12, n=len(X_NORMS), x_norms=X_NORMS)
    bax = x @ A.T @ B.T
    for official in (False, True):
        for fn in (hyplora_delta, hyplora_delta_bottleneck):
            d = fn(x, A, B, 1.4, 3.0, official=official)
            # exact cosine (torch's cosine_similarity clamps norms at 1e-8)
            cos = (d[1:] * bax[1:]).sum(-1) / (d[1:].norm(dim=-1) * bax[1:].norm(dim=-1))
            assert float((1 - cos).abs().max()) < 1e-13
            assert torch.equal(d[0], torch.zeros_like(d[0]))  # x = 0 gives Δ = 0
            zero = fn(x, A, torch.zeros_like(B), 1.4, 3.0, official=official)
            assert torch.equal(zero, torch.zeros_like(zero))


def test_log_compression_of_the_length():
    """‖Δ‖ = √K asinh(‖y‖/√K): ≈ ‖y‖ for small y, logarithmic for large y."""
    x, A, B = _inputs(13, n=200)
    x = x * torch.logspace(-3, 3, 200, dtype=torch.float64)[:, None]
    K, s = 1.7, 2.0
    d = hyplora_delta_bottleneck(x, A, B, K, s)
    xs = torch.sinh(torch.clamp(x.norm(dim=-1, keepdim=True) / s / math.sqrt(K), max=12.0)) \
        * math.sqrt(K) * x / x.norm(dim=-1, keepdim=True)
    yn = (xs @ A.T @ B.T).norm(dim=-1)
    torch.testing.assert_close(d.norm(dim=-1), math.sqrt(K) * torch.asinh(yn / math.sqrt(K)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("b_scale", [1.0, 1e-5])  # 1e-5: ‖y‖²/K below the series cutoff
def test_gradcheck_both_forms_and_their_gradients_agree(b_scale):
    x, A, B = _inputs(14, n=5, d_in=5, r=2, d_out=4)
    # rows: series branch of sinhc (u < 1e-8), closed forms, and the sinh clamp (last row)
    x = x * torch.tensor([[1e-5], [0.01], [0.7], [3.0], [60.0]], dtype=torch.float64)
    B = B * b_scale
    for official, k_val in ((False, 1.3), (True, 0.8)):  # K < 1 keeps θ > 1.01: away from the guard's kink
        if official and b_scale < 1:
            continue  # the reference guard clamps ‖y‖ at 1e-7 there: not differentiable in y
        # official: Δ ∝ y/‖y‖ at fixed length near y = 0 (its dead zone), whose curvature 1/‖y‖² defeats
        # finite differences for the tiny first row
        xs = x[1:] if official else x
        args = [t.clone().requires_grad_(True) for t in
                (xs, A, B, torch.tensor(k_val, dtype=torch.float64), torch.tensor(2.2, dtype=torch.float64))]
        for fn in (hyplora_delta, hyplora_delta_bottleneck):
            assert torch.autograd.gradcheck(lambda *a: fn(*a, official=official), tuple(args))
        w = torch.randn(len(xs), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        g_plain = torch.autograd.grad((hyplora_delta(*args, official=official) * w).sum(), args)
        g_bottle = torch.autograd.grad((hyplora_delta_bottleneck(*args, official=official) * w).sum(), args)
        for gp, gb in zip(g_plain, g_bottle):
            torch.testing.assert_close(gb, gp, rtol=1e-10, atol=1e-13 * float(gp.abs().max()))


def test_per_row_curvature_and_scale_tensors():
    x, A, B = _inputs(19, n=4, d_in=5, r=2, d_out=3)
    k = torch.tensor([[0.5], [1.0], [2.0], [4.0]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64, requires_grad=True)
    got = hyplora_delta_bottleneck(x, A, B, k, s)
    for i in range(4):
        want = hyplora_delta(x[i:i + 1], A, B, float(k[i]), float(s[i]))
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda kk, ss: hyplora_delta_bottleneck(x, A, B, kk, ss), (k, s))


def test_second_derivatives_are_refused_not_wrong():
    x, A, B = _inputs(20, n=3, d_in=5, r=2, d_out=3)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(hyplora_delta_bottleneck(x, A, B, 1.0, 2.0).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_gradients_finite_at_B_zero_and_x_zero():
    x, A, B = _inputs(15, n=3, d_in=6, r=2, d_out=5)
    x[0] = 0.0
    for official in (False, True):
        for fn in (hyplora_delta, hyplora_delta_bottleneck):
            args = [t.clone().requires_grad_(True) for t in (x, A, torch.zeros_like(B))]
            k = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
            s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
            out = fn(*args, k, s, official=official)
            grads = torch.autograd.grad(out.sum(), [*args, k, s], allow_unused=True)
            assert all(g is None or torch.isfinite(g).all() for g in grads)
    # consistent form at B = 0: dΔ/dB = c·(A x)ᵀ with c = c1 (c2 = 1), like LoRA on x_s
    Bz = torch.zeros_like(B, requires_grad=True)
    (gB,) = torch.autograd.grad(hyplora_delta_bottleneck(x, A, Bz, 1.2, 2.0).sum(), Bz)
    xs = x.clone()
    nx = x.norm(dim=-1, keepdim=True)
    xs[1:] = math.sqrt(1.2) * torch.sinh(nx[1:] / 2.0 / math.sqrt(1.2)) * x[1:] / nx[1:]
    torch.testing.assert_close(gB, torch.ones(5, 3, dtype=torch.float64) @ (xs @ A.T), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- official formula
def test_official_matches_reference_formula():
    rng = np.random.default_rng(16)
    for trial in range(4):
        norms = 10 ** rng.uniform(-3, 3.5, size=40)
        x, A, B = _inputs(200 + trial, n=40, d_in=16, r=4, d_out=12, x_norms=norms)
        B = B * float(10 ** rng.uniform(-3, 1))  # spans the dead zone and beyond
        K = float(rng.choice([0.5, 1.0, REFERENCE_DEFAULT_CURVATURE, 2.2]))
        s = float(rng.uniform(1.0, 6.0))
        want = _reference_numpy(x.numpy(), A.numpy(), B.numpy(), K, s)
        for fn in (hyplora_delta, hyplora_delta_bottleneck):
            np.testing.assert_allclose(fn(x, A, B, K, s, official=True).numpy(), want, rtol=1e-10, atol=1e-13)


def _inputs_with_y_norms(y_norms, K, s, seed=17):
    """Inputs whose y = B A x_s has the requested norms (rescaling B per row is not possible, so one
    (x, A, B) per target norm, stacked by evaluating row by row)."""
    rows = []
    for i, target in enumerate(y_norms):
        x, A, B = _inputs(seed + i, n=1, d_in=8, r=3, d_out=6)
        xn = x.norm(dim=-1, keepdim=True)
        xs = math.sqrt(K) * torch.sinh(torch.clamp(xn / s / math.sqrt(K), max=12.0)) * x / xn
        y = xs @ A.T @ B.T
        rows.append((x, A, B * (target / float(y.norm()))))
    return rows


def test_official_dead_zone_below_0_74_at_reference_default_curvature():
    K = REFERENCE_DEFAULT_CURVATURE  # softplus(1) + 1e-6, the reference default
    assert K == pytest.approx(1.3132627, abs=1e-7)
    s = 2.0
    edge = math.sqrt(K - 1.0 / K)  # θ = 1 where ‖y‖² = K − 1/K
    assert edge == pytest.approx(0.7428, abs=1e-4)
    dead = math.sqrt(K) * math.sqrt(2e-6)  # √K·sqrt(2·1e-6)
    assert 1.5e-3 < dead < 1.7e-3
    y_norms = [1e-6, 1e-4, 1e-2, 0.1, 0.5, 0.7, edge * 0.999, edge * 1.02, 0.9, 2.0, 10.0]
    for (x, A, B), yn in zip(_inputs_with_y_norms(y_norms, K, s), y_norms):
        for fn in (hyplora_delta, hyplora_delta_bottleneck):
            official = float(fn(x, A, B, K, s, official=True).norm())
            consistent = float(fn(x, A, B, K, s).norm())
            assert consistent == pytest.approx(math.sqrt(K) * math.asinh(yn / math.sqrt(K)), rel=1e-10)
            if yn < edge:
                assert official == pytest.approx(dead, rel=1e-9), (yn, official)
            else:
                theta = math.sqrt(yn ** 2 + 1.0 / K) / math.sqrt(K)
                ac = math.sqrt(2 * max(theta - 1, 1e-6)) if theta < 1.01 else math.acosh(theta)
                assert official == pytest.approx(math.sqrt(K) * ac, rel=1e-9), (yn, official)
    # the dead zone is a property of the reference formula: the consistent map has none
    small = _inputs_with_y_norms([1e-4], K, s)[0]
    assert float(hyplora_delta(*small, K, s).norm()) == pytest.approx(1e-4, rel=1e-8)


def test_official_equals_consistent_at_K_1_outside_the_guard():
    """At K = 1 the two time parts agree; only the reference's crude sqrt(2ε) guard (θ < 1.01) and its
    1e-6 floor differ."""
    y_norms = [0.2, 0.5, 1.0, 3.0, 30.0]
    for (x, A, B), yn in zip(_inputs_with_y_norms(y_norms, 1.0, 2.0), y_norms):
        off = hyplora_delta(x, A, B, 1.0, 2.0, official=True)
        con = hyplora_delta(x, A, B, 1.0, 2.0)
        theta = math.sqrt(yn ** 2 + 1.0)
        rtol = 1e-12 if theta >= 1.01 else 1e-3
        torch.testing.assert_close(off, con, rtol=rtol, atol=0)


@pytest.mark.parametrize("bad", [
    dict(A=torch.zeros(3, 5)), dict(B=torch.zeros(4, 2)), dict(A=torch.zeros(3, 6, 1)),
])
def test_shape_errors(bad):
    args = dict(x=torch.zeros(2, 6), A=torch.zeros(3, 6), B=torch.zeros(4, 3))
    args.update(bad)
    with pytest.raises(InputDataError):
        hyplora_delta(args["x"], args["A"], args["B"], 1.0, 1.0)
    with pytest.raises(InputDataError):
        hyplora_delta_bottleneck(args["x"], args["A"], args["B"], 1.0, 1.0)


@pytest.mark.parametrize("K,s", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, float("nan"))])
def test_bad_curvature_or_scale(K, s):
    x, A, B = _inputs(18)
    with pytest.raises(InputDataError):
        hyplora_delta_bottleneck(x, A, B, K, s)


def test_positive_parametrisation_round_trip():
    for v in (1e-5, 0.3, 1.0, REFERENCE_DEFAULT_CURVATURE, 8.0, 64.0, 4096.0):
        assert float(positive(torch.tensor(inverse_positive(v), dtype=torch.float64))) == pytest.approx(v, rel=1e-12)
    assert inverse_positive(REFERENCE_DEFAULT_CURVATURE) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(AdapterError):
        inverse_positive(0.0)


# ============================================================================ PEFT layer
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


tiny_llama = functools.partial(tiny_models.tiny_llama, vocab=97, positions=64)


def _ids(seed=0, batch=3, length=9):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hyp_model(seed=0, curvature=1.0, adapter_seed=1, **kwargs):
    base = tiny_llama(seed)
    kwargs.setdefault("init_lora_weights", False)  # random B so that the adapter is not a no-op
    torch.manual_seed(adapter_seed)
    return get_peft_model(base, hyplora_config(4, 8, TARGETS, curvature=curvature, **kwargs))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, HypLoraLinear)]


def test_every_target_becomes_a_hyplora_layer_with_initial_curvature_and_scale():
    pm = _hyp_model(curvature=0.6, curvature_pattern={r"layers\.1\.mlp\.down_proj": 3.0})
    layers = dict((n, m) for n, m in pm.named_modules() if isinstance(m, HypLoraLinear))
    assert len(layers) == 2 * len(TARGETS)
    for name, layer in layers.items():
        K = float(layer.hyp_curvature("default").detach())
        assert K == pytest.approx(3.0 if name.endswith("layers.1.mlp.down_proj") else 0.6, rel=1e-6)
        assert float(layer.hyp_scale("default").detach()) == pytest.approx(math.sqrt(layer.in_features), rel=1e-6)
        assert layer.lora_hyp_k["default"].dtype == torch.float32
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(".lora_hyp_k." in n for n in trainable) == len(layers)
    assert sum(".lora_hyp_s." in n for n in trainable) == len(layers)


def test_rank_and_alpha_patterns_apply_to_hyplora_layers():
    """GeLoRA-style per-layer ranks (hyplora+gelora plans) go through LoraConfig.rank_pattern."""
    pm = _hyp_model(rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 4})
    for name, layer in pm.named_modules():
        if isinstance(layer, HypLoraLinear):
            special = name.endswith("layers.0.self_attn.q_proj")
            assert layer.r["default"] == (2 if special else 4)
            assert layer.lora_A["default"].weight.shape[0] == layer.r["default"]
            assert layer.scaling["default"] == 2.0  # α/r kept constant
    with torch.no_grad():
        assert torch.isfinite(pm(_ids()).logits).all()


def test_zero_init_leaves_the_model_unchanged():
    base = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
    pm = get_peft_model(copy.deepcopy(base), hyplora_config(4, 8, TARGETS))
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, ref)


@pytest.mark.parametrize("official", [False, True])
def test_layer_forward_is_Wx_plus_scaled_delta(official):
    pm = _hyp_model(official=official)
    layer = _layers(pm)[0]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        out = layer(x)
        ref = layer.base_layer(x).double() + layer.scaling["default"] * hyplora_delta(
            x.double(), layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double(),
            layer.hyp_curvature("default").double(), layer.hyp_scale("default").double(), official=official)
    assert layer.scaling["default"] == 2.0
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_finite_forward_float32_bf16_and_autocast():
    ids = _ids()
    pm32 = _hyp_model()
    with torch.no_grad():
        out32 = pm32(ids).logits
    assert torch.isfinite(out32).all()
    base16 = tiny_llama().to(torch.bfloat16)
    torch.manual_seed(1)
    pm16 = get_peft_model(base16, hyplora_config(4, 8, TARGETS, init_lora_weights=False))
    layer = _layers(pm16)[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT upcasts adapter weights
    assert layer.lora_hyp_k["default"].dtype == torch.float32
    with torch.no_grad():
        out16 = pm16(ids).logits
        assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
        # the update is computed in float32 and cast back once
        x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        want = layer.base_layer(x) + layer.hyp_delta("default", x.float()).to(torch.bfloat16)
        assert torch.equal(layer(x), want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ac = pm32(ids).logits
    assert torch.isfinite(out_ac).all()
    torch.testing.assert_close(out_ac.float(), out32, rtol=0.1, atol=0.1)


def test_training_changes_only_adapter_parameters_and_loss_falls():
    base = tiny_llama()
    torch.manual_seed(2)
    pm = get_peft_model(base, hyplora_config(4, 8, TARGETS))  # standard init: B = 0
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(seed=3, batch=4, length=12)
    pm.train()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in pm.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in pm.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (".lora_" in n), n


@pytest.mark.parametrize("official", [False, True])
def test_save_reregister_load_reproduces_outputs(tmp_path, official):
    pm = _hyp_model(curvature=1.7, official=official)
    with torch.no_grad():  # move K and s off their initial values so that loading must restore them
        for layer in _layers(pm):
            layer.lora_hyp_k["default"].add_(0.3)
            layer.lora_hyp_s["default"].mul_(0.5)
    ids = _ids(seed=6)
    with torch.no_grad():
        want = pm(ids).logits
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()

    cfg = register_hyplora(LoraConfig.from_pretrained(tmp_path), official=official)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=cfg)
    assert len(_layers(loaded)) == 2 * len(TARGETS)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)

    # stock PEFT builds plain LoRA layers from the same folder: outputs differ (hence adapters.load)
    with pytest.warns(UserWarning, match="hyplora_curvature"):  # but it warns, naming the fields it ignores
        stock = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not _layers(stock)
    with torch.no_grad():
        assert not torch.allclose(stock(ids).logits, want, atol=1e-3)


def test_disable_enable_and_delete_adapter():
    base = tiny_llama()
    ids = _ids(seed=7)
    with torch.no_grad():
        base_out = base(ids).logits
    torch.manual_seed(1)
    pm = get_peft_model(base, hyplora_config(4, 8, TARGETS, init_lora_weights=False))
    with torch.no_grad():
        adapted = pm(ids).logits
        assert not torch.allclose(adapted, base_out, atol=1e-4)
        with pm.disable_adapter():
            assert torch.equal(pm(ids).logits, base_out)
        assert torch.equal(pm(ids).logits, adapted)

    torch.manual_seed(9)
    pm.add_adapter("other", hyplora_config(4, 8, TARGETS, curvature=2.0, init_lora_weights=False))
    layer = _layers(pm)[0]
    assert float(layer.hyp_curvature("other")) == pytest.approx(2.0, rel=1e-6)
    pm.set_adapter("other")
    with torch.no_grad():
        other = pm(ids).logits
    assert not torch.allclose(other, adapted, atol=1e-4)
    pm.set_adapter("default")
    pm.delete_adapter("other")
    for layer in _layers(pm):
        for d in (layer.lora_A, layer.lora_B, layer.lora_hyp_k, layer.lora_hyp_s, layer.hyp_official,
                  layer.lora_variant):
            assert "other" not in d and "default" in d
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, adapted)


def test_merge_is_refused_and_leaves_weights_untouched():
    pm = _hyp_model()
    weights = {n: p.detach().clone() for n, p in pm.named_parameters()}
    ids = _ids(seed=8)
    with torch.no_grad():
        out = pm(ids).logits
    with pytest.raises(AdapterError, match=NOT_MERGEABLE):
        pm.merge_and_unload()
    with pytest.raises(AdapterError, match=NOT_MERGEABLE):
        pm.merge_adapter()
    layer = _layers(pm)[0]
    for call in (layer.merge, lambda: layer.merge(safe_merge=True), lambda: layer.get_delta_weight("default")):
        with pytest.raises(AdapterError, match="nonlinear in x"):
            call()
    # nothing is ever merged: unmerging warns as LoRA does, and changes nothing
    for call in (layer.unmerge, pm.unmerge_adapter):
        with pytest.warns(UserWarning, match="Already unmerged"):
            call()
    assert not layer.merged
    for n, p in pm.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, out)


def test_mixed_batch_inference_equals_per_adapter_runs():
    pm = _hyp_model()
    torch.manual_seed(11)
    pm.add_adapter("other", hyplora_config(4, 8, TARGETS, curvature=0.5, init_lora_weights=False))
    pm.eval()  # PEFT accepts adapter_names only at inference
    ids = _ids(seed=9, batch=4)
    names = ["other", "default", "__base__", "default"]
    with torch.no_grad():
        mixed = pm(ids, adapter_names=names).logits
        singles = []
        for i, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    singles.append(pm(ids[i:i + 1]).logits)
            else:
                pm.set_adapter(name)
                singles.append(pm(ids[i:i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(singles), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(singles[0], pm(ids[0:1], adapter_names=["default"]).logits, atol=1e-4)


def test_plain_lora_adapter_beside_a_hyplora_adapter_stays_plain_and_mergeable():
    pm = _hyp_model()
    torch.manual_seed(12)
    pm.add_adapter("plain", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    layer = _layers(pm)[0]
    assert not layer.is_hyplora("plain") and layer.is_hyplora("default")
    pm.set_adapter("plain")
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        want = layer.base_layer(x) + layer.scaling["plain"] * (x @ layer.lora_A["plain"].weight.T
                                                               @ layer.lora_B["plain"].weight.T)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
        with pytest.raises(AdapterError, match=NOT_MERGEABLE):
            layer.merge(adapter_names=["plain", "default"])
        assert not layer.merged
        layer.merge(adapter_names=["plain"])
        assert layer.merged
        torch.testing.assert_close(layer.base_layer(x), want, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert not layer.merged


def test_official_layer_clips_the_raw_curvature_gradient():
    pm = _hyp_model(official=True, curvature=REFERENCE_DEFAULT_CURVATURE)
    layer = _layers(pm)[0]
    assert layer.hyp_official["default"] is True
    assert float(layer.lora_hyp_k["default"]) == pytest.approx(1.0, abs=1e-6)  # the reference's raw default
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(14)) * 5
    w = torch.randn(6, layer.out_features, generator=torch.Generator().manual_seed(15)) * 1e3
    (layer(x) * w).sum().backward()
    clipped = layer.lora_hyp_k["default"].grad.clone()
    raw = layer.lora_hyp_k["default"].detach().clone().requires_grad_(True)
    delta = hyplora_delta_bottleneck(x, layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
                                     positive(raw), layer.hyp_scale("default").detach(), official=True)
    (g,) = torch.autograd.grad((layer.scaling["default"] * delta * w).sum(), raw)
    assert abs(float(g)) > 0.01  # the unclipped gradient is large ...
    assert float(clipped) == pytest.approx(math.copysign(0.01, float(g)), rel=1e-6)  # ... and clipped


def test_unsupported_targets_and_options_are_refused():
    with pytest.raises(AdapterError, match="nn.Linear targets only"):
        get_peft_model(tiny_llama(), hyplora_config(4, 8, ["embed_tokens", "q_proj"]))
    for bad in (dict(use_dora=True), dict(lora_bias=True), dict(init_lora_weights="pissa"),
                dict(init_lora_weights="olora")):
        with pytest.raises(AdapterError, match="HypLoRA cannot be combined"):
            hyplora_config(4, 8, TARGETS, **bad)
    with pytest.raises(AdapterError, match="curvature"):
        hyplora_config(4, 8, TARGETS, curvature=0.0)
    with pytest.raises(AdapterError, match="regex"):
        hyplora_config(4, 8, TARGETS, curvature_pattern={"(": 1.0})
    with pytest.raises(AdapterError, match="rank"):
        hyplora_config(0, 8, TARGETS)


def test_options_attach_to_config_and_round_trip():
    cfg = hyplora_config(4, 8, TARGETS, curvature=0.9, curvature_pattern={"q_proj": 2.0}, official=True)
    opts = hyplora_options(cfg)
    assert opts == HypLoraOptions(curvature=0.9, curvature_pattern={"q_proj": 2.0}, official=True)
    assert HypLoraOptions.from_dict(opts.to_dict()) == opts
    assert opts.curvature_for("model.layers.0.self_attn.q_proj") == 2.0
    assert opts.curvature_for("model.layers.0.self_attn.k_proj") == 0.9
    assert hyplora_options(LoraConfig(r=4, target_modules=TARGETS)) is None
    # the mapping is not part of the saved config (PEFT drops it): a sidecar is needed
    assert "_hyplora_options" not in cfg.to_dict() and "_custom_modules" not in cfg.to_dict()


def test_adapters_package_is_lazy():
    import adapters
    from adapters import lorentz
    from adapters import hyplora as hyplora_module

    assert adapters.lorentz is lorentz and adapters.hyplora is hyplora_module
    assert adapters.hyplora_delta is hyplora_delta and adapters.expmap0 is lorentz.expmap0
    with pytest.raises(AttributeError):
        adapters.no_such_module
    # a fresh interpreter: importing the package pulls in neither torch nor peft
    code = "import sys, adapters; bad = {'torch', 'peft'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine: pytest -m gpu)")
def test_cuda_layer_matches_float64_reference():
    dev = torch.device("cuda")
    rng = np.random.default_rng(21)
    norms = 10 ** rng.uniform(-3, 4.5, size=256)
    x, A, B = _inputs(300, n=256, d_in=256, r=16, d_out=384, x_norms=norms)
    K, s = 1.3, 16.0
    args64 = [t.clone().requires_grad_(True) for t in (x, A, B)]
    ref = hyplora_delta(*args64, K, s)
    w = torch.randn_like(ref)
    ref_g = torch.autograd.grad((ref * w).sum(), args64)
    args32 = [t.float().to(dev).requires_grad_(True) for t in (x, A, B)]
    got = hyplora_delta_bottleneck(*args32, K, s)
    got_g = torch.autograd.grad((got * w.float().to(dev)).sum(), args32)
    rel = ((got.double().cpu() - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert float(rel) < 1e-4
    for g, r_ in zip(got_g, ref_g):
        assert float((g.double().cpu() - r_).norm() / r_.norm()) < 1e-4
    # the layer on a bf16 base: float32 island, cast back once
    base = torch.nn.Linear(256, 384, bias=False).to(dev, torch.bfloat16)
    layer = HypLoraLinear(base, "default", config=hyplora_config(16, 32, ["x"], init_lora_weights=False),
                          r=16, lora_alpha=32).to(dev)
    xb = (torch.randn(8, 32, 256, device=dev) * 4).to(torch.bfloat16).requires_grad_(True)
    out = layer(xb)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)
    with torch.no_grad():
        want = layer.base_layer(xb) + layer.hyp_delta("default", xb.float()).to(torch.bfloat16)
        assert torch.equal(layer(xb), want)


def test_several_active_adapters_add_their_updates():
    """PEFT's mixed active adapters (base_model.set_adapter([...])): each HypLoRA layer adds every active
    adapter's own update, h = W x + Σ_i (α_i/r_i)·Δ_i(x), with each adapter's K and s."""
    pm = _hyp_model()
    torch.manual_seed(3)
    pm.add_adapter("other", hyplora_config(4, 6, TARGETS, curvature=2.0, init_lora_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    layer = _layers(pm)[0]
    assert layer.active_adapters == ["default", "other"]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x) + sum(layer.hyp_delta(name, x) for name in ("default", "other"))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        both = pm(_ids(seed=2)).logits
    assert torch.isfinite(both).all()
    pm.base_model.set_adapter("default")
    with torch.no_grad():
        assert not torch.allclose(pm(_ids(seed=2)).logits, both)


def test_add_weighted_adapter_is_refused_before_anything_is_built():
    """PEFT mixes lora_A/lora_B; HypLoRA's update is nonlinear in x with its own K and s per adapter, so no
    mix reproduces even one adapter: refused with a clear error, the model left exactly as it was."""
    model = _hyp_model(seed=0)
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configs = dict(model.peft_config)
    for names, weights in ((["default"], [1.0]), (["default", "other"], [0.5, 0.5])):
        for combination in ("linear", "cat", "svd"):
            with pytest.raises(AdapterError, match="add_weighted_adapter cannot combine HypLoRA"):
                model.add_weighted_adapter(names, weights, "mix", combination_type=combination)
            assert dict(model.peft_config) == configs
            assert all("mix" not in layer.lora_A for layer in _layers(model))
            after = model.state_dict()
            assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_curvature_and_scale_are_vectors_of_one_and_older_scalar_states_load():
    """K and s are shape-(1,) parameters (FSDP refuses 0-dim ones); states saved with 0-dim K and s load
    into them and give the same outputs."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    model = _hyp_model(seed=0)
    for layer in _layers(model):
        assert layer.lora_hyp_k["default"].shape == (1,) and layer.lora_hyp_s["default"].shape == (1,)
        with torch.no_grad():
            layer.lora_hyp_k["default"].add_(0.25)
    ids = _ids(3)
    with torch.no_grad():
        want = model(ids).logits
    state = {k: (v.reshape(()) if ".lora_hyp_" in k else v) for k, v in get_peft_model_state_dict(model).items()}
    assert any(v.dim() == 0 for v in state.values())
    fresh = _hyp_model(seed=0, adapter_seed=5)
    result = set_peft_model_state_dict(fresh, state)
    assert not [k for k in result.unexpected_keys if ".lora_" in k]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


def test_a_saved_folder_with_scalar_curvature_and_scale_loads_with_the_same_outputs(tmp_path):
    """An adapter folder written when K and s were 0-dim tensors (its safetensors file holds them as
    scalars) loads through adapters.load into today's shape-(1,) parameters, with the same outputs."""
    import adapters
    from safetensors.torch import load_file, save_file

    trained = adapters.build(tiny_llama(0), "hyplora", r=4, target_modules=TARGETS)
    with torch.no_grad():
        for layer in _layers(trained):
            layer.lora_B["default"].weight.normal_(0, 0.05)
            layer.lora_hyp_k["default"].add_(0.3)
            layer.lora_hyp_s["default"].sub_(0.2)
    ids = _ids(4)
    with torch.no_grad():
        want = trained.eval()(ids).logits
    folder = adapters.save(trained, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    curvature_keys = [k for k in tensors if ".lora_hyp_" in k]
    assert curvature_keys and all(tensors[k].shape == (1,) for k in curvature_keys)
    save_file({k: (v.reshape(()) if k in curvature_keys else v) for k, v in tensors.items()}, str(weights))
    assert all(load_file(str(weights))[k].dim() == 0 for k in curvature_keys)
    loaded = adapters.load(tiny_llama(0), folder)
    for layer in _layers(loaded):
        assert layer.lora_hyp_k["default"].shape == (1,) and layer.lora_hyp_s["default"].shape == (1,)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_adapter_dtype_follows_peft_autocast_setting():
    """PEFT keeps adapter weights in the base dtype when autocast_adapter_dtype=False, and upcasts them to
    float32 otherwise: K and s follow the same rule as lora_A/lora_B."""
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        torch.manual_seed(1)
        pm = get_peft_model(tiny_llama().to(torch.bfloat16), hyplora_config(4, 8, TARGETS),
                            autocast_adapter_dtype=autocast)
        for layer in _layers(pm):
            assert layer.lora_A["default"].weight.dtype == dtype
            assert layer.lora_hyp_k["default"].dtype == dtype and layer.lora_hyp_s["default"].dtype == dtype
        with torch.no_grad():
            assert torch.isfinite(pm(_ids()).logits.float()).all()


def test_scale_matched_hyplora_takes_lora_steps_for_small_updates_and_keeps_them_when_saved(tmp_path):
    """adapters.build(..., scale_matched=True): α·√d_in per layer (adapters.hyplora.functional.matched_alpha).
    With the same A and B, and ‖x‖/s small, its update equals PEFT LoRA's (α/r)·B A x up to the maps'
    second-order terms (sinhc(n) − 1 ≈ n²/6); plain HypLoRA's is √d_in times smaller. Saved and loaded
    through adapters.save / adapters.load, the outputs are unchanged. Other methods refuse the option."""
    import adapters

    base = tiny_llama()
    lora = adapters.build(copy.deepcopy(base), "lora", r=4, dropout=0.0, target_modules=TARGETS)
    matched = adapters.build(copy.deepcopy(base), "hyplora", r=4, dropout=0.0, target_modules=TARGETS,
                             scale_matched=True)
    plain = adapters.build(copy.deepcopy(base), "hyplora", r=4, dropout=0.0, target_modules=TARGETS)
    g = torch.Generator().manual_seed(21)
    peft_layers = {n: m for n, m in lora.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}
    checked = 0
    for hyp in (matched, plain):
        for name, layer in hyp.named_modules():
            if not isinstance(layer, HypLoraLinear):
                continue
            ref = peft_layers[name]
            with torch.no_grad():
                ref.lora_B["default"].weight.copy_(torch.randn(ref.lora_B["default"].weight.shape, generator=g) * 1e-2)
                layer.lora_A["default"].weight.copy_(ref.lora_A["default"].weight)
                layer.lora_B["default"].weight.copy_(ref.lora_B["default"].weight)
                s0 = math.sqrt(layer.in_features)
                x = torch.randn(3, 7, layer.in_features, generator=g, dtype=torch.float32)
                x = x / x.norm(dim=-1, keepdim=True) * 0.03 * s0  # n = 0.03
                want = (ref(x) - ref.base_layer(x)).double()
                got = (layer(x) - layer.base_layer(x)).double()
            factor = 1.0 if hyp is matched else 1.0 / s0
            assert layer.scaling["default"] == pytest.approx(2.0 * (s0 if hyp is matched else 1.0))
            torch.testing.assert_close(got, want * factor, rtol=2e-3, atol=1e-9)
            checked += 1
    assert checked == 2 * 2 * len(TARGETS)
    ids = _ids(seed=8)
    with torch.no_grad():
        out = matched(ids).logits
    adapters.save(matched, tmp_path / "matched")
    loaded = adapters.load(tiny_llama(), tmp_path / "matched")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out, rtol=0, atol=0)
    with pytest.raises(AdapterError, match="scale_matched applies to hyplora methods only"):
        adapters.build(copy.deepcopy(base), "lora", r=4, scale_matched=True)
    with pytest.raises(AdapterError, match="plain hyplora only"):
        adapters.build(copy.deepcopy(base), "hyplora+gelora", r=4, layer_ranks=[2, 3], scale_matched=True)
