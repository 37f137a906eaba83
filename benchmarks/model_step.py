"""Shared parts of the model-level adapter benchmarks (bench_hyplora_model.py, bench_hydralora_model.py).

* :func:`chosen_methods` — the methods a ``--methods`` list names, the reference always among them;
* :func:`build_model` — a LlamaForCausalLM with Llama-3-8B's shapes (hidden 4096, FFN 14336, 32 heads,
  8 KV heads, vocabulary 128256) or a tiny stand-in, random bf16 weights, frozen, gradient checkpointing;
* :func:`time_interleaved` — every method a few consecutive steps per round, the order rotated from round
  to round, one synchronisation around each step; per-step seconds and peak memory (``max_memory_allocated``) with
  the memory held before the step;
* :func:`profile_steps` — GPU kernel time and kernel count of one step per method (torch.profiler);
* :func:`summary_rows` — the medians, quartiles, ratios to the reference method and peak memory of each method.

A method is run through ``prepare(name)``, which switches the model to that method and returns the
zero-argument callable that runs one step.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch

Prepare = Callable[[str], Callable[[], Any]]


def chosen_methods(spec: str, known: Sequence[str], reference: str) -> list[str]:
    """The methods named in the comma-separated ``spec``, with the ``reference`` always among them, in
    the order of ``known``; an unknown name stops the script with the list of choices."""
    chosen = {m.strip() for m in spec.split(",") if m.strip()} | {reference}
    unknown = chosen - set(known)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(known)}")
    return [m for m in known if m in chosen]


def build_model(layers: int, device: torch.device, small: bool):
    """(model, config): random bf16 weights, frozen, gradient checkpointing (non-reentrant)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:  # a tiny stand-in to check the scripts on a CPU
        cfg = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512)
    else:
        cfg = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=128256)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=500000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False, **cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, config


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(methods: list[str], prepare: Prepare, repeats: int, dev: torch.device, steps: int = 1
                     ) -> tuple[dict[str, list[float]], dict[str, list[tuple[int, int]]]]:
    """Seconds per step and (peak, held before) bytes per step for each method: ``repeats`` rounds, each
    method ``steps`` consecutive steps per round (each step timed on its own), the order rotating."""
    cuda = dev.type == "cuda"
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, list[tuple[int, int]]] = {m: [] for m in methods}
    for rnd in range(repeats):
        order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
        for name in order:
            step = prepare(name)
            for _ in range(steps):
                _sync(dev)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                    held = torch.cuda.memory_allocated(dev)
                t = time.perf_counter()
                step()
                _sync(dev)
                times[name].append(time.perf_counter() - t)
                if cuda:
                    peaks[name].append((torch.cuda.max_memory_allocated(dev), held))
    return times, peaks


def profile_steps(methods: list[str], prepare: Prepare, dev: torch.device, width: int = 27,
                  top: int = 0) -> dict[str, dict]:
    """{method: {"gpu_kernel_ms", "gpu_kernels", "step_ms", "host_syncs", "host_ops"}} from one profiled step
    each (CUDA only): GPU kernel time and launches, the step's wall time under the profiler, the host's waits
    on the GPU (synchronisations and device-to-host copies: each stops the host running ahead) and the
    ATen operators it called; with ``top`` > 0 also "top_kernels": the ``top`` kernels of most GPU time,
    each [name, ms, launches], and "top_host_ops": the ``top`` operators by host time (self), each
    [name, ms, calls]."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name in methods:
        step = prepare(name)
        _sync(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            step()
            _sync(dev)
            wall = time.perf_counter() - t
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        waits = [e for e in host if "Synchronize" in e.key or e.key in ("cudaMemcpy", "aten::item",
                                                                        "aten::_local_scalar_dense")]
        out[name] = {"gpu_kernel_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
                     "gpu_kernels": sum(e.count for e in kernels), "step_ms": wall * 1e3,
                     "host_syncs": {e.key: e.count for e in waits},
                     "host_ops": sum(e.count for e in host if e.key.startswith("aten::"))}
        if top > 0:
            ranked = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]
            out[name]["top_kernels"] = [[e.key, e.self_device_time_total / 1e3, e.count] for e in ranked]
            ranked = sorted(host, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
            out[name]["top_host_ops"] = [[e.key, e.self_cpu_time_total / 1e3, e.count] for e in ranked]
        print(f"{name:<{width}} profiled step: {wall * 1e3:.1f} ms, GPU kernel time "
              f"{out[name]['gpu_kernel_ms']:.1f} ms, {out[name]['gpu_kernels']} kernels, "
              f"{out[name]['host_ops']} ATen operators, host waits {out[name]['host_syncs']}", flush=True)
    return out


def summary_rows(methods: list[str], times: dict[str, list[float]], peaks: dict[str, list[tuple[int, int]]],
                 reference: str) -> list[dict]:
    """One row per method: median seconds per step, ratio to ``reference``, quartiles and minimum, every
    run, peak memory (GiB) and its excess over what was held before the step."""
    ref = statistics.median(times[reference])
    rows = []
    for name in methods:
        med = statistics.median(times[name])
        q1, _, q3 = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [med] * 3
        row = {"method": name, "median_s_per_step": med, "relative_to_" + reference.replace(" ", "_"): med / ref,
               "quartiles_s_per_step": [q1, q3], "min_s_per_step": min(times[name]),
               "runs_s_per_step": times[name]}
        if peaks[name]:
            peak = max(p for p, _ in peaks[name])
            held = min(b for _, b in peaks[name])
            row["peak_memory_gib"] = peak / 2 ** 30
            row["peak_over_resident_gib"] = (peak - held) / 2 ** 30
        rows.append(row)
    return rows
