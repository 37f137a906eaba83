"""The C++ layer nodes (adapters.kernels.native) against the float64 map chain and the Python nodes.

On the CPU the extension is built once per machine (about a minute; cached) and run with
``GEOPROBE_NATIVE=all``: the HypLoRA node (its per-token loop in C++) against base(x) + (α/r)·hyplora_delta in
float64, output and every gradient; the HydraLoRA node through the lean-path tests of
``tests/test_hydralora_lean.py`` (against the module path, the per-head loop and PEFT LoRA). GPU tests
(marked ``gpu``) run the CUDA kernels against the same oracles and against the Python nodes. Also: a build
that fails leaves the Python nodes in place with one logged line, and the mode switch.
"""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from adapters.hydralora import HydraLoraLinear
from adapters.kernels import native
from geoprobe.errors import GeoprobeError
from tests.test_hydralora_lean import (  # noqa: F401  (re-run here with the native node; fixtures too)
    make_layer,
    module_path,
    test_double_backward_is_refused,
    test_lean_matches_module_path_and_reference_float64,
    test_lean_mixed_precision_bf16_base_float32_adapters,
    test_lean_partial_gradients,
    test_model_with_gradient_checkpointing_lean_equals_module_path,
    test_n1_lean_equals_peft_lora,
)
from tests.test_hyplora_fused import _float64_chain, _layer, _layer_vs_chain

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA (run on the GPU machine: pytest -m gpu)")


@pytest.fixture(autouse=True, scope="module")
def native_everywhere():
    """Native nodes on CPU tensors too; the build must succeed wherever a compiler is present."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native layers cannot be built here")
    previous = native.set_native_mode("all")
    module = native.native_module(torch.device("cpu"))
    assert module is not None, native.native_unavailable_reason("cpu")
    yield module
    native.set_native_mode(previous)


def _node(y: torch.Tensor) -> str:
    return y.grad_fn.name() if y.grad_fn is not None else ""


@pytest.mark.parametrize("shape", [(2, 19, 33, 1100, 5), (1, 300, 96, 130, 32), (3, 41, 128, 64, 64)])
def test_hyplora_node_float64_matches_chain_cpu(shape):
    errs = _layer_vs_chain(torch.float64, shape, "cpu")
    assert max(errs) < 1e-11, errs


@pytest.mark.parametrize("autocast", [False, True])
def test_hyplora_node_bf16_base_float32_adapters_close_to_chain_cpu(autocast):
    errs = _layer_vs_chain(torch.bfloat16, (2, 50, 256, 192, 32), "cpu", autocast=autocast)
    assert errs[0] < 1e-2 and max(errs[1:]) < 2e-2, errs  # bf16 output and incoming gradient
    assert max(errs[2:4]) < 1e-5, errs  # A and B: float32 against float64
    assert max(errs[4:]) < 5e-3, errs  # raw K and s: one sum over all tokens (≤ 2.5e-4 in 40 draws)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_hyplora_node_under_autocast_keeps_x_in_sixteen_bits(native_everywhere, device):
    """Under autocast the node reads a bfloat16 x as it came and keeps it so for backward (its products take
    A and ∂L/∂a in three bfloat16 parts), never a float32 copy: no saved tensor of x's size is float32; the
    output and gradients stay within bfloat16 rounding of the float64 chain."""
    layer = _layer(96, 80, 8, base_dtype=torch.bfloat16, seed=4).to(device)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 20, 96, generator=gen).to(device, torch.bfloat16)
    cot = torch.randn(3, 20, 80, generator=gen).to(device, torch.bfloat16)
    saved: list[tuple[torch.Size, torch.dtype]] = []

    def pack(t):
        saved.append((t.shape, t.dtype))
        return t

    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_hyp_k["default"],
              layer.lora_hyp_s["default"]]  # the order of _float64_chain's gradients
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device, dtype=torch.bfloat16):
            xl = x.detach().requires_grad_(True)
            y = layer(xl)
    assert "CppNode" in _node(y)
    assert (torch.Size([60, 96]), torch.bfloat16) in saved
    assert not any(shape == torch.Size([60, 96]) and dtype == torch.float32 for shape, dtype in saved), saved
    # the gradients from the kept x: within bfloat16 rounding of float64 on the same rounded inputs
    grads = torch.autograd.grad((y.float() * cot.float()).sum(), [xl, *params])
    ref_out, ref_grads = _float64_chain(layer, x, cot)
    assert float((y.double() - ref_out).norm() / ref_out.norm()) < 1e-2
    errs = [float((got.double() - want).norm() / want.norm()) for got, want in zip(grads, ref_grads)]
    assert max(errs) < 3e-2, errs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_split_product_keeps_b_to_sixteen_bits(native_everywhere, device):
    """HypLoRA's backward under autocast forms g B with g in bfloat16 and B (float32) split into a rounded
    part and its rounded remainder (layers.cpp g_times_b). Against the float64 product of the same g and B:
    within 2⁻¹⁴ relative, where B rounded to bfloat16 alone is about 2⁻⁹ off."""
    module = native.native_module(torch.device(device))
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(300, 384, generator=gen).to(torch.bfloat16).to(device)
    B = (torch.randn(384, 32, generator=gen) * 0.3).to(device)
    got = module.g_times_b(g, B)
    exact = g.double() @ B.double()
    rounded = g.double() @ B.to(torch.bfloat16).double()
    assert got.dtype == torch.float32 and got.shape == (300, 32) and got.is_contiguous()
    rel = float((got.double() - exact).norm() / exact.norm())
    assert rel < 2.0 ** -14, rel
    assert float((rounded - exact).norm() / exact.norm()) > 2.0 ** -11  # what the split avoids


@pytest.mark.parametrize("base_hooked", [False, True])
def test_hyplora_whole_layer_and_result_nodes_cpu(base_hooked):
    """A frozen plain nn.Linear base: the node that also forms the base product; a base with a forward hook
    (which a node-internal product would skip): base(x) outside, the update node after it. Both equal the
    float64 chain, and the hook runs exactly once per call."""
    layer = _layer(40, 28, 8, seed=9).double()
    calls = []
    if base_hooked:
        layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(2, 9, 40, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert ("HypLinearBase" in _node(y)) != base_hooked and "HypLinear" in _node(y)
    assert len(calls) == int(base_hooked)
    cot = torch.randn_like(y)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_hyp_k["default"],
              layer.lora_hyp_s["default"]]
    got = torch.autograd.grad((y * cot).sum(), [x] + params)
    ref, want = _float64_chain(layer, x, cot)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_native_nodes_are_the_ones_taken():
    hyp = _layer(16, 12, 4, seed=1)
    y = hyp(torch.randn(2, 3, 16, requires_grad=True))
    assert "CppNode" in _node(y) and "HypLinear" in _node(y)
    hydra = make_layer(12, 10, 3, 4, seed=2)
    y = hydra(torch.randn(5, 12, dtype=torch.float64, requires_grad=True))
    assert "CppNode" in _node(y) and "HydraLinear" in _node(y)
    previous = native.set_native_mode("off")
    try:
        y = hydra(torch.randn(5, 12, dtype=torch.float64, requires_grad=True))
        assert "CppNode" not in _node(y) and "HydraLinearFn" in _node(y)
    finally:
        native.set_native_mode(previous)


def _hyplora_values_and_grads(layer, x):
    leaf = x.detach().clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    out = layer(leaf)
    out.backward(torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view(out.shape))
    return out.detach(), [leaf.grad] + [p.grad.clone() for p in params], out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hyplora_private_apis_off_matches_private_path_cpu(dtype):
    """With the private torch entry points off (adapters.kernels._internals.set_private_apis(False)) the
    layer takes the public path (PEFT's dispatch and the reference node instead of the C++ node that also
    forms the base product): the same values and gradients (x, A, B, raw K, raw s), to float32 rounding."""
    from adapters.kernels import _internals

    layer = _layer(24, 18, 6, base_dtype=dtype, seed=4)
    if dtype == torch.float64:
        layer.double()
    x = torch.randn(3, 7, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[0, 0] = 0.0
    on_out, on_grads, on_y = _hyplora_values_and_grads(layer, x)
    assert "CppNode" in _node(on_y)
    previous = _internals.set_private_apis(False)
    try:
        off_out, off_grads, off_y = _hyplora_values_and_grads(layer, x)
        assert "CppNode" not in _node(off_y)
        assert layer._hyp_fast_adapter(x, (), {}) is None  # no native node while transforms cannot be ruled out
    finally:
        _internals.set_private_apis(previous)
    # PEFT's dispatch forms the update in float32 whatever the weights' dtype (HypLoraLinear.hyp_delta); the
    # C++ node in the adapter weights' dtype: they agree to float32 rounding
    tol = 2e-5
    torch.testing.assert_close(off_out, on_out, rtol=tol, atol=tol)
    for a, b in zip(off_grads, on_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_hydra_private_apis_off_matches_private_path_cpu():
    """HydraLoRA's C++ node against its public path (private entry points off): same values, gradients."""
    from adapters.kernels import _internals

    hydra = make_layer(12, 10, 3, 4, seed=2)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    on_out, on_grads, _ = _hyplora_values_and_grads(hydra, x)
    previous = _internals.set_private_apis(False)
    try:
        off_out, off_grads, _ = _hyplora_values_and_grads(hydra, x)
    finally:
        _internals.set_private_apis(previous)
    torch.testing.assert_close(off_out, on_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(off_grads, on_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_hyplora_node_partial_gradients_cpu():
    """Frozen A and an input without gradient: the node computes only what is asked, and it equals the
    float64 chain's."""
    layer = _layer(24, 18, 6, seed=4).double()
    layer.lora_A["default"].weight.requires_grad_(False)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    y = layer(x)
    assert "HypLinear" in _node(y)
    cot = torch.randn_like(y)
    params = [layer.lora_B["default"].weight, layer.lora_hyp_k["default"], layer.lora_hyp_s["default"]]
    got = torch.autograd.grad((y * cot).sum(), params)
    _, want = _float64_chain(layer, x, cot)
    for a, b in zip(got, want[2:]):  # B, raw K, raw s
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_hyplora_double_backward_is_refused_cpu():
    layer = _layer(10, 8, 3, seed=5).double()
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_failed_build_keeps_python_nodes_with_one_log_line(monkeypatch, caplog):
    def broken(cuda):
        raise RuntimeError("Error building extension 'x':\nlayers.cpp:1:1: error: simulated failure\nninja: stopped")

    monkeypatch.setattr(native, "_MODULES", {})
    monkeypatch.setattr(native, "_FAILURES", {})
    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(native, "_cuda_build", lambda: False)
    layer = make_layer(12, 10, 3, 4, seed=2)
    x = torch.randn(5, 12, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="adapters.kernels.native"):
        y1 = layer(x)
        y2 = layer(x)
    assert "HydraLinearFn" in _node(y1) or y1.grad_fn is None
    assert torch.equal(y1, y2)
    lines = [r.getMessage() for r in caplog.records if r.name == "adapters.kernels.native"]
    assert len(lines) == 1 and "simulated failure" in lines[0]
    assert "simulated failure" in native.native_unavailable_reason("cpu")


def test_mode_from_environment(monkeypatch):
    for raw, want in [("0", "off"), ("off", "off"), ("all", "all"), ("", "auto"), ("auto", "auto")]:
        monkeypatch.setenv("GEOPROBE_NATIVE", raw)
        assert native._mode_from_env() == want
    for raw, want in [("no", "off"), ("false", "off"), ("cpu", "all"), ("1", "auto"), ("cuda", "auto")]:
        monkeypatch.setenv("GEOPROBE_NATIVE", raw)
        assert native._mode_from_env() == want
    monkeypatch.setenv("GEOPROBE_NATIVE", "sometimes")
    with pytest.raises(GeoprobeError, match="GEOPROBE_NATIVE"):
        native._mode_from_env()
    with pytest.raises(ValueError):
        native.set_native_mode("sometimes")
    previous = native.set_native_mode("auto")
    try:
        assert native.native_module(torch.device("cpu")) is None
        assert "GEOPROBE_NATIVE=all" in native.native_unavailable_reason("cpu")
    finally:
        native.set_native_mode(previous)


# ============================================================================ GPU
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(2, 19, 33, 1100, 5), (1, 300, 96, 130, 32), (3, 41, 128, 64, 64),
                                   (2, 700, 256, 4100, 16)])
def test_hyplora_cuda_node_float64_matches_chain(shape):
    assert native.native_module(torch.device("cuda")) is not None, native.native_unavailable_reason("cuda")
    errs = _layer_vs_chain(torch.float64, shape, "cuda")
    assert max(errs) < 1e-10, errs


def _layer_run(layer, x, cot):
    xl = x.detach().clone().requires_grad_(True)
    y = layer(xl)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_hyp_k["default"],
              layer.lora_hyp_s["default"]]
    grads = torch.autograd.grad((y.float() * cot).sum(), [xl] + params)
    return _node(y), y.detach(), grads


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_hyplora_cuda_node_equals_python_node(base_dtype):
    """The C++ node and the Python node (Triton kernels) on the same inputs. float32 base: the same numbers
    up to the order of float32 sums. bfloat16 base: each node's output and every gradient within bfloat16
    rounding of the float64 value (2e-2 relative, as the lean layer's own bf16 check), and the C++ node's
    error at most twice the Python node's or one bfloat16 step (2⁻⁸): the curvature gradients are sums over
    every element with cancellation, where two nodes that round alike to one step apart can differ by
    more than a step from each other."""
    pytest.importorskip("triton")
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        layer = _layer(512, 384, 32, base_dtype=base_dtype, seed=11).cuda()
        x = (torch.randn(4, 200, 512, device="cuda") * 2).to(base_dtype)
        cot = torch.randn(4, 200, 384, device="cuda")
        name_n, y_n, g_n = _layer_run(layer, x, cot)
        previous = native.set_native_mode("off")
        try:
            name_p, y_p, g_p = _layer_run(layer, x, cot)
        finally:
            native.set_native_mode(previous)
        y_ref, g_ref = _float64_chain(layer, x, cot.to(base_dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    assert "CppNode" in name_n and "CppNode" not in name_p

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    if base_dtype == torch.float32:
        assert rel(y_n, y_p) <= 1e-5
        for a, b in zip(g_n, g_p):
            assert rel(a, b) <= 1e-4
        return
    names = ["output", "x", "A", "B", "K", "s"]
    errs = {n: (rel(a, ref), rel(b, ref)) for n, a, b, ref in zip(names, [y_n, *g_n], [y_p, *g_p], [y_ref, *g_ref])}
    for n, (native_err, python_err) in errs.items():
        assert python_err < 2e-2 and native_err < 2e-2, errs
        assert native_err <= max(2 * python_err, 2.0 ** -8), errs


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.float32)])
def test_hydra_cuda_node_matches_module_path(base_dtype, adapter_dtype, module_path):
    from tests.test_hydralora_lean import _cuda_check

    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _cuda_check(base_dtype, adapter_dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    layer = make_layer(64, 48, 4, 3, base_dtype=base_dtype, adapter_dtype=adapter_dtype, seed=3).cuda()
    HydraLoraLinear.use_lean_path = True
    y = layer(torch.randn(2, 5, 64, device="cuda").to(base_dtype).requires_grad_(True))
    assert "CppNode" in _node(y)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hooked", [False, True])
def test_hydra_node_serves_autocast_at_least_as_close_to_float64_as_the_module_path(device, base_dtype, hooked,
                                                                                    module_path):
    """Under bfloat16 autocast the C++ HydraLoRA node serves the call (its products take bfloat16 operands,
    the gates stay in float32): the output and every gradient have the module path's dtypes, and against
    float64 (the same rounded inputs, the float32 weights) each is within bfloat16 rounding and no further
    than the module path's under the same autocast (which rounds [a, logits], s·G B and B to bfloat16)."""
    from adapters.hydralora.functional import hydralora_delta_reference
    from tests.test_hydralora_lean import params, run

    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        layer = make_layer(64, 48, 4, 4, base_dtype=base_dtype, adapter_dtype=torch.float32, seed=8).to(device)
        if hooked:  # the base product outside, the update node onto it
            layer.base_layer.register_forward_hook(lambda m, i, o: None)
        with torch.no_grad():
            layer.lora_hydra_B["default"].weight.mul_(0.3)
        g = torch.Generator().manual_seed(9)
        x = torch.randn(2, 16, 64, generator=g).to(device, base_dtype)
        cot = torch.randn(2, 16, 48, generator=g).to(device, torch.bfloat16)
        with torch.autocast(device, dtype=torch.bfloat16):
            y_node, g_node = run(layer, x, cot, lean=True)  # run() asserts which path served
            y_mod, g_mod = run(layer, x, cot, lean=False)
            HydraLoraLinear.use_lean_path = True
            node = _node(layer(x.detach().requires_grad_(True)))
            assert "CppNode" in node and ("HydraUpdate" in node) == hooked, node
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    assert y_node.dtype == y_mod.dtype == torch.bfloat16
    assert [t.dtype for t in g_node] == [t.dtype for t in g_mod] == [base_dtype] + [torch.float32] * 3
    A, Bw, Wr = (p.detach().double().cpu().requires_grad_(True) for p in params(layer))
    base = layer.get_base_layer()
    x64 = x.double().cpu().requires_grad_(True)
    ref = x64 @ base.weight.double().cpu().T + base.bias.double().cpu() + hydralora_delta_reference(
        x64, A, Bw.view(48, 4, 4).permute(1, 0, 2), Wr, scaling=3.0)
    want = (ref.detach(), *torch.autograd.grad((ref * cot.double().cpu()).sum(), (x64, A, Bw, Wr)))

    def rel(t, w):
        return ((t.double().cpu() - w).norm() / w.norm()).item()

    names = ["output", "x", "A", "B", "router"]
    errs = {n: (rel(a, w), rel(b, w)) for n, a, b, w in zip(names, [y_node, *g_node], [y_mod, *g_mod], want)}
    for n, (node_err, module_err) in errs.items():
        assert node_err < 5e-2 and node_err <= 1.25 * module_err + 2.0 ** -10, errs


@pytest.mark.parametrize("base_kind", ["hooked", "trainable"])
@pytest.mark.parametrize("balance", [False, True])
def test_hydra_update_node_equals_module_path_float64(base_kind, balance, module_path):
    """A base the whole-layer node cannot take (a forward hook, a trainable weight) keeps its own module for
    W x, and the C++ update node adds the routed update onto it: output, every gradient (the base weight's
    too) and the balance loss equal the module path's in float64; the hook fires once."""
    layer = make_layer(12, 8, 3, 4, balance=balance, seed=2)
    calls = []
    if base_kind == "hooked":
        layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(1))
    else:
        layer.base_layer.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, 12, dtype=torch.float64, generator=g)
    cot = torch.randn(2, 6, 8, dtype=torch.float64, generator=g)
    _update_node_vs_module_path(layer, x, cot, tol=(1e-12, 1e-12), grad_tol=(1e-10, 1e-10),
                                aux=0.7 if balance else 0.0,
                                extra=[layer.base_layer.weight] if base_kind == "trainable" else [])
    assert calls == ([1, 1] if base_kind == "hooked" else [])


def _update_node_vs_module_path(layer, x, cot, *, tol, grad_tol, seed=None, extra=(), aux=0.0):
    """Σ cot·y (+ aux·balance loss) through the update node and through the module path (each after
    ``torch.manual_seed(seed)`` when given): the outputs within ``tol`` (rtol, atol) and the gradients of x,
    A, B, the router and ``extra`` within ``grad_tol``. Returns the update node's output."""
    from tests.test_hydralora_lean import params

    runs = {}
    for lean in (True, False):
        HydraLoraLinear.use_lean_path = lean
        if seed is not None:
            torch.manual_seed(seed)
        xl = x.clone().requires_grad_(True)
        y = layer(xl)
        assert ("HydraUpdate" in _node(y)) == lean, _node(y)
        loss = (y * cot).sum() + (aux * layer.hydra_last_aux["default"] if aux else 0.0)
        runs[lean] = (y.detach(), torch.autograd.grad(loss, [xl, *params(layer), *extra]))
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=tol[0], atol=tol[1])
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=grad_tol[0], atol=grad_tol[1])
    return runs[True][0]


@pytest.mark.parametrize("hooked", [False, True])
def test_hydra_update_node_with_dropout_equals_module_path_float64(hooked, module_path):
    """Active dropout: the update node's A reads dropout(x) and its router the clean x, as the module path's
    do. With the same random state both paths draw the same mask, so the output and every gradient agree
    in float64; a second draw differs (the mask is live)."""
    layer = make_layer(12, 8, 3, 4, seed=4)
    layer.lora_dropout["default"] = torch.nn.Dropout(p=0.4)
    layer.train()
    if hooked:
        layer.base_layer.register_forward_hook(lambda m, i, o: None)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=g)
    cot = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)
    y = _update_node_vs_module_path(layer, x, cot, tol=(1e-12, 1e-12), grad_tol=(1e-10, 1e-10), seed=77)
    HydraLoraLinear.use_lean_path = True
    torch.manual_seed(78)
    assert not torch.allclose(layer(x), y)


def test_hydra_update_node_on_a_4bit_base_equals_the_module_path(module_path):
    """On a bitsandbytes NF4 base (CPU) the update node adds the routed update onto the 4-bit module's
    output: the same output and gradients as the module path, to float32 rounding."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from geoprobe.models.quantize import linear_4bit

    layer = make_layer(64, 48, 4, 3, base_dtype=torch.float32, adapter_dtype=torch.float32, seed=5)
    layer.base_layer = linear_4bit(layer.base_layer, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 10, 64, generator=g)
    cot = torch.randn(3, 10, 48, generator=g)
    _update_node_vs_module_path(layer, x, cot, tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-5))


def test_cli_native_builds_and_reports(capsys, monkeypatch):
    from geoprobe.cli import main

    assert main(["native", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "for the CPU" in out and "ready in" in out and ".so" in out and "GEOPROBE_NATIVE=" in out

    def broken(cuda):
        raise RuntimeError("layers.cpp:1:1: error: simulated failure")

    monkeypatch.setattr(native, "_MODULES", {})
    monkeypatch.setattr(native, "_FAILURES", {})
    monkeypatch.setattr(native, "_build", broken)
    assert main(["native", "--cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "simulated failure" in err[0] and "Traceback" not in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_native_nodes_run_on_the_tensors_gpu_not_the_current_one():
    """Layers on cuda:1 called while cuda:0 is current (as with a model split over GPUs): the kernels launch
    on the tensors' device and the results equal the float64 chain."""
    with torch.cuda.device(0):
        errs = _layer_vs_chain(torch.float64, (2, 19, 33, 1100, 5), "cuda:1")
        assert max(errs) < 1e-10, errs
        layer = make_layer(64, 48, 4, 3, seed=3).to("cuda:1")
        x = torch.randn(2, 5, 64, dtype=torch.float64, device="cuda:1", requires_grad=True)
        y = layer(x)
        assert "CppNode" in _node(y)
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all()
