"""adapters.build against PEFT's bar for a new method (PEFT tests/test_custom_models.py): for every
method on a tiny random LlamaForCausalLM and a tiny BertModel — build, finite forward, identity at
initialisation, training changes only adapter parameters, disable/enable, merge or a clear refusal,
save/load round trip reproducing the outputs exactly, refusal without the sidecar, refusal on another
base model. Oracles: stock PEFT built by hand, brute-force module scans, parameter counts from the
closed form Σ r_j (d_in + d_out)."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

import adapters
from adapters import io as io_module
from adapters import registry
from adapters.build import BERT_TARGETS, LLAMA_TARGETS, METHODS, default_targets
from adapters.io import SIDECAR, adapter_spec, base_fingerprint, load, save
from adapters.gelora import lora_parameter_count
from adapters.hydralora import HydraLoraLinear
from adapters.hyplora import HypLoraLinear
from adapters.plan import AdapterPlan
from geoprobe.errors import AdapterError, GeoprobeError, OutputError, PlanError

from tiny_models import tiny_bert, tiny_llama

build_module = importlib.import_module("adapters.build")  # ``adapters.build`` is the function
R = 4
RANKS = [2, 5]  # GeLoRA ranks of the two blocks


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


MAKERS = {"llama": tiny_llama, "bert": tiny_bert}


def _inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(123)
    vocab = 120 if kind == "bert" else 400
    return {"input_ids": torch.randint(3, vocab, (2, 9), generator=g)}


def _out(model, batch) -> torch.Tensor:
    with torch.no_grad():
        o = model(**batch)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _build(kind: str, method: str, seed: int = 0, **kw):
    kwargs = {"r": R, **kw}
    if registry.get(method).includes("gelora"):
        kwargs.setdefault("layer_ranks", RANKS)
    if registry.get(method).includes("hydralora"):
        kwargs.setdefault("n_heads", 3)
    torch.manual_seed(1000)  # adapter initialisation
    return build_module.build(MAKERS[kind](seed), method, **kwargs)


def _expected_class(method: str):
    expected = {"hyplora": HypLoraLinear, "hydralora": HydraLoraLinear}
    return next((expected[p] for p in registry.get(method).parts if p in expected), LoraLinear)


def _block(name: str) -> int:
    return next(int(p) for p in name.split(".") if p.isdigit())


def _train_step(model, batch, steps: int = 2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    torch.manual_seed(5)  # dropout masks
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        _out_grad = model(**batch)
        o = _out_grad.logits if hasattr(_out_grad, "logits") else _out_grad.last_hidden_state
        o.float().pow(2).mean().backward()
        opt.step()
    model.eval()


# --------------------------------------------------------------------------- targets
def _block_linears(model) -> set[str]:
    return {n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(p.isdigit() for p in n.split("."))}


def test_default_targets_from_module_names():
    llama, bert = tiny_llama(), tiny_bert()
    assert default_targets(llama) == LLAMA_TARGETS
    targets = default_targets(bert)
    # every Linear layer inside the encoder blocks (query, key, value and the three dense layers)
    # and nothing outside them (the pooler's dense), found by brute force over the module tree
    covered = {n for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear)
               and any(n == t or n.endswith("." + t) for t in targets)}
    assert covered == _block_linears(bert)
    assert "pooler.dense" not in covered and len(covered) == 2 * 6
    assert {t.rsplit(".", 1)[-1] for t in targets} == set(BERT_TARGETS)
    llama_block = {n for n in _block_linears(llama) if n.rsplit(".", 1)[-1] in LLAMA_TARGETS}
    peft_model = build_module.build(llama, "lora", r=R)
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if isinstance(m, LoraLinear)}
    assert adapted == llama_block and len(adapted) == 2 * 5


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_unknown_targets_list_linear_names(kind):
    with pytest.raises(AdapterError) as err:
        build_module.build(MAKERS[kind](), "hyplora", r=R, target_modules=["attn_proj"])
    msg = str(err.value)
    assert "attn_proj" in msg and ("q_proj" in msg if kind == "llama" else "query" in msg)
    # a model with neither naming family: the error lists what it has
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
    with pytest.raises(AdapterError, match=r"\['0', '1'\]|Pass target_modules"):
        default_targets(Odd())


def test_bad_method_and_options_refused():
    with pytest.raises(AdapterError, match="AdapterPlan"):
        build_module.build(tiny_llama(), "auto")
    with pytest.raises(AdapterError, match="unknown adapter method"):
        build_module.build(tiny_llama(), "qlora")
    with pytest.raises(AdapterError, match=r"--curvature \(curvature\) applies to hyplora"):
        build_module.build(tiny_llama(), "lora", curvature=2.0)
    with pytest.raises(AdapterError, match="layer_ranks"):
        build_module.build(tiny_llama(), "gelora")  # ranks are needed
    with pytest.raises(AdapterError, match="rank r"):
        build_module.build(tiny_llama(), "lora", r=0)
    with pytest.raises(AdapterError, match="already carries"):
        build_module.build(build_module.build(tiny_llama(), "lora", r=R), "lora")
    assert all(issubclass(e, GeoprobeError) for e in (AdapterError, PlanError))


# --------------------------------------------------------------------------- stock PEFT as oracle
def test_lora_equals_stock_peft():
    ours = _build("llama", "lora")
    torch.manual_seed(1000)
    cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=list(LLAMA_TARGETS), lora_dropout=0.05,
                     task_type="CAUSAL_LM")
    stock = get_peft_model(tiny_llama(), cfg)
    a, b = dict(ours.named_parameters()), dict(stock.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = _inputs("llama")
    _train_step(ours, batch)
    _train_step(stock, batch)
    assert torch.equal(_out(ours, batch), _out(stock, batch))


def test_dora_is_stock_peft_dora():
    """``dora`` builds PEFT's own DoRA: the same parameters and outputs as ``LoraConfig(use_dora=True)``, one
    magnitude per output feature of every adapted layer (``lora_magnitude_vector``), and training moves them."""
    from peft.tuners.lora.dora import DoraLinearLayer

    ours = _build("llama", "dora")
    torch.manual_seed(1000)
    stock = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=2 * R, target_modules=list(LLAMA_TARGETS),
                                                    lora_dropout=0.05, task_type="CAUSAL_LM", use_dora=True))
    a, b = dict(ours.named_parameters()), dict(stock.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adapted = [m for m in ours.modules() if isinstance(m, LoraLinear)]
    assert adapted and all(isinstance(m.lora_magnitude_vector["default"], DoraLinearLayer) for m in adapted)
    magnitudes = {n: p for n, p in ours.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(adapted)
    assert sum(p.numel() for p in magnitudes.values()) == sum(m.out_features for m in adapted)
    trainable, _ = ours.get_nb_trainable_parameters()
    assert trainable == sum(R * (m.in_features + m.out_features) + m.out_features for m in adapted)
    assert isinstance(ours.peft_config["default"], LoraConfig) and ours.peft_config["default"].use_dora
    before = {n: p.detach().clone() for n, p in magnitudes.items()}
    batch = _inputs("llama")
    _train_step(ours, batch)
    _train_step(stock, batch)
    assert any(not torch.equal(p, before[n]) for n, p in magnitudes.items())
    assert torch.equal(_out(ours, batch), _out(stock, batch))


@pytest.mark.parametrize("method", ["gelora", "hyplora+gelora", "hydralora+gelora"])
def test_gelora_ranks_and_parameter_count(method):
    model = _build("llama", method)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _expected_class(method))]
    assert len(layers) == 10
    for name, m in layers:
        r = m.r["default"]
        assert r == RANKS[_block(name)]
        assert m.scaling["default"] == pytest.approx(2.0)  # α_j / r_j = α / r in every block
    if method == "gelora":
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert n_train == lora_parameter_count(tiny_llama(), RANKS, list(LLAMA_TARGETS))
    # a rank of 0 leaves the block out
    zero = _build("llama", method, layer_ranks=[0, 3])
    blocks = {_block(n) for n, m in zero.named_modules() if isinstance(m, _expected_class(method))}
    assert blocks == {1}


# --------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_method_matrix(kind, method, tmp_path):
    batch = _inputs(kind)
    base_out = _out(MAKERS[kind](0), batch)
    model = _build(kind, method)
    cls = _expected_class(method)
    adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert adapted and all(type(m) is cls for m in adapted)
    spec = adapter_spec(model)
    assert spec.method == method and spec.alpha == 2 * R
    assert spec.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)

    # identity at initialisation (B = 0 for every method) and a finite forward
    out0 = _out(model, batch)
    assert torch.isfinite(out0).all()
    assert torch.allclose(out0, base_out, atol=1e-6, rtol=0)

    # training changes adapter parameters only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora_" in n}
    _train_step(model, batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    out1 = _out(model, batch)
    assert torch.isfinite(out1).all() and float((out1 - base_out).abs().max()) > 1e-5

    # disable / enable
    with model.disable_adapter():
        assert torch.allclose(_out(model, batch), base_out, atol=1e-6, rtol=0)
    assert torch.equal(_out(model, batch), out1)

    # save -> load onto a fresh copy of the same base: the same outputs, exactly
    folder = save(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", SIDECAR} <= set(os.listdir(folder))
    side = json.loads((folder / SIDECAR).read_text())
    assert side["method"] == method and side["fingerprint"] == base_fingerprint(MAKERS[kind](0))
    loaded = load(MAKERS[kind](0), folder)
    assert torch.equal(_out(loaded, batch), out1)
    assert adapter_spec(loaded).method == method
    assert all(type(m) is cls for m in loaded.modules() if isinstance(m, LoraLinear))

    # another base model of the same shape (other weights): refused
    with pytest.raises(AdapterError, match="another base model"):
        load(MAKERS[kind](7), folder)

    # merge: exact for linear methods, a clear refusal for the nonlinear / routed ones
    assert registry.get(method).mergeable == (method in ("lora", "dora", "gelora"))
    if registry.get(method).mergeable:
        merged = loaded.merge_and_unload()
        assert torch.allclose(_out(merged, batch), out1, atol=1e-5)
    else:
        with pytest.raises(AdapterError):
            loaded.merge_adapter()

    # without the sidecar every folder loads as what it is (the method's fields are in its config), unchecked
    (folder / SIDECAR).unlink()
    plain = load(MAKERS[kind](0), folder)
    assert torch.equal(_out(plain, batch), out1)
    assert all(type(m) is cls for m in plain.modules() if isinstance(m, LoraLinear))
    # a custom-layer folder whose config does not name the method (older versions) and no sidecar: refused
    if cls is not LoraLinear:
        raw = json.loads((folder / "adapter_config.json").read_text())
        own = {k for k in raw if k.startswith(("hyplora_", "hydra_"))}
        assert own
        (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in raw.items() if k not in own}))
        with pytest.raises(AdapterError, match="no geoprobe_adapter.json"):
            load(MAKERS[kind](0), folder)


@pytest.mark.parametrize("method", METHODS)
def test_half_precision_base(method, tmp_path):
    """A bfloat16 base: finite forward after training, and the round trip is still exact."""
    batch = _inputs("llama")
    kwargs = {"layer_ranks": RANKS} if registry.get(method).includes("gelora") else {}
    torch.manual_seed(1000)
    model = build_module.build(tiny_llama(0).to(torch.bfloat16), method, r=R, **kwargs)
    _train_step(model, batch)
    out = _out(model, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    loaded = load(tiny_llama(0).to(torch.bfloat16), save(model, tmp_path / "a"))
    assert torch.equal(_out(loaded, batch), out)


def test_stock_peft_would_silently_differ(tmp_path):
    """Why adapters.load is needed: stock PEFT loads a HypLoRA folder as plain LoRA (other outputs), with a
    warning that names the HypLoRA fields it ignores."""
    batch = _inputs("llama")
    model = _build("llama", "hyplora")
    _train_step(model, batch)
    want = _out(model, batch)
    folder = save(model, tmp_path / "a")
    with pytest.warns(UserWarning, match="hyplora_curvature"):  # PEFT names the fields it ignores
        stock = PeftModel.from_pretrained(tiny_llama(0), str(folder))
    assert not torch.allclose(_out(stock, batch), want, atol=1e-4)
    assert torch.equal(_out(load(tiny_llama(0), folder), batch), want)


# --------------------------------------------------------------------------- plans
def test_build_from_plan():
    plan = AdapterPlan(method="hyplora+gelora", r=R, alpha=3.0 * R, target_modules=("q_proj", "v_proj"),
                       curvature=0.5, layer_ranks=[1, 3], model="tiny")
    model = build_module.build(tiny_llama(), plan)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, HypLoraLinear)}
    assert len(layers) == 4
    for name, m in layers.items():
        assert m.r["default"] == [1, 3][_block(name)]
        assert m.scaling["default"] == pytest.approx(3.0)
        assert float(m.hyp_curvature("default").detach()) == pytest.approx(0.5, rel=1e-5)
    spec = adapter_spec(model)
    config = model.peft_config["default"]
    assert spec.plan == plan.to_dict() and spec.method == "hyplora+gelora" and config.hyplora_curvature == 0.5
    ranks = {k.replace("\\.", "."): v for k, v in config.rank_pattern.items()}  # GeLoRA's per-block ranks
    assert [ranks[f"model.layers.{b}.self_attn.{t}"] for b in (0, 1) for t in ("q_proj", "v_proj")] == [1, 1, 3, 3]

    heads = AdapterPlan(method="hydralora+gelora", r=R, alpha=2.0 * R, target_modules=LLAMA_TARGETS,
                        layer_ranks=[2, 2], n_heads=3, curvature=None)
    hm = build_module.build(tiny_llama(), heads)
    assert {m.hydra_heads["default"] for m in hm.modules() if isinstance(m, HydraLoraLinear)} == {3}

    # the package-level name builds too (adapters.build is callable as a function or a module)
    assert isinstance(adapters.build(tiny_llama(), "lora", r=R), PeftModel)


def test_plan_for_another_model_is_refused():
    plan = AdapterPlan(method="gelora", r=R, alpha=2.0 * R, layer_ranks=[1, 2, 3, 4])  # 4 blocks, model has 2
    with pytest.raises(PlanError, match="4 layer ranks"):
        build_module.build(tiny_llama(), plan)
    bert_plan = AdapterPlan(method="lora", r=R, alpha=2.0 * R)  # Llama target names on a BERT model
    with pytest.raises(AdapterError, match="query"):
        build_module.build(tiny_bert(), bert_plan)


# --------------------------------------------------------------------------- files
@pytest.mark.parametrize("method", ["hydralora", "hyplora"])
def test_save_pretrained_folder_loads_back_as_its_method(tmp_path, method):
    """PEFT's own save_pretrained (not patched) writes the method's fields into adapter_config.json, so the
    folder loads back as that method with the same outputs; only adapters.save adds the sidecar."""
    batch = _inputs("llama")
    model = _build("llama", method)
    _train_step(model, batch)
    model.save_pretrained(str(tmp_path / "a"))
    assert not (tmp_path / "a" / SIDECAR).is_file()
    loaded = load(tiny_llama(0), tmp_path / "a")
    assert adapter_spec(loaded).method == method
    assert torch.equal(_out(loaded, batch), _out(model, batch))


def test_save_is_atomic(tmp_path, monkeypatch):
    batch = _inputs("llama")
    model = _build("llama", "hyplora")
    target = save(model, tmp_path / "adapter")
    first = (target / "adapter_model.safetensors").read_bytes()
    _train_step(model, batch)

    def broken(folder, spec):
        raise OSError("disk full")

    monkeypatch.setattr(io_module, "_write_sidecar", broken)
    with pytest.raises(OSError, match="disk full"):
        save(model, target)
    # the old adapter is intact and nothing half-written is left beside it
    assert (target / "adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    save(model, target)  # replacing an existing folder
    assert (target / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert torch.equal(_out(load(tiny_llama(0), target), batch), _out(model, batch))
    with pytest.raises(OutputError):
        (tmp_path / "file").write_text("x")
        save(model, tmp_path / "file")


def test_altered_folders_are_refused(tmp_path):
    model = _build("llama", "hyplora")
    folder = save(model, tmp_path / "a")
    side = json.loads((folder / SIDECAR).read_text())
    (folder / SIDECAR).write_text(json.dumps({**side, "method": "lora"}))
    with pytest.raises(AdapterError, match="altered"):
        load(tiny_llama(0), folder)
    (folder / SIDECAR).write_text("{not json")
    with pytest.raises(AdapterError, match="cannot read"):
        load(tiny_llama(0), folder)
    with pytest.raises(AdapterError, match="does not exist"):
        load(tiny_llama(0), tmp_path / "missing")
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(AdapterError):
        load(tiny_llama(0), folder)


def test_fingerprint_identifies_the_base():
    a, b = tiny_llama(0), tiny_llama(0)
    assert base_fingerprint(a) == base_fingerprint(b)
    # dtype of the copy does not matter; other weights or another shape do
    assert base_fingerprint(a.to(torch.bfloat16)) == base_fingerprint(b)
    assert base_fingerprint(tiny_llama(1))["embedding_sha256"] != base_fingerprint(b)["embedding_sha256"]
    assert base_fingerprint(tiny_llama(0, layers=3))["n_layers"] == 3


def test_wrong_shape_base_is_refused(tmp_path):
    model = _build("llama", "lora")
    folder = save(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="n_layers 2 \\(adapter\\) vs 3"):
        load(tiny_llama(0, layers=3), folder)
    with pytest.raises(AdapterError, match="architecture"):
        load(tiny_bert(0), folder)


def test_first_version_sidecars_still_load(tmp_path):
    """A folder as the first sidecar version wrote it: a plain LoraConfig and HypLoRA's options (here the
    reference formula) in the sidecar. It loads as HypLoRA with those options and the same outputs."""
    from adapters.hyplora import HypLoraConfig

    batch = _inputs("llama")
    model = _build("llama", "hyplora", official=True, curvature=1.7)
    _train_step(model, batch)
    want = _out(model, batch)
    folder = save(model, tmp_path / "a")
    raw = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in raw.items()
                                                            if not k.startswith("hyplora_")}))
    side = json.loads((folder / SIDECAR).read_text())
    spec = adapter_spec(model)
    (folder / SIDECAR).write_text(json.dumps({
        **side, "schema_version": 1, "r": spec.r, "alpha": spec.alpha, "target_modules": spec.target_modules,
        "dropout": spec.dropout, "curvature": 1.7, "curvature_pattern": {}, "official": True, "n_heads": None,
        "top_k": None, "balance": False, "layer_ranks": None, "trainable_parameters": spec.trainable_parameters}))
    loaded = load(tiny_llama(0), folder)
    config = loaded.peft_config["default"]
    assert isinstance(config, HypLoraConfig) and config.hyplora_official and config.hyplora_curvature == 1.7
    assert torch.equal(_out(loaded, batch), want)


def test_registry_names_every_method_once():
    from adapters.hydralora import HydraLoraConfig
    from adapters.hyplora import HypLoraConfig

    assert METHODS == registry.names() == ("lora", "dora", "hyplora", "gelora", "hydralora", "hyplora+gelora",
                                           "hydralora+gelora")
    assert registry.choices() == ("auto",) + METHODS and registry.choices(include_auto=False) == METHODS
    for name in METHODS:
        method = registry.get(name)
        assert method.name == name and "+".join(method.parts) == name and method.description
        assert method.config_class.__name__.endswith("Config")
        assert (method.layer_class is None) == (_expected_class(name) is LoraLinear)
        assert method.layer_class in (None, _expected_class(name))
        for other in method.combines_with:  # a combination is a registered method made of both parts
            assert f"{name}+{other}" in METHODS or f"{other}+{name}" in METHODS
    # one loader per config class: methods sharing a config class share its loader
    for name in METHODS:
        method = registry.get(name)
        assert all(other.loader == method.loader for other in map(registry.get, METHODS)
                   if other.config == method.config)
    saved = adapters.hyplora_config(2, 4, ["q_proj"], curvature=0.7, official=True).to_dict()
    loaded = io_module.config_from_saved(registry.get("hyplora"), saved, where="test")  # the generic loader
    assert type(loaded) is HypLoraConfig and loaded.options == adapters.HypLoraOptions(curvature=0.7, official=True)
    assert registry.get(" HypLoRA ").name == "hyplora"
    assert registry.get("gelora").combines_with == ("hyplora", "hydralora")
    with pytest.raises(AdapterError, match="planner"):
        registry.get("auto")
    with pytest.raises(AdapterError, match="unknown adapter method"):
        registry.get("qlora")
    assert registry.for_config(LoraConfig(r=2, target_modules=["q_proj"])).name == "lora"
    assert registry.for_config(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).name == "dora"
    assert io_module.saved_method(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True).to_dict()).name == "dora"
    assert io_module.saved_method(LoraConfig(r=2, target_modules=["q_proj"]).to_dict()).name == "lora"
    assert registry.for_config(HypLoraConfig(r=2, target_modules=["q_proj"])).name == "hyplora"
    assert registry.for_config(HydraLoraConfig(r=2, target_modules=["q_proj"])).name == "hydralora"
    with pytest.raises(AdapterError, match="no adapter method"):
        registry.for_config(object())


def test_registry_is_read_without_torch():
    code = ("import sys, adapters.registry as r; assert r.get('hyplora').config.endswith('HypLoraConfig'); "
            "bad = {'torch', 'peft'} & set(sys.modules); assert not bad, bad")
    import subprocess

    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True, timeout=120)
