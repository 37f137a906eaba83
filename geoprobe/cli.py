"""The ``geoprobe`` command: a thin layer over the library.

Commands: ``probe`` (measure, write a profile JSON), ``report`` (HTML report from models or saved
profiles), ``finetune`` (train adapters: LoRA, HypLoRA, GeLoRA, HydraLoRA or the planned ``auto``;
an encoder on GLUE TSVs trains a classification head beside them, ``--head``), ``evaluate`` (accuracy
of a model with an adapter on one or more test sets; GLUE's F1 and Matthews' correlation), ``run``
(probe → plan → build → fine-tune → evaluate → report in one command), ``compare`` (every method with
every seed at an equal parameter budget, paired against LoRA) and ``native`` (build the adapter layers' C++ nodes now
instead of at the first training step, and say where they serve). This module parses arguments, prints
and calls the library: the adapter commands call :mod:`geoprobe.workflows` (and reach into the
``adapters`` package inside their own functions only). Every :class:`~geoprobe.errors.GeoprobeError`
is printed as one line and exits non-zero.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional, Sequence

from adapters import registry

from . import runtime
from .errors import DeviceError, GeoprobeError
from .records import check_writable, display_path


def _slug(name: str) -> str:
    """File-name slug, the same one the report uses (generic folder names such as ``model`` skipped)."""
    from .report.html import model_slug
    return model_slug(name)


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", help="text file, folder, .jsonl/.json (default: CPython's pydoc topics)")
    p.add_argument("--field", help="field of each .jsonl/.json record to read (e.g. question)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None, help="count at most N corpus tokens")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (.bin) weights — runs code from the file")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the hub — runs code from the model repository")
    p.add_argument("--n-prompts", type=int, default=200, help="prompts for per-prompt δ")
    p.add_argument("--layer-positions", type=int, default=1200,
                   help="hidden-state positions per layer for intrinsic dimension and δ")
    p.add_argument("--layer-sets", type=int, default=8,
                   help="fewest documents per layer for δ (one δ set per document; default 8)")
    p.add_argument("--token-sets", type=int, default=8,
                   help="seeded sets of 1,000 distinct corpus tokens for the embedding δ (default 8)")
    p.add_argument("--null-repeats", type=int, default=1, help="draws of each null per δ set (default 1)")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="bootstrap resamples of every δ interval and test (default 2000)")
    p.add_argument("--id-bootstrap", type=int, default=500,
                   help="block-bootstrap resamples of each layer's intrinsic dimension (0 = none; default 500)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of every interval (default 0.95)")
    p.add_argument("--correction", default="holm", choices=("holm", "bh", "none"),
                   help="correction of the per-layer δ tests: Holm (default), Benjamini–Hochberg, none")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_dtype_arg(p, "default: the checkpoint's bfloat16/float16 on a GPU, float32 on the CPU")
    p.add_argument("--stream", action="store_true",
                   help="read hidden states one layer at a time from the safetensors shards (chosen by itself "
                        "when the model does not fit the device)")
    p.add_argument("--embeddings-only", action="store_true",
                   help="read only the input-embedding tensor: frequency, norms and token-embedding δ, no hidden "
                        "states (runs on a CPU in the memory of that one tensor)")
    p.add_argument("--max-gpu-memory", metavar="SIZE",
                   help="GPU memory the run may use, e.g. 24GiB (a bare number is GiB); refused before the load "
                        "when it cannot be met")
    p.add_argument("--max-memory", metavar="SIZE", help="host memory the run may use, e.g. 32GiB")


def _add_dtype_arg(p: argparse.ArgumentParser, default: str) -> None:
    from .models.precision import DTYPE_CHOICES

    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help=f"dtype the model computes in; auto = the checkpoint's ({default})")


VERBOSE_HELP = "more log lines (-vv: debug); an unexpected error shows its traceback"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geoprobe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", parser_class=_subparser(common))

    p = sub.add_parser("probe", help="measure a model's geometry and write a profile JSON")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    _add_measure_args(p)
    p.add_argument("--out", help="profile JSON path (default: profiles/<model>.json)")
    p.add_argument("--no-layers", dest="embeddings_only", action="store_true",
                   help="the same as --embeddings-only")

    r = sub.add_parser("report", help="write a self-contained HTML report")
    r.add_argument("models", nargs="*", help="models to probe (default: the embedded model)")
    _add_measure_args(r)
    r.add_argument("--profile", action="append", default=[], help="saved profile JSON (repeatable)")
    r.add_argument("--out", help="HTML path (default: reports/<model>.html)")
    r.add_argument("--save-profiles", metavar="DIR", help="also write each measured profile here")

    f = sub.add_parser("finetune", help="fine-tune adapters on a training set")
    _add_model_args(f)
    f.add_argument("--data", required=True, help="training data (GSM8K / LLM-Adapters JSON(L), MAWPS, GLUE TSV)")
    f.add_argument("--adapter", default="lora", choices=ADAPTER_CHOICES,
                   help="adapter method; auto = the plan from --plan or from a quick probe of the training prompts")
    f.add_argument("--plan", help="adapter plan JSON (or a profile JSON to plan from)")
    _add_head_arg(f)
    _add_train_args(f)
    f.add_argument("--out", help="output folder (default: runs/<model>-<adapter>)")
    f.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    f.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="train on N processes started by Accelerate's launcher: one per GPU, or N CPU processes "
                        "with --device cpu. The step is the same as in one process (--batch-size sequences per "
                        "micro-batch, shared among the processes); also runs under `accelerate launch` / torchrun")
    f.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                   help="with several processes: ddp (default) keeps the whole model on every GPU; fsdp shards "
                        "it over them, for models that do not fit one GPU")

    e = sub.add_parser("evaluate", help="accuracy of a model (with an adapter) on one or more test sets")
    _add_model_args(e)
    e.add_argument("--adapter", help="adapter folder written by `geoprobe finetune` (default: the base model)")
    e.add_argument("--data", required=True, action="append",
                   help="test data with gold answers; repeat for several sets, evaluated in one call")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of each set")
    _add_head_arg(e)
    e.add_argument("--max-length", type=int, default=256,
                   help="tokens per example for a classification head (as in training; default 256)")
    _add_eval_args(e, "--eval-batch-size", "--batch-size")
    e.add_argument("--out", help="evaluation JSON (default: beside the adapter, or evals/<model>-<data>.json)")

    u = sub.add_parser("run", help="probe, plan, build, fine-tune, evaluate and report in one command")
    _add_model_args(u)
    u.add_argument("--data", required=True, help="training data")
    u.add_argument("--eval", required=True, help="test data")
    u.add_argument("--adapter", default="auto", choices=ADAPTER_CHOICES)
    _add_train_args(u)
    u.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N test examples")
    _add_eval_args(u)
    u.add_argument("--out", help="output folder (default: runs/<model>-<adapter>)")
    u.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")

    c = sub.add_parser("compare", help="fair multi-seed comparison of adapter methods at an equal parameter budget",
                       description="Fine-tune every method with every seed at the parameter budget of a rank-r "
                                   "LoRA (±5 %), evaluate each on every --eval set, and write OUT/runs/*.json, "
                                   "OUT/summary.json and OUT/report.html. A rerun skips finished runs and resumes "
                                   "an interrupted one.")
    _add_model_args(c)
    c.add_argument("--data", action="append", default=[], metavar="TRAIN",
                   help="training data (required); repeat to train on the union of several sets, visited in "
                        "each seed's own fixed order")
    c.add_argument("--eval", action="append", default=[], metavar="TEST",
                   help="test data with gold answers (repeatable)")
    c.add_argument("--methods", default="none,lora,dora,gelora",
                   help="comma-separated methods: " + ", ".join(_compare_choices())
                        + " ('--methods list' describes each)")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 per method (default 3)")
    c.add_argument("--plan-seed", type=int, default=0, help="seed of the quick probe that plans auto and GeLoRA")
    _add_head_arg(c)
    _add_train_args(c, seed=False)
    c.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N examples of each set")
    _add_eval_args(c)
    c.add_argument("--out", help="output folder, required (rerun with the same folder to resume)")
    c.add_argument("--jobs", type=int, default=1,
                   help="run the methods in N processes side by side (default 1): a small model leaves a GPU "
                        "mostly idle, so N processes finish N runs in about the time of one; merged into --out")
    c.add_argument("--probe-after", action="store_true",
                   help="then probe every fine-tuned model beside the base model on the training prompts and "
                        "report how each adapter moved per-prompt δ_rel and the per-layer intrinsic dimension "
                        "(OUT/after.json; finished probes are kept)")

    n = sub.add_parser("native", help="build the adapter layers' C++ nodes now (otherwise built at first use)")
    n.add_argument("--cpu", action="store_true",
                   help="build the CPU variant even where CUDA is present (it serves GEOPROBE_NATIVE=all)")
    return parser


ADAPTER_CHOICES = (*registry.names(), registry.AUTO)  # every registered method, then the planner's choice


def _subparser(common: argparse.ArgumentParser) -> type:
    """The parser class of the subcommands: each takes ``-v`` too (``geoprobe probe … -v``)."""

    class Subparser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("parents", [common])
            super().__init__(*args, **kwargs)

    return Subparser


def _compare_choices() -> tuple[str, ...]:
    from .compare import choices

    return choices()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (.bin) weights — runs code from the file")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the hub — runs code from the model repository")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_dtype_arg(p, "default: float32, as adapters are trained and evaluated: the trainer keeps float32 "
                      "weights under bfloat16 autocast; bfloat16 with --quantize")
    p.add_argument("--quantize", default=None, metavar="4bit",
                   help="4bit: a QLoRA base, every linear layer but the heads in bitsandbytes NF4 (double "
                        "quantization, bfloat16 compute); every adapter method trains on it. Needs a CUDA GPU "
                        "and pip install bitsandbytes")


def _add_head_arg(p: argparse.ArgumentParser) -> None:
    from .workflows import HEADS

    p.add_argument("--head", default="auto", choices=HEADS,
                   help="auto (default): an encoder (BERT, MiniLM) on GLUE TSVs gets a sequence-classification "
                        "head trained beside the adapters; a causal LM generates its answers")


def _add_train_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--r", type=int, default=32, help="LoRA rank (GeLoRA: the rank whose budget is shared)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r for every method)")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names to adapt (default: q,k,v,up,down or BERT's)")
    p.add_argument("--n-heads", type=int, default=None, help="HydraLoRA heads (default: plan, else 4)")
    p.add_argument("--curvature", type=float, default=None, help="HypLoRA initial K (default: plan, else 1)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per (packed) sequence")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--balance", type=float, default=0.0,
                   help="weight of HydraLoRA's load-balancing loss (0 = off)")
    p.add_argument("--no-pack", action="store_true", help="one example per sequence (padded)")
    p.add_argument("--no-fast-kernels", action="store_true",
                   help="train without Liger-Kernel's fused kernels (used by default on CUDA when installed: "
                        "pip install 'geoprobe[fast]')")
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer blocks with torch.compile (tens of seconds at the first step; "
                        "fewer kernel launches per step, for small models whose steps are launch-bound)")
    p.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="torch.compile's mode for --compile (implies it): auto (the default: reduce-overhead on "
                        "CUDA), default, reduce-overhead (each block replayed as a CUDA graph) or "
                        "max-autotune-no-cudagraphs")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each transformer block's input for backward and run the block again there "
                        "(about one more forward pass per step; far less activation memory, for large models)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N examples (of each --data set)")


def _add_eval_args(p: argparse.ArgumentParser, *batch_flags: str) -> None:
    p.add_argument(*(batch_flags or ("--eval-batch-size",)), dest="eval_batch_size", type=int, default=None,
                   help="prompts generated (or examples classified) together (default: for generation, fitted "
                        "to the device — from the free GPU memory and the KV cache of one sequence — or 16 on "
                        "a CPU; 32 for a classification head)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per answer (default: 256 for math, 32 for labels)")


def _resolve_device(name: Optional[str]) -> str:
    """The device --device names, checked against this machine before anything is loaded or cached."""
    from .workflows import resolve_device

    return resolve_device(name)


def _load_corpus(args):
    from .corpus import Corpus
    if args.corpus:
        return Corpus.from_path(args.corpus, field=args.field)
    if args.field:
        raise GeoprobeError("--field needs --corpus")
    return Corpus.default()


def probe_settings(args):
    """The :class:`~geoprobe.pipeline.ProbeSettings` the probe flags ask for (checked here, before
    anything is loaded)."""
    from .pipeline import ProbeSettings

    return ProbeSettings(seed=args.seed, max_tokens=args.max_tokens, n_prompts=args.n_prompts,
                         layer_positions=args.layer_positions, layer_sets=args.layer_sets,
                         token_repeats=args.token_sets, null_repeats=args.null_repeats,
                         n_boot=args.bootstrap, id_boot=args.id_bootstrap, level=args.level,
                         correction=args.correction)


def _plan(spec: Optional[str], args, settings):
    """How ``spec`` will be opened, decided from its headers before anything is loaded, with the
    estimate printed (stderr); budgets that cannot be met are refused here."""
    from .models import plan_load
    from .models.footprint import parse_memory

    plan = plan_load(spec, device=_resolve_device(args.device), dtype=args.dtype,
                     stream=True if args.stream else None, embeddings_only=args.embeddings_only,
                     max_gpu_memory=parse_memory(args.max_gpu_memory, "--max-gpu-memory"),
                     max_memory=parse_memory(args.max_memory, "--max-memory"),
                     positions=settings.layer_positions, documents=settings.layer_sets,
                     max_length=settings.max_length, batch_size=settings.batch_size)
    for line in plan.lines():
        print(f"geoprobe: {line}", file=sys.stderr, flush=True)
    return plan


def _measure(plan, args, command: str, settings, corpus):
    """Open what ``plan`` says and probe it on ``corpus``."""
    from .models import load_planned
    from .pipeline import probe

    _quiet(args)
    lm = load_planned(plan, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    return probe(lm, corpus, settings=settings, progress=not args.quiet, device=plan.device,
                 command=command, layers=plan.mode != "embeddings")


def delta_summary(d) -> str:
    """One line: δ_rel with its interval, each null's difference, and the conservative verdict."""
    ci = f" [{d.ci_low:.4f}, {d.ci_high:.4f}]" if d.ci_low is not None else ""
    nulls = ", ".join(f"{c.null} {c.mean:.4f} ({c.verdict})" for c in d.nulls)
    return f"{d.mean:.4f}{ci} vs nulls {nulls} → {d.verdict} (most conservative)"


def summary_table(profile) -> str:
    """A short plain-text summary of a profile's headline numbers."""
    rows = [("model", profile.model.name),
            ("corpus", f"{profile.corpus.name} ({profile.corpus.n_tokens:,} tokens)")]
    f = profile.frequency
    if f is not None:
        rows.append(("power law γ", f"{f.gamma:.3f} ± {f.error:.3f} (xmin {f.xmin}, Zipf s {f.zipf_exponent:.2f})"))
    if profile.norms is not None:
        rows.append(("norm vs log-freq ρ", f"{profile.norms.spearman_rho:+.3f}"))
    for label, d in (("δ_rel per prompt", profile.delta_prompts), ("δ_rel tokens", profile.delta_tokens)):
        if d is not None:
            rows.append((label, delta_summary(d)))
    ids = [l.twonn.dimension for l in profile.layers if l.twonn is not None]
    if ids:
        rows.append(("TwoNN ID per layer", f"{min(ids):.1f} … {max(ids):.1f} over {len(ids)} layers"))
    if profile.sinks is not None and profile.sinks.n_excluded:
        rows.append(("sink positions left out", f"up to {profile.sinks.n_excluded} of {profile.sinks.n_positions} per layer"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def cmd_probe(args, command: str) -> int:
    """Every flag, the device, the output and the corpus are checked before the model loads."""
    settings = probe_settings(args)
    out = Path(args.out) if args.out else Path("profiles") / f"{_slug(args.model or 'SmolLM2-135M-Instruct')}.json"
    check_writable(out, what="--out")
    corpus = _load_corpus(args)
    plan = _plan(args.model, args, settings)
    profile = _measure(plan, args, command, settings, corpus)
    profile.save(out)
    print(summary_table(profile))
    print(f"profile written to {out}")
    return 0


def cmd_report(args, command: str) -> int:
    """Profiles, flags, the outputs (report and --save-profiles), the device and the corpus are
    checked before any model loads."""
    from .profile import GeometryProfile
    from .report import default_report_path, render_report

    settings = probe_settings(args)
    profiles = [GeometryProfile.load(p) for p in args.profile]
    specs = list(args.models) or ([None] if not profiles else [])
    out = Path(args.out) if args.out else None
    if out is not None:
        check_writable(out, what="--out")
    else:
        check_writable(Path("reports"), what="the report folder", folder=True)
    if args.save_profiles:
        check_writable(Path(args.save_profiles), what="--save-profiles", folder=True)
    plans = [_plan(spec, args, settings) for spec in specs]  # every refusal before the first load
    corpus = _load_corpus(args) if plans else None
    for plan in plans:
        prof = _measure(plan, args, command, settings, corpus)
        if args.save_profiles:
            prof.save(Path(args.save_profiles) / f"{_slug(prof.model.name)}.json")
        profiles.append(prof)
    path = out or default_report_path(profiles)
    render_report(profiles, path, command=command)
    for prof in profiles:
        print(summary_table(prof))
    print(f"report written to {path}")
    return 0


# --------------------------------------------------------------------------- adapter commands
def _quiet(args) -> None:
    if args.quiet:
        import transformers
        transformers.utils.logging.disable_progress_bar()


def _load_lm(args):
    from .models import load_model
    from .workflows import training_dtype

    _quiet(args)
    return load_model(args.model, device=_resolve_device(args.device), dtype=training_dtype(args.dtype, args.quantize),
                      allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                      quantize=args.quantize)


def _load_for_data(args, examples, what: str, device: Optional[str] = None):
    """The model loaded for ``examples`` as --head asks (a classification head for an encoder on GLUE
    data), the pairing checked before anything is trained; on ``device`` (default: --device), in
    float32 (the dtype adapters are trained in; bfloat16 with --quantize) unless --dtype says otherwise."""
    from . import workflows

    _quiet(args)
    return workflows.load_for_data(args.model, examples, head=args.head, what=what, device=device or args.device,
                                   dtype=workflows.training_dtype(args.dtype, args.quantize),
                                   allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                                   quantize=args.quantize)


def _check_quantize(args) -> None:
    """--quantize checked before any data or model is read: a known value, bitsandbytes, a CUDA device."""
    from . import workflows

    workflows.check_quantization(args.quantize, args.device)


def _check_limit(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise GeoprobeError(f"{flag} must be ≥ 1, got {value}")


def _check_seed(value: int, flag: str) -> None:
    if not 0 <= value < 2 ** 64:
        raise GeoprobeError(f"{flag} must be an integer from 0 to 2^64 − 1, got {value}")


def _shown(path: Optional[str]) -> Optional[str]:
    """A path as the records hold it (:func:`geoprobe.records.display_path`), None kept."""
    return display_path(path) if path is not None else None


def _train_settings(args):
    from adapters.train import TrainSettings

    return TrainSettings(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         max_steps=args.max_steps, max_length=args.max_length, warmup_ratio=args.warmup_ratio,
                         seed=getattr(args, "seed", 0), save_every=args.save_every, pack=not args.no_pack,
                         balance_coef=args.balance, fast_kernels=not args.no_fast_kernels,
                         compile=args.compile or args.compile_mode is not None,
                         compile_mode=args.compile_mode or "auto",
                         gradient_checkpointing=args.gradient_checkpointing)


def _build_kwargs(args, planned: bool) -> dict:
    """Options for adapters.build: a plan supplies r and alpha; --n-heads and --curvature override it."""
    from .workflows import build_options

    return build_options(planned=planned, dropout=args.dropout, target_modules=_targets(args), r=args.r,
                         alpha=args.alpha, n_heads=args.n_heads, curvature=args.curvature)


def _targets(args) -> Optional[list]:
    if not args.target_modules:
        return None
    names = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if not names:
        raise GeoprobeError("--target-modules is empty; give names such as q_proj,v_proj")
    return names


def _default_out(args) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{_slug(args.model or 'SmolLM2-135M-Instruct')}-{args.adapter.replace('+', '-')}"


def _print_run(run) -> None:
    r = run.result
    first = r.loss_values[0] if r.loss_values else float("nan")
    last = r.loss_values[-1] if r.loss_values else float("nan")
    print(f"  method      {r.method}  ({r.trainable_parameters:,} trainable parameters)")
    print(f"  steps       {len(r.loss_values)}  loss {first:.4f} → {last:.4f}")
    if r.tokens_per_second:
        print(f"  time        {r.seconds:.1f} s  ({r.tokens_per_second:,.0f} tokens/s)")
    print(f"adapter written to {run.adapter_dir}")
    print(f"results written to {run.results_path}")


def _check_training(args, out: Path) -> object:
    """The checks of a fine-tune (``finetune``, ``run``) before any model loads: the limits, the
    training and build options, the device, --out (an earlier run, a checkpoint that --resume cannot
    use, a folder that cannot be written). Returns the TrainSettings."""
    from adapters.build import check_options

    from . import workflows

    _check_limit(args.limit, "--limit")
    settings = _train_settings(args)
    check_options(args.adapter, r=args.r, alpha=args.alpha, dropout=args.dropout, n_heads=args.n_heads,
                  curvature=args.curvature)
    _targets(args)
    _resolve_device(args.device)
    _check_quantize(args)
    workflows.check_out(out, args.resume)
    check_writable(out, what="--out", folder=True)
    return settings


def cmd_finetune(args, command: str) -> int:
    """Fine-tune in this process; or, with --num-processes N > 1, check the flags and the data and
    start N processes through Accelerate's launcher, each running this command; or, as one of those
    processes (or under ``accelerate launch`` / torchrun), train its share of the run."""
    from adapters.data import load_examples

    from . import workflows

    launched = workflows.launched_processes()  # None: started alone, not by accelerate launch / torchrun
    if launched is not None and args.num_processes not in (None, launched):
        raise DeviceError(f"--num-processes {args.num_processes}, but this run was started with {launched} "
                          "processes; drop --num-processes under accelerate launch or torchrun")
    out = _default_out(args)
    settings = _check_training(args, out)
    if args.quantize and args.parallel == "fsdp" and (launched or args.num_processes or 1) > 1:
        raise DeviceError(f"--quantize {args.quantize} with --parallel fsdp: FSDP shards full-precision "
                          "parameters and cannot shard 4-bit weights; use --parallel ddp (each GPU holds the "
                          "4-bit model) or one process")
    if args.plan:
        workflows.check_plan_file(args.plan, args.adapter)
    data = display_path(args.data)
    examples = load_examples(args.data, limit=args.limit)
    if launched is None and args.num_processes is not None and args.num_processes != 1:
        from .models.spec import resolve_spec

        resolve_spec(args.model)  # a missing model folder: one message here, not one per process
        code = workflows.start_processes(shlex.split(command)[1:], args.num_processes, device=args.device,
                                         parallel=args.parallel)
        if code:
            raise GeoprobeError(f"the {args.num_processes} fine-tune processes stopped with exit code {code} "
                                "(their messages are above)")
        return 0
    group = workflows.join_processes(args.parallel, device=args.device) if launched is not None else None
    main_process = group is None or group.is_main
    lm = (_load_for_data(args, examples, "fine-tuning") if group is None  # checked before planning (a probe)
          else _load_for_data(args, examples, "fine-tuning", device=workflows.process_device(group)))
    planning = dict(method=args.adapter, plan=args.plan, resume=args.resume, r=args.r, alpha=args.alpha,
                    target_modules=_targets(args), seed=args.seed, data_name=data,
                    progress=not args.quiet and main_process, device=args.device, command=command)
    adapter = (workflows.resolve_adapter(lm, examples, out, **planning) if group is None
               else workflows.resolve_adapter_together(group, lm, examples, out, **planning))
    run = workflows.finetune_model(lm, examples, adapter, out=out, settings=settings, resume=args.resume,
                                   progress=not args.quiet and main_process, data_name=data,
                                   group=group, **_build_kwargs(args, planned=not isinstance(adapter, str)))
    if group is not None:
        group.close()
    if main_process:
        _print_run(run)
    return 0


def _print_eval(correct: int, n: int, accuracy: float, n_unreadable: int, data: str,
                metrics: Optional[dict] = None) -> None:
    extra = "".join(f", {k} {v:.4f}" for k, v in (metrics or {}).items() if k in ("f1", "mcc"))
    print(f"accuracy {accuracy:.4f} ({correct}/{n}){extra} on {data}"
          + (f"; {n_unreadable} answers unreadable" if n_unreadable else ""))


def _check_eval_batch_size(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise GeoprobeError(f"{flag} must be ≥ 1 (or left out to fit the batch to the device), got {value}")


def _evaluation_out(args) -> Path:
    """--out, or beside the adapter, or evals/<model>-<data stems>.json."""
    if args.out:
        return Path(args.out)
    stems = "-".join(_slug(Path(d).stem) for d in args.data)
    if args.adapter:
        return Path(args.adapter).parent / f"eval-{stems}.json"
    return Path("evals") / f"{_slug(args.model or 'SmolLM2-135M-Instruct')}-{stems}.json"


def _load_test_sets(paths: Sequence[str], limit: Optional[int], flag: str) -> list:
    """Each test set read and checked (labels, a known answer format) before the model is loaded."""
    from adapters.data import load_examples
    from adapters.evaluate import check_examples

    seen = set()
    sets = []
    for path in paths:
        if path in seen:
            raise GeoprobeError(f"{flag} {path} is given twice; give each test set once")
        seen.add(path)
        examples = load_examples(path, limit=limit)
        check_examples(examples, where=f"{flag} {path}")
        sets.append((display_path(path), examples))
    return sets


def _load_for_evaluation(args, sets: Sequence[tuple[str, Sequence]]):
    """The model loaded for all test sets together; GLUE sets of different label sets, which one
    classification head cannot serve, are named when an encoder refuses them."""
    from . import workflows
    from .errors import AdapterError

    try:
        return _load_for_data(args, [ex for _, examples in sets for ex in examples], "evaluation")
    except AdapterError:
        labels = {name: workflows.classification_labels(examples) for name, examples in sets}
        if len(sets) > 1 and None not in labels.values() and len(set(labels.values())) > 1:
            kinds = "; ".join(f"{name}: {', '.join(words)}" for name, words in labels.items())
            raise GeoprobeError(f"the --data sets have different label sets ({kinds}); an encoder's classification "
                                "head evaluates one task at a time: give each task's --data in its own "
                                "`geoprobe evaluate`") from None
        raise


def cmd_evaluate(args, command: str) -> int:
    from . import workflows
    from .records import write_json

    _check_limit(args.limit, "--limit")
    _check_eval_batch_size(args.eval_batch_size, "--eval-batch-size (--batch-size)")
    if args.max_length < 2:
        raise GeoprobeError(f"--max-length must be ≥ 2 tokens, got {args.max_length}")
    _check_limit(args.max_new_tokens, "--max-new-tokens")
    if args.adapter:
        workflows.check_adapter_folder(args.adapter)
    out = _evaluation_out(args)
    check_writable(out, what="--out" if args.out else "the evaluation JSON")
    _resolve_device(args.device)
    _check_quantize(args)
    sets = _load_test_sets(args.data, args.limit, "--data")
    lm = _load_for_evaluation(args, sets)
    if len(sets) == 1:
        res = workflows.evaluate_model(lm, sets[0][1], adapter=args.adapter, batch_size=args.eval_batch_size,
                                       max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                                       progress=not args.quiet)
        write_json(out, workflows.evaluation_record(res, model=lm.name, adapter=_shown(args.adapter),
                                                    data=sets[0][0]))
        _print_eval(sum(bool(p["correct"]) for p in res.predictions), res.n, res.accuracy, res.n_unparsed,
                    sets[0][0], res.metrics)
    else:
        res = workflows.evaluate_model_sets(lm, sets, adapter=args.adapter, batch_size=args.eval_batch_size,
                                            max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                                            progress=not args.quiet)
        write_json(out, workflows.evaluation_sets_record(res, model=lm.name, adapter=_shown(args.adapter)))
        for name, r in zip(res.names, res.results):
            _print_eval(sum(bool(p["correct"]) for p in r.predictions), r.n, r.accuracy, r.n_unparsed, name,
                        r.metrics)
        _print_eval(res.n_correct, res.n, res.accuracy, res.n_unparsed, f"all {len(sets)} sets")
    print(f"evaluation written to {out}")
    return 0


def cmd_run(args, command: str) -> int:
    from adapters.data import load_examples

    from . import workflows

    _check_limit(args.eval_limit, "--eval-limit")
    _check_eval_batch_size(args.eval_batch_size, "--eval-batch-size")
    _check_limit(args.max_new_tokens, "--max-new-tokens")
    out = _default_out(args)
    settings = _check_training(args, out)  # before the (slow) model load and probe
    examples = load_examples(args.data, limit=args.limit)
    tests = _load_test_sets([args.eval], args.eval_limit, "--eval")[0][1]
    lm = _load_lm(args)
    done = workflows.run(
        lm, examples, tests, out=out, method=args.adapter, settings=settings, resume=args.resume, r=args.r,
        alpha=args.alpha, target_modules=_targets(args), dropout=args.dropout, n_heads=args.n_heads,
        curvature=args.curvature, eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
        data_name=display_path(args.data), eval_name=display_path(args.eval), progress=not args.quiet,
        device=args.device, command=command,
        on_plan=lambda plan: print(f"plan: {plan.method} — {plan.reasons.get('method', 'as requested')}"),
        on_trained=_print_run)
    _print_eval(done.n_correct, done.n_eval, done.accuracy, done.n_unreadable, str(args.eval))
    print(f"report written to {done.report_path}")
    return 0


def _train_sets(paths: Sequence[str], limit: Optional[int]) -> tuple[list, dict[str, int], str]:
    """The ``--data`` sets (each cut to ``limit``) concatenated in the order given, their sizes by
    ``folder/file`` (not the whole path, which the comparison does not compare: it moves between
    machines) and the name the comparison records."""
    from adapters.data import load_examples

    if len(set(paths)) != len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise GeoprobeError(f"--data {twice} is given twice; give each training set once")
    examples, sizes = [], {}
    for path in paths:
        part = load_examples(path, limit=limit)
        examples.extend(part)
        key = f"{Path(path).parent.name}/{Path(path).name}"
        if key in sizes:
            raise GeoprobeError(f"--data {path}: another --data is also {key}; give the sets distinct folder/file names")
        sizes[key] = len(part)
    return examples, sizes, " + ".join(display_path(p) for p in paths)


def _eval_sets(paths: Sequence[str], limit: Optional[int]) -> list:
    """The ``--eval`` sets, each named by its task (or file stem), made unique with the folder name."""
    from adapters.data import load_examples

    from .compare import EvalSet

    sets, names = [], set()
    for path in paths:
        examples = load_examples(path, limit=limit)
        tasks = {ex.task for ex in examples}
        name = tasks.pop() if len(tasks) == 1 and examples[0].task else Path(path).stem
        if name in names:
            name = f"{Path(path).parent.name}/{Path(path).stem}"
        if name in names:
            raise GeoprobeError(f"--eval {path} is given twice")
        names.add(name)
        sets.append(EvalSet(name=name, path=display_path(path), examples=examples))
    return sets


def _print_methods() -> None:
    from .compare import arms

    listed = arms()
    width = max(len(a.name) for a in listed)
    for a in listed:
        print(f"  {a.name:<{width}}  {a.description}")


def cmd_compare(args, command: str) -> int:
    """Check every flag and data file, load the model for the data (an encoder on GLUE data gets a
    classification head), and run :func:`geoprobe.compare.compare`."""
    from adapters.build import check_options

    from .compare import check_eval_sets, compare, parse_methods
    from .errors import ComparisonError

    if args.methods.strip().lower() in ("list", "help"):
        _print_methods()
        return 0
    missing = [flag for flag, value in (("--data", args.data), ("--eval", args.eval), ("--out", args.out)) if not value]
    if missing:
        raise ComparisonError(f"geoprobe compare needs {', '.join(missing)}")
    arms = parse_methods(args.methods)
    if args.seeds < 1:
        raise ComparisonError(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        raise ComparisonError(f"--jobs must be at least 1, got {args.jobs}")
    _check_limit(args.limit, "--limit")
    _check_limit(args.eval_limit, "--eval-limit")
    _check_eval_batch_size(args.eval_batch_size, "--eval-batch-size")
    _check_limit(args.max_new_tokens, "--max-new-tokens")
    _check_seed(args.plan_seed, "--plan-seed")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ComparisonError(f"--out {args.out} is a file; give a folder")
    settings = _train_settings(args)
    check_options(registry.AUTO, r=args.r, alpha=args.alpha, dropout=args.dropout, n_heads=args.n_heads,
                  curvature=args.curvature)
    _targets(args)
    _resolve_device(args.device)
    _check_quantize(args)
    check_writable(Path(args.out), what="--out", folder=True)
    examples, sizes, data_name = _train_sets(args.data, args.limit)
    evals = _eval_sets(args.eval, args.eval_limit)
    check_eval_sets(evals)
    if args.jobs > 1:
        from .compare.parallel import run_jobs, unfinished

        counts = unfinished(Path(args.out), [a.name for a in arms], args.seeds)
        if sum(counts.values()):
            run_jobs(args.argv[args.argv.index("compare") + 1:], counts, args.jobs, Path(args.out),
                     echo=lambda line: print(line, flush=True))
    lm = _load_for_data(args, examples, "a comparison")
    done = compare(lm, examples, evals, out=args.out, arms=arms, seeds=args.seeds, train_settings=settings,
                   r=args.r, alpha=args.alpha, target_modules=_targets(args), dropout=args.dropout,
                   n_heads=args.n_heads, curvature=args.curvature, eval_batch_size=args.eval_batch_size,
                   max_new_tokens=args.max_new_tokens, plan_seed=args.plan_seed, data_name=data_name,
                   train_sets=sizes, head=args.head, probe_after=args.probe_after, progress=not args.quiet,
                   device=args.device, command=command,
                   echo=lambda line: print(line, flush=True))
    print(done.table)
    print(f"summary written to {done.summary_path}")
    print(f"report written to {done.report_path}")
    return 0


def cmd_native(args: argparse.Namespace, command: str) -> int:
    """Build (or find in the cache) the native adapter layers for CUDA, or for the CPU with --cpu or
    without CUDA, and print where they are used under the current GEOPROBE_NATIVE mode."""
    from . import workflows

    device = workflows.native_device(cpu=args.cpu)
    print(f"native adapter layers for {'CUDA' if device == 'cuda' else 'the CPU'}: building or loading from "
          "the cache (about a minute the first time) …", flush=True)
    built = workflows.build_native(device)
    used = {"auto": "CUDA tensors", "all": "CUDA and CPU tensors", "off": "nothing (GEOPROBE_NATIVE=0)"}
    print(f"ready in {built.seconds:.1f} s: {built.path}")
    print(f"used on {used[built.mode]} (GEOPROBE_NATIVE={built.mode})")
    return 0


def recorded_command(argv: Sequence[str]) -> str:
    """The command line as profiles and reports record it: ``geoprobe`` and the arguments, each path
    under the working directory made relative (:func:`geoprobe.records.display_path`), so outputs
    carry no machine's absolute paths."""
    shown = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--"):
            shown.append(f"{flag}={display_path(value)}" if value.startswith("/") else arg)
        else:
            shown.append(display_path(arg) if arg.startswith("/") else arg)
    return "geoprobe " + shlex.join(shown)


def _verbosity(argv: Sequence[str]) -> int:
    """How many ``-v`` the command line holds (read before parsing, so that an error in the parser's
    own setup is reported as asked)."""
    count = 0
    for arg in argv:
        if arg == "--":
            break
        if arg == "--verbose":
            count += 1
        elif re.fullmatch(r"-v+", arg):
            count += len(arg) - 1
    return count


NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
"""Library loggers whose warnings say nothing the user can act on. bitsandbytes, imported by PEFT
wherever it is installed, warns on every start on a CPU with AVX512-bf16 that its optional kernel from
the Hugging Face hub could not be loaded (the hub refuses it as untrusted code, and bitsandbytes then
uses its own kernel)."""


def quiet_library_notices(quiet: bool = True) -> None:
    """Raise :data:`NOISY_LOGGERS` to ERROR, or (``quiet`` False, under ``-v``) give them back the
    level of their parents."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)


def _run(argv: list[str]) -> int:
    runtime.check_switches()  # before the modules that read them are imported
    quiet_library_notices()  # before any import reaches bitsandbytes (PEFT imports it where it is installed)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="geoprobe: %(levelname)s: %(message)s")
    if args.verbose:
        quiet_library_notices(False)
    if args.version:
        from . import __version__
        print(f"geoprobe {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "finetune" and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        print(f"geoprobe: error: `geoprobe {args.command}` runs in one process; of the commands only "
              "`geoprobe finetune` runs on several (--num-processes, accelerate launch, torchrun)", file=sys.stderr)
        return 2
    handlers = {"probe": cmd_probe, "report": cmd_report, "finetune": cmd_finetune,
                "evaluate": cmd_evaluate, "run": cmd_run, "compare": cmd_compare, "native": cmd_native}
    with warnings.catch_warnings():
        if not args.verbose:  # libraries' notices about their own future versions are not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
        args.argv = argv  # the command line as typed (compare --jobs hands it to its worker processes)
        return handlers[args.command](args, recorded_command(argv))


def _interrupted() -> int:
    print("geoprobe: interrupted", file=sys.stderr)
    return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; the one error boundary of the application. A
    :class:`~geoprobe.errors.GeoprobeError` is printed as one line and exits 2; Ctrl-C exits 130 (and no
    output is renamed into place after it, even where a library caught the interrupt); running out of
    host or GPU memory is one line that says what to shrink and exits 3; anything unexpected is one line
    that says so, with its traceback under ``-v``, and exits 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with runtime.interrupt_guard():
        try:
            code = _run(argv)
            if runtime.interrupted():  # a library swallowed the KeyboardInterrupt
                raise KeyboardInterrupt
            return code
        except KeyboardInterrupt:
            return _interrupted()
        except GeoprobeError as exc:
            if runtime.interrupted():
                return _interrupted()
            print(f"geoprobe: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except MemoryError:
            print("geoprobe: error: out of memory; try smaller sizes (--max-tokens, --layer-positions, "
                  "--batch-size, --limit) or a smaller model", file=sys.stderr)
            return 3
        except Exception as exc:
            if runtime.interrupted():
                return _interrupted()
            if _is_device_out_of_memory(exc):
                return _device_out_of_memory(exc, argv)
            return _unexpected(exc, argv)


def _is_device_out_of_memory(exc: BaseException) -> bool:
    """torch's accelerator out-of-memory error (``torch.OutOfMemoryError``, a RuntimeError), told by its
    class so that the command line needs no torch import to tell it."""
    return any(cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch")
               for cls in type(exc).__mro__)


def _device_out_of_memory(exc: BaseException, argv: Sequence[str] = ()) -> int:
    """One line for the GPU running out of memory: what torch said (its first sentence and how much was
    asked), what to shrink, and for a training command without it ``--gradient-checkpointing``; exit 3 as
    for the host's memory. Finished runs and checkpoints stay, so the same command resumes."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    asked = first.split(" GPU ")[0].strip()[:200]
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit:  # not reached for a command that ran; no hint then
        args = None
    # the training commands carry the flag (_add_train_args); the hint where it was not given
    hint = (", add --gradient-checkpointing (each block keeps only its input for backward)"
            if getattr(args, "gradient_checkpointing", None) is False else "")
    print(f"geoprobe: error: the GPU ran out of memory ({asked or 'no details'}); try a smaller --batch-size "
          f"or --max-length{hint}, fewer --jobs side by side, or free the GPU from other processes; finished "
          f"runs and checkpoints are kept, so the same command resumes", file=sys.stderr)
    return 3


def _unexpected(exc: Exception, argv: Sequence[str]) -> int:
    """One line for an exception no check foresaw (its traceback first under ``-v``); exit 1."""
    verbose = _verbosity(argv)
    if verbose:
        traceback.print_exc()
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    hint = "" if verbose else "; rerun with -v to see the traceback"
    print(f"geoprobe: error: unexpected {type(exc).__name__}{': ' + first if first else ''} (a bug in geoprobe "
          f"or a library it uses{hint})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
