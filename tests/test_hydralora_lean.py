"""HydraLoRA's single-function path (adapters.hydralora.kernels.HydraLinearFn) against the module path and peers.

Oracles: the layer's own module-by-module path (``use_lean_path = False``) and the per-head loop
``hydralora_delta_reference``, both in float64 on fresh random inputs (outputs and every gradient: input,
A, heads, router, with and without the load-balancing loss); stock PEFT LoRA for N = 1; a float64 copy of
the computation for the mixed bf16/float32 case. Also: which calls fall back to the module path, and the
number of operations each path issues (counted with a TorchDispatchMode; no timing).
"""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from adapters.kernels import native
from adapters.hydralora import (
    HydraLoraLinear,
    hydra_aux_loss,
    hydra_layers,
    hydralora_config,
    hydralora_delta_reference,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture
def module_path():
    """Run the test body's second half with the single-function path switched off, restoring it after."""
    saved = HydraLoraLinear.use_lean_path
    yield
    HydraLoraLinear.use_lean_path = saved


def make_layer(d_in, d_out, r, n, *, bias=True, balance=False, top_k=None, base_dtype=torch.float64,
               adapter_dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).to(base_dtype).requires_grad_(False)
    cfg = hydralora_config(r, 3 * r, n, ["x"], top_k=top_k, balance=balance)
    layer = HydraLoraLinear(base, "default", config=cfg, r=r, lora_alpha=3 * r)
    layer.to(adapter_dtype)
    layer.base_layer.to(base_dtype)
    with torch.no_grad():
        for w in (layer.lora_A["default"].weight, layer.lora_hydra_B["default"].weight,
                  layer.lora_hydra_router["default"].weight):
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64))
    return layer


def params(layer):
    return (layer.lora_A["default"].weight, layer.lora_hydra_B["default"].weight,
            layer.lora_hydra_router["default"].weight)


def is_lean(y: torch.Tensor) -> bool:
    # the Python node or the C++ ones (the whole layer, or the update onto a base computed outside)
    return y.grad_fn is not None and any(k in y.grad_fn.name() for k in ("HydraLinear", "HydraUpdate"))


def run(layer, x, cot, *, lean, aux_coef=0.0):
    """Output and gradients (x, A, B, router) of Σ cot·y (+ aux_coef·balance loss) on one path."""
    HydraLoraLinear.use_lean_path = lean
    xl = x.detach().requires_grad_(True)
    y = layer(xl)
    assert is_lean(y) == lean
    loss = (y * cot).sum()
    if aux_coef:
        loss = loss + aux_coef * layer.hydra_last_aux["default"]
    grads = torch.autograd.grad(loss, (xl, *params(layer)))
    return y.detach(), grads


SHAPES = [  # (leading dims, d_in, d_out, r, n, bias)
    ((7,), 12, 10, 3, 4, True),
    ((2, 5), 16, 9, 4, 3, False),
    ((2, 3, 4), 8, 20, 2, 5, True),
    ((3, 6), 10, 6, 5, 1, False),
]


@pytest.mark.parametrize("lead,d_in,d_out,r,n,bias", SHAPES)
@pytest.mark.parametrize("balance", [False, True])
def test_lean_matches_module_path_and_reference_float64(lead, d_in, d_out, r, n, bias, balance, module_path):
    layer = make_layer(d_in, d_out, r, n, bias=bias, balance=balance, seed=d_in + n)
    g = torch.Generator().manual_seed(100 + d_out)
    x = torch.randn(*lead, d_in, dtype=torch.float64, generator=g)
    cot = torch.randn(*lead, d_out, dtype=torch.float64, generator=g)
    coef = 0.7 if balance else 0.0
    y_lean, g_lean = run(layer, x, cot, lean=True, aux_coef=coef)
    aux_lean = layer.hydra_last_aux.get("default")
    y_mod, g_mod = run(layer, x, cot, lean=False, aux_coef=coef)
    assert y_lean.shape == (*lead, d_out)
    assert torch.allclose(y_lean, y_mod, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_lean, g_mod):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    if balance:
        assert torch.allclose(aux_lean, layer.hydra_last_aux["default"], rtol=1e-12, atol=1e-12)
    else:
        assert aux_lean is None
    # independent oracle: the per-head loop (A x recomputed per head), forward and gradients
    A, Bw, Wr = params(layer)
    heads = Bw.view(d_out, n, r).permute(1, 0, 2)
    xl = x.clone().requires_grad_(True)
    ref = layer.get_base_layer()(xl) + hydralora_delta_reference(xl, A, heads, Wr, scaling=3.0)
    assert torch.allclose(y_lean, ref.detach(), rtol=1e-12, atol=1e-12)
    if not balance:
        want = torch.autograd.grad((ref * cot).sum(), (xl, A, Bw, Wr))
        for a, b in zip(g_lean, want):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    if n == 1:  # one head: the gate is 1 and the router gets exactly no gradient
        assert torch.count_nonzero(g_lean[3]) == 0


def test_lean_partial_gradients(module_path):
    """Only the balance loss differentiated (no output gradient), an input without gradient, a frozen head."""
    layer = make_layer(14, 11, 3, 4, balance=True, seed=5)
    x = torch.randn(3, 5, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    A, Bw, Wr = params(layer)
    got = {}
    for lean in (True, False):
        HydraLoraLinear.use_lean_path = lean
        xl = x.clone().requires_grad_(True)
        layer(xl)
        got[lean] = torch.autograd.grad(layer.hydra_last_aux["default"], (xl, Wr))
    for a, b in zip(got[True], got[False]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert got[True][1].abs().max() > 0
    Bw.requires_grad_(False)
    cot = torch.randn(3, 5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    both = {}
    for lean in (True, False):
        HydraLoraLinear.use_lean_path = lean
        y = layer(x)  # x needs no gradient
        assert is_lean(y) == lean
        both[lean] = torch.autograd.grad((y * cot).sum(), (A, Wr))
    Bw.requires_grad_(True)
    for a, b in zip(both[True], both[False]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_lean_mixed_precision_bf16_base_float32_adapters(module_path):
    """bfloat16 base and activations with float32 adapter weights (PEFT's autocast_adapter_dtype): both paths
    compute the adapter in float32 from the same bf16 x, so they agree to bf16 rounding of the output and to
    float32 rounding of the adapter gradients; both are close to a float64 computation."""
    layer = make_layer(64, 48, 4, 4, base_dtype=torch.bfloat16, adapter_dtype=torch.float32, seed=8)
    with torch.no_grad():
        layer.lora_hydra_B["default"].weight.mul_(0.3)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 64, generator=g).bfloat16()
    cot = torch.randn(2, 16, 48, generator=g).bfloat16()
    y_lean, g_lean = run(layer, x, cot, lean=True)
    y_mod, g_mod = run(layer, x, cot, lean=False)
    assert y_lean.dtype == torch.bfloat16 and g_lean[0].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in g_lean[1:])
    ulp = 2.0 ** -7 * y_mod.float().abs().clamp(min=2.0 ** -6)  # bf16 spacing (8 bits of mantissa)
    assert ((y_lean.float() - y_mod.float()).abs() <= ulp).all()
    for a, b in zip(g_lean[1:], g_mod[1:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert (g_lean[0].float() - g_mod[0].float()).norm() <= 1e-2 * g_mod[0].float().norm()
    # float64 oracle from the same bf16 inputs and float32 weights
    A, Bw, Wr = (p.detach().double().requires_grad_(True) for p in params(layer))
    base = layer.get_base_layer()
    x64 = x.double().requires_grad_(True)
    ref = x64 @ base.weight.double().T + base.bias.double() + hydralora_delta_reference(
        x64, A, Bw.view(48, 4, 4).permute(1, 0, 2), Wr, scaling=3.0)
    assert (y_lean.double() - ref).norm() <= 4e-3 * ref.norm()
    want = torch.autograd.grad((ref * cot.double()).sum(), (x64, A, Bw, Wr))
    for a, b in zip(g_lean, want):
        assert (a.double() - b).norm() <= 1e-2 * b.norm()


def test_n1_lean_equals_peft_lora():
    """N = 1 through the single-function path is PEFT LoRA: same output and gradients for the same A, B."""
    torch.manual_seed(0)
    base = nn.Linear(18, 13).double().requires_grad_(False)
    lora = peft.tuners.lora.Linear(base, "default", config=peft.LoraConfig(r=3, lora_alpha=6), r=3, lora_alpha=6)
    hydra = HydraLoraLinear(nn.Linear(18, 13).double().requires_grad_(False), "default",
                            config=hydralora_config(3, 6, 1, ["x"]), r=3, lora_alpha=6)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        hydra.base_layer.load_state_dict(base.state_dict())
        lora.lora_A["default"].weight.copy_(torch.randn(3, 18, generator=g, dtype=torch.float64))
        lora.lora_B["default"].weight.copy_(torch.randn(13, 3, generator=g, dtype=torch.float64))
        hydra.lora_A["default"].weight.copy_(lora.lora_A["default"].weight)
        hydra.lora_hydra_B["default"].weight.copy_(lora.lora_B["default"].weight)
    x = torch.randn(4, 5, 18, dtype=torch.float64, generator=g)
    cot = torch.randn(4, 5, 13, dtype=torch.float64, generator=g)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = lora(xa), hydra(xb)
    assert is_lean(yb)
    assert not torch.allclose(ya, base(x))
    assert torch.allclose(ya, yb, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad((ya * cot).sum(), (xa, lora.lora_A["default"].weight, lora.lora_B["default"].weight))
    gb = torch.autograd.grad((yb * cot).sum(), (xb, *params(hydra)))
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(gb[3]) == 0


def test_model_with_gradient_checkpointing_lean_equals_module_path(module_path):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg).double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, hydralora_config(3, 6, 3, ["q_proj", "v_proj", "up_proj", "down_proj"],
                                                        balance=True, init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(is_lean(o))) for _, layer in hydra_layers(model)]
    results = {}
    for lean in (True, False):
        HydraLoraLinear.use_lean_path = lean
        seen.clear()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss + 0.1 * hydra_aux_loss(model)
        loss.backward()
        assert seen and all(s == lean for s in seen)
        results[lean] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for h in hooks:
        h.remove()
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-12, atol=1e-12)
    assert set(results[True][1]) == set(names) and len(names) == 2 * 4 * 3
    for n in names:
        assert torch.allclose(results[True][1][n], results[False][1][n], rtol=1e-9, atol=1e-12), n


def test_calls_the_lean_path_cannot_serve_fall_back():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, 12, dtype=torch.float64, generator=g)
    # top-k routing
    layer = make_layer(12, 8, 3, 4, top_k=2, seed=1)
    A, Bw, Wr = params(layer)
    y = layer(x)
    assert not is_lean(y)
    ref = layer.get_base_layer()(x) + hydralora_delta_reference(x, A, Bw.view(8, 4, 3).permute(1, 0, 2), Wr,
                                                                  scaling=3.0, top_k=2)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    # frozen gates
    layer = make_layer(12, 8, 3, 4, seed=2)
    assert is_lean(layer(x))
    layer.hydra_frozen_gates["default"] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert not is_lean(layer(x))
    del layer.hydra_frozen_gates["default"]
    # active dropout; the same dropout module in eval mode is a no-op and the lean path serves
    layer.lora_dropout["default"] = nn.Dropout(p=0.5)
    layer.train()
    assert not is_lean(layer(x))
    layer.eval()
    assert is_lean(layer(x))
    layer.lora_dropout["default"] = nn.Identity()
    # a trainable base weight gets its gradient through the module path
    layer.base_layer.weight.requires_grad_(True)
    y = layer(x)
    assert not is_lean(y)
    y.sum().backward()
    assert layer.base_layer.weight.grad is not None
    layer.base_layer.weight.requires_grad_(False)
    # a hook on the base layer still fires
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(1))
    assert not is_lean(layer(x)) and calls == [1]
    handle.remove()
    assert is_lean(layer(x))
    # autocast (float32 layer: autocast runs the products in bfloat16)
    layer32 = make_layer(12, 8, 3, 4, base_dtype=torch.float32, adapter_dtype=torch.float32, seed=6)
    assert is_lean(layer32(x.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not is_lean(layer32(x.float()))
    # disabled adapters give the base output
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.get_base_layer()(x))
    layer.enable_adapters(True)
    # several active adapters
    layer.update_layer("other", 2, lora_alpha=4, config=hydralora_config(2, 4, 2, ["x"]))
    layer.to(torch.float64)
    layer.set_adapter(["default", "other"])
    assert not is_lean(layer(x))
    layer.set_adapter("other")
    assert is_lean(layer(x))


def test_double_backward_is_refused():
    layer = make_layer(6, 5, 2, 3, seed=3)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


class _Count(TorchDispatchMode):
    VIEWS = {"_unsafe_view", "_reshape_alias", "as_strided", "expand", "slice", "select", "unsqueeze", "squeeze",
             "permute", "transpose", "t", "view", "split", "split_with_sizes", "detach", "alias"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        return sum(c for k, c in self.ops.items() if k not in self.VIEWS)


def _count(layer, x):
    counts = None
    for _ in range(2):  # the first call creates cached constants
        layer.zero_grad(set_to_none=True)
        xl = x.detach().requires_grad_(True)
        with _Count() as fwd:
            y = layer(xl)
        gy = torch.ones_like(y)
        with _Count() as bwd:
            y.backward(gy)
        counts = (fwd.kernels(), bwd.kernels())
    return counts


def test_lean_path_issues_fewer_operations(module_path):
    """Operations issued per call (views excluded), bf16 base with float32 adapters as in training:
    fewer than the module path's, and at most one more than PEFT LoRA's in each direction."""
    layer = make_layer(32, 24, 4, 4, base_dtype=torch.bfloat16, adapter_dtype=torch.float32, seed=4)
    x = torch.randn(2, 8, 32).bfloat16()
    HydraLoraLinear.use_lean_path = True
    lean = _count(layer, x)
    HydraLoraLinear.use_lean_path = False
    module = _count(layer, x)
    base = nn.Linear(32, 24, bias=True).bfloat16().requires_grad_(False)
    lora = peft.tuners.lora.Linear(base, "default", config=peft.LoraConfig(r=16, lora_alpha=16), r=16,
                                   lora_alpha=16)
    for name, p in lora.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    plain = _count(lora, x)
    assert lean[0] < module[0] and lean[1] < module[1]
    assert lean[0] <= plain[0] + 1 and lean[1] <= plain[1] + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("node", ["native", "python"])
def test_lean_path_on_cuda_matches_module_path(base_dtype, adapter_dtype, node, module_path):
    """The same comparison on the GPU (cuBLAS addmm with beta = 0 and a broadcast zero, in-place mixed-dtype
    add), against the module path and a float64 computation on the CPU."""
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    previous = native.set_native_mode("auto" if node == "native" else "off")
    try:
        _cuda_check(base_dtype, adapter_dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
        native.set_native_mode(previous)


def _cuda_check(base_dtype, adapter_dtype):
    layer = make_layer(256, 192, 8, 4, base_dtype=base_dtype, adapter_dtype=adapter_dtype, seed=21).cuda()
    with torch.no_grad():
        layer.lora_hydra_B["default"].weight.mul_(0.1)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(3, 40, 256, generator=g).to("cuda", base_dtype)
    cot = torch.randn(3, 40, 192, generator=g).to("cuda", base_dtype)
    y_lean, g_lean = run(layer, x, cot, lean=True)
    y_mod, g_mod = run(layer, x, cot, lean=False)
    exact = base_dtype == adapter_dtype == torch.float32
    tol = 1e-5 if exact else 2e-2
    assert (y_lean.float() - y_mod.float()).norm() <= tol * y_mod.float().norm()
    for a, b in zip(g_lean, g_mod):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).norm() <= tol * b.float().norm()
    cpu = make_layer(256, 192, 8, 4, seed=21)
    with torch.no_grad():
        for p64, p in zip(params(cpu), params(layer)):
            p64.copy_(p.double().cpu())
        cpu.base_layer.weight.copy_(layer.base_layer.weight.double().cpu())
        cpu.base_layer.bias.copy_(layer.base_layer.bias.double().cpu())
    y64, g64 = run(cpu, x.double().cpu(), cot.double().cpu(), lean=True)
    assert (y_lean.double().cpu() - y64).norm() <= tol * y64.norm()
    for a, b in zip(g_lean, g64):
        assert (a.double().cpu() - b).norm() <= tol * b.norm()


def test_lean_path_with_private_entry_points_off_matches(module_path, monkeypatch):
    """With the private torch entry points off (GEOPROBE_PRIVATE_APIS=0) the layer cannot prove that its base
    has no hooks, so it takes the module path; and the one-node path itself, where the base is known to be
    plain, takes the public ``apply`` and a copying reshape: same values and gradients as with them on, and
    as the module path."""
    import adapters.hydralora.layer as hydra_layer
    from adapters.kernels import _internals

    layer = make_layer(12, 10, 3, 4, balance=True, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 12, dtype=torch.float64, generator=g)
    cot = torch.randn(2, 7, 10, dtype=torch.float64, generator=g)
    y_on, g_on = run(layer, x, cot, lean=True, aux_coef=0.3)
    previous = _internals.set_private_apis(False)
    try:
        HydraLoraLinear.use_lean_path = True
        assert not is_lean(layer(x))  # hooks cannot be ruled out without the private dictionaries
        # this test's base is a plain frozen nn.Linear without hooks: let the one-node path run
        monkeypatch.setattr(hydra_layer, "frozen_plain_linear", lambda base, xx: (
            type(base) is torch.nn.Linear and not base.weight.requires_grad and xx.dtype == base.weight.dtype))
        y_off, g_off = run(layer, x, cot, lean=True, aux_coef=0.3)
    finally:
        _internals.set_private_apis(previous)
    y_mod, g_mod = run(layer, x, cot, lean=False, aux_coef=0.3)
    assert torch.equal(y_off, y_on)
    assert torch.allclose(y_off, y_mod, rtol=1e-12, atol=1e-12)
    for a, b, c in zip(g_off, g_on, g_mod):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-12)
