"""benchmarks/hyplora_input_scale.py: the factor ρ = ‖x_s‖/‖x‖ by which HypLoRA's update is smaller than
LoRA's for the same A and B. Oracles: the closed form sinh(n)/(n·s) in numpy float64, and HypLoRA's own
update Δ (adapters.hyplora.functional.hyplora_delta) against B A x for a small B."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from adapters.hyplora.functional import hyplora_delta

from tiny_models import bpe_tokenizer, tiny_llama

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hyplora_input_scale.py"


def _script():
    spec = importlib.util.spec_from_file_location("hyplora_input_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_measured_factor_is_the_closed_form_of_the_measured_norms():
    script = _script()
    prompts = ["The quick brown fox jumps over the lazy dog.", "Return the value of the expression 3 + 4."]
    model = tiny_llama(seed=5)
    kinds = script.measure(model, bpe_tokenizer(), prompts, curvature=1.0, max_length=64)
    assert set(kinds) == set(script.TARGETS)
    # the inputs of every projection, gathered here independently of the script
    seen: dict[str, list[np.ndarray]] = {k: [] for k in script.TARGETS}
    hooks = [m.register_forward_pre_hook(lambda mod, a, k=name.rsplit(".", 1)[-1]:
                                          seen[k].append(a[0].double().reshape(-1, a[0].shape[-1]).numpy()))
             for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in script.TARGETS]
    with torch.no_grad():
        for text in prompts:
            model(input_ids=bpe_tokenizer()(text, return_tensors="pt")["input_ids"])
    for h in hooks:
        h.remove()
    for kind, rec in kinds.items():
        x = np.concatenate(seen[kind])
        s = math.sqrt(x.shape[1])
        n = np.linalg.norm(x, axis=1) / s
        rho = np.sinh(np.minimum(n, 12.0)) / (n * s)
        assert rec["d_in"] == x.shape[1] and rec["tokens"] == x.shape[0]
        for q, key in ((0.05, "p05"), (0.5, "median"), (0.95, "p95")):
            assert abs(rec["n"][key] - np.quantile(n, q)) < 1e-9
            assert abs(rec["rho"][key] - np.quantile(rho, q)) < 1e-9
        assert rec["rho"]["p05"] >= 1 / s  # sinhc ≥ 1


def test_the_factor_is_hyplora_update_over_lora_update_for_a_small_b():
    g = torch.Generator().manual_seed(11)
    d_in, d_out, r = 48, 40, 4
    x = torch.randn(64, d_in, generator=g, dtype=torch.float64) * 1.3
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * 1e-6
    s = math.sqrt(d_in)
    delta = hyplora_delta(x, A, B, 1.0, s)
    lora = x @ A.T @ B.T
    ratio = (delta.norm(dim=-1) / lora.norm(dim=-1)).numpy()
    n = (x.norm(dim=-1) / s).numpy()
    np.testing.assert_allclose(ratio, np.sinh(n) / (n * s), rtol=1e-8)
    # the same direction as LoRA's update
    cos = torch.nn.functional.cosine_similarity(delta, lora, dim=-1)
    assert float(cos.min()) > 1 - 1e-10
