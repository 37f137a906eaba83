"""HydraLoRA under PEFT's model operations: top-1 router gradient, frozen gates saved and loaded, freezing one
adapter of several, unmerge with nothing merged, several active adapters, and the refused operations
(weighted combination, merging live routing), each leaving the model unchanged.

Oracles: the float64 per-head reference (``hydralora_delta_reference``) under autograd, the closed-form
softmax-Jacobian router gradient, and the model's own outputs and state before the operation.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from adapters.hydralora import (
    HydraLoraConfig,
    HydraLoraLinear,
    freeze_routing,
    hydra_layers,
    hydralora_config,
    hydralora_delta_reference,
    hydralora_from_pretrained,
)
from geoprobe.errors import AdapterError

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    """Two linear layers, the shape of PEFT's own custom-model tests."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.lin0 = nn.Linear(10, 20).to(dtype)
        self.lin1 = nn.Linear(20, 6).to(dtype)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def config(targets=("lin0", "lin1"), **kw) -> HydraLoraConfig:
    return HydraLoraConfig(target_modules=list(targets), r=4, lora_alpha=8, hydra_heads=3, init_lora_weights=False,
                           **kw)


def hydra_mlp(seed: int = 0, **kw):
    return peft.get_peft_model(mlp(seed), config(**kw)).eval()


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# --------------------------------------------------------------------------- top-1 routing trains the router
def test_top1_router_gradient_is_nonzero_and_matches_float64_reference():
    torch.manual_seed(0)
    base = nn.Linear(12, 9).double()
    layer = HydraLoraLinear(base, "default", config=hydralora_config(3, 6, 4, ["x"], top_k=1), r=3, lora_alpha=6)
    with torch.no_grad():
        layer.lora_hydra_B["default"].weight.normal_()
        layer.lora_hydra_router["default"].weight.normal_()
    x = torch.randn(2, 7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    A, Bw, Wr = (layer.lora_A["default"].weight, layer.lora_hydra_B["default"].weight,
                 layer.lora_hydra_router["default"].weight)
    out = layer(x)
    # forward: exactly the one kept head per token, unscaled (the renormalised one-hot), as before
    probs = torch.softmax(x @ Wr.T, -1)
    top = probs.argmax(-1)
    heads = layer.heads("default")
    one_head = torch.stack([(x[b, t] @ A.T) @ heads[top[b, t]].T for b in range(2) for t in range(7)]).view(2, 7, 9)
    assert torch.allclose(out, base(x) + 2.0 * one_head, rtol=1e-12, atol=1e-12)

    cot = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, (x, A, Bw, Wr), cot)
    ref = base(x) + hydralora_delta_reference(x, A, heads, Wr, scaling=2.0, top_k=1)
    want = torch.autograd.grad(ref, (x, A, Bw, Wr), cot)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    d_router = got[3]
    assert d_router.abs().max() > 1e-3  # the router learns under top-1 (it did not: the gate was a constant 1)
    # closed form: dg_j = s⟨G, B_j A x⟩ for every head, dl = p ⊙ (dg − ⟨p, dg⟩), dW_router = Σ_tokens dl xᵀ
    with torch.no_grad():
        per_head = torch.einsum("btr,hor->btho", x @ A.T, heads)  # B_j A x, (b, t, N, d_out)
        dg = 2.0 * torch.einsum("btho,bto->bth", per_head, cot)
        dl = probs * (dg - (probs * dg).sum(-1, keepdim=True))
        closed = torch.einsum("bth,bti->hi", dl, x)
    assert torch.allclose(d_router, closed, rtol=1e-10, atol=1e-12)


def test_top1_router_changes_in_training_without_balance_loss():
    model = peft.get_peft_model(mlp(), config(hydra_top_k=1, hydra_balance=False))
    model.train()
    routers = {n: layer.lora_hydra_router["default"].weight.detach().clone() for n, layer in hydra_layers(model)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = inputs(), torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    for name, layer in hydra_layers(model):
        assert not torch.equal(layer.lora_hydra_router["default"].weight, routers[name]), name


# --------------------------------------------------------------------------- frozen gates are adapter state
def test_frozen_gates_are_saved_and_loaded(tmp_path):
    model = hydra_mlp()
    x = inputs()
    with torch.no_grad():
        live = model(x)
    freeze_routing(model, {"lin0": [0.5, 0.3, 0.2], "lin1": [0.1, 0.1, 0.8]})
    with torch.no_grad():
        frozen = model(x)
    assert not torch.allclose(frozen, live)
    model.save_pretrained(tmp_path / "frozen")
    for load in (lambda: hydralora_from_pretrained(mlp(), tmp_path / "frozen"),
                 lambda: peft.PeftModel.from_pretrained(mlp(), tmp_path / "frozen", config=config())):
        loaded = load().eval()
        gates = {name.rsplit(".", 1)[-1]: layer.hydra_frozen_gates["default"].tolist()
                 for name, layer in hydra_layers(loaded)}
        assert gates["lin0"] == pytest.approx([0.5, 0.3, 0.2], abs=1e-7)
        assert gates["lin1"] == pytest.approx([0.1, 0.1, 0.8], abs=1e-7)
        with torch.no_grad():
            assert torch.equal(loaded(x), frozen)  # routes frozen, not live
            merged = loaded.merge_and_unload()  # and therefore merges
            assert torch.allclose(merged(x), frozen, rtol=1e-10, atol=1e-10)
    renamed = hydralora_from_pretrained(mlp(), tmp_path / "frozen", adapter_name="other").eval()
    assert all("other" in layer.hydra_frozen_gates for _, layer in hydra_layers(renamed))
    with torch.no_grad():
        assert torch.equal(renamed(x), frozen)


def test_frozen_gates_load_onto_the_adapter_being_loaded(tmp_path):
    """load_adapter beside a live adapter: the saved gates go to the new adapter only."""
    frozen_model = hydra_mlp(seed=0)
    freeze_routing(frozen_model, [0.6, 0.3, 0.1])
    frozen_model.save_pretrained(tmp_path / "frozen")
    x = inputs()
    with torch.no_grad():
        want = frozen_model(x)
    model = hydra_mlp(seed=0)  # same base weights, its own live adapter "default"
    model.add_adapter("second", config())  # the HydraLoRA config first: PEFT alone would read a LoraConfig
    model.load_adapter(str(tmp_path / "frozen"), adapter_name="second")
    for _, layer in hydra_layers(model):
        assert "default" not in layer.hydra_frozen_gates
        assert layer.hydra_frozen_gates["second"].tolist() == pytest.approx([0.6, 0.3, 0.1])
    model.set_adapter("second")
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_live_routing_folders_hold_no_gates_and_load_live(tmp_path):
    from safetensors import safe_open

    model = hydra_mlp()
    x = inputs()
    with torch.no_grad():
        live = model(x)
    model.save_pretrained(tmp_path / "live")
    with safe_open(str(tmp_path / "live" / "adapter_model.safetensors"), framework="pt") as fh:
        assert not any("hydra_gates" in k for k in fh.keys())
    loaded = hydralora_from_pretrained(mlp(), tmp_path / "live").eval()
    assert not any(len(layer.hydra_frozen_gates) for _, layer in hydra_layers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(x), live)


# --------------------------------------------------------------------------- freezing one adapter of several
def test_freeze_routing_of_an_adapter_on_some_layers_only():
    model = hydra_mlp()
    model.add_adapter("narrow", config(targets=("lin0",)))
    freeze_routing(model, [0.2, 0.3, 0.5], adapter_name="narrow")
    layers = dict(hydra_layers(model))
    lin0, lin1 = layers["base_model.model.lin0"], layers["base_model.model.lin1"]
    assert lin0.hydra_frozen_gates["narrow"].tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert "narrow" not in lin1.lora_hydra_B and not len(lin1.hydra_frozen_gates)
    assert "default" not in lin0.hydra_frozen_gates  # the other adapter keeps routing live
    freeze_routing(model, {"lin0": [1.0, 0.0, 0.0]}, adapter_name="narrow")  # a mapping names only its layers
    assert lin0.hydra_frozen_gates["narrow"].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(AdapterError, match="no HydraLoRA layer holds an adapter 'missing'"):
        freeze_routing(model, [0.2, 0.3, 0.5], adapter_name="missing")
    with pytest.raises(AdapterError, match="exactly one per HydraLoRA layer"):
        freeze_routing(model, {"lin0": [1.0, 0.0, 0.0]})  # both adapters: lin1 is missing
    assert lin0.hydra_frozen_gates["narrow"].tolist() == [1.0, 0.0, 0.0]  # a refused call changes nothing


# --------------------------------------------------------------------------- unmerge, several adapters
def test_unmerge_with_nothing_merged_warns_like_lora():
    model = hydra_mlp()
    before = adapter_state(model)
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()
    assert_same_state(model, before)


def test_several_active_adapters_add_their_deltas():
    model = peft.get_peft_model(mlp(), config(targets=("lin0",)), adapter_name="first")
    model.add_adapter("second", config(targets=("lin0",), hydra_top_k=2))
    x = inputs()
    layer = hydra_layers(model)[0][1]
    base = layer.get_base_layer()

    def delta(name):
        return hydralora_delta_reference(x, layer.lora_A[name].weight, layer.heads(name),
                                         layer.lora_hydra_router[name].weight, scaling=2.0,
                                         top_k=layer.hydra_top_k[name])

    def head(h):
        return model.get_base_model().lin1(torch.relu(h))

    with torch.no_grad():
        model.set_adapter("first")
        out_a = model(x)
        model.set_adapter("second")
        out_b = model(x)
        model.base_model.set_adapter(["first", "second"])
        both = model(x)
        assert torch.allclose(out_a, head(base(x) + delta("first")), rtol=1e-12, atol=1e-12)
        assert torch.allclose(out_b, head(base(x) + delta("second")), rtol=1e-12, atol=1e-12)
        assert torch.allclose(both, head(base(x) + delta("first") + delta("second")), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(both, out_a, atol=1e-5) and not torch.allclose(both, out_b, atol=1e-5)


# --------------------------------------------------------------------------- refusals leave the model unchanged
def test_add_weighted_adapter_is_refused_before_anything_is_built():
    model = hydra_mlp()
    model.add_adapter("other", config())
    before = adapter_state(model)
    configs = dict(model.peft_config)
    for adapters, weights in ((["default"], [1.0]), (["default", "other"], [0.5, 0.5])):
        for combination in ("linear", "cat", "svd"):
            with pytest.raises(AdapterError, match="add_weighted_adapter cannot combine HydraLoRA"):
                model.add_weighted_adapter(adapters, weights, "mix", combination_type=combination)
            assert dict(model.peft_config) == configs
            assert all("mix" not in layer.lora_A for _, layer in hydra_layers(model))
            assert_same_state(model, before)
    hydralora_config(4, 8, 3, ["lin0"])  # building configs elsewhere is unaffected


def test_every_merge_entry_point_refuses_live_routing_and_keeps_weights():
    model = hydra_mlp()
    x = inputs()
    with torch.no_grad():
        out = model(x)
    before = adapter_state(model)
    calls = (lambda: model.merge_adapter(), lambda: model.merge_and_unload(),
             lambda: model.merge_and_unload(safe_merge=True), lambda: model.base_model.merge_adapter(["default"]),
             lambda: model.base_model.merge_and_unload(adapter_names=["default"]))
    for call in calls:
        with pytest.raises(AdapterError, match="freeze_routing"):
            call()
        assert not any(layer.merged for _, layer in hydra_layers(model))
        assert_same_state(model, before)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model(x), out)


def test_router_of_a_saturated_layer_has_exactly_zero_gradient():
    """Why PEFT's "every adapter parameter moves in 3 SGD steps" is left out for HydraLoRA on lin0+lin1 with
    zero-initialised heads (tests/peft_suite/rows.py, LEFT_OUT): in PEFT's own setting (its MLP with
    log-softmax, inputs 0 … 89, lr 0.5) lin1's router gets exactly zero gradient at the first step, because
    every head is 0, and whenever it gets exactly zero gradient afterwards its gates are saturated: one-hot
    in float32, where the softmax's derivative is exactly 0. lin0's router does learn."""
    class PeftMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

        def forward(self, x):
            return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)

    for seed in range(4):
        torch.manual_seed(seed)
        model = peft.get_peft_model(PeftMLP(), HydraLoraConfig(target_modules=["lin0", "lin1"]))
        lin1 = model.base_model.model.lin1
        seen: list[torch.Tensor] = []
        lin1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        x = torch.arange(90, dtype=torch.float32).view(9, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        router0 = model.base_model.model.lin0.lora_hydra_router["default"].weight.detach().clone()
        for step in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            grad = lin1.lora_hydra_router["default"].weight.grad
            if step == 0:
                assert torch.equal(grad, torch.zeros_like(grad))
            elif torch.equal(grad, torch.zeros_like(grad)):
                gates = torch.softmax(seen[-1] @ lin1.lora_hydra_router["default"].weight.detach().T, dim=-1)
                assert torch.equal(gates.max(dim=-1).values, torch.ones(gates.shape[0]))
            opt.step()
        assert not torch.allclose(model.base_model.model.lin0.lora_hydra_router["default"].weight, router0)
