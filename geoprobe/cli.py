"""The ``geoprobe`` command: a thin layer over the library.

Commands: ``probe`` (measure, write a profile JSON), ``report`` (HTML report from models or saved
profiles). Every :class:`~geoprobe.errors.GeoprobeError` is printed as one line and exits non-zero.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import GeoprobeError


def _slug(name: str) -> str:
    import re
    base = os.path.basename(str(name).rstrip("/\\")) or str(name)
    base = re.sub(r"\.gguf$", "", base, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"


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
    p.add_argument("--layer-positions", type=int, default=3000,
                   help="hidden-state positions per layer for intrinsic dimension and δ")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geoprobe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("probe", help="measure a model's geometry and write a profile JSON")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    _add_measure_args(p)
    p.add_argument("--out", help="profile JSON path (default: profiles/<model>.json)")
    p.add_argument("--no-layers", action="store_true", help="skip hidden-state probes")

    r = sub.add_parser("report", help="write a self-contained HTML report")
    r.add_argument("models", nargs="*", help="models to probe (default: the embedded model)")
    _add_measure_args(r)
    r.add_argument("--profile", action="append", default=[], help="saved profile JSON (repeatable)")
    r.add_argument("--out", help="HTML path (default: reports/<model>.html)")
    r.add_argument("--save-profiles", metavar="DIR", help="also write each measured profile here")
    return parser


def _resolve_device(name: Optional[str]) -> str:
    if name:
        return name
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _load_corpus(args):
    from .corpus import Corpus
    if args.corpus:
        return Corpus.from_path(args.corpus, field=args.field)
    if args.field:
        raise GeoprobeError("--field needs --corpus")
    return Corpus.default()


def _measure(spec: Optional[str], args, command: str):
    from .models import load_model
    from .pipeline import ProbeSettings, probe

    device = _resolve_device(args.device)
    corpus = _load_corpus(args)
    lm = load_model(spec, device=device, allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code)
    if args.n_prompts < 1 or args.layer_positions < 4:
        raise GeoprobeError("--n-prompts must be ≥ 1 and --layer-positions ≥ 4")
    settings = ProbeSettings(seed=args.seed, max_tokens=args.max_tokens, n_prompts=args.n_prompts,
                             layer_positions=args.layer_positions,
                             layer_delta_points=min(500, args.layer_positions))
    return probe(lm, corpus, settings=settings, progress=not args.quiet, device=device,
                 command=command, layers=not getattr(args, "no_layers", False))


def summary_table(profile) -> str:
    """A short plain-text summary of a profile's headline numbers."""
    rows = [("model", profile.model.name),
            ("corpus", f"{profile.corpus.name} ({profile.corpus.n_tokens:,} tokens)")]
    f = profile.frequency
    if f is not None:
        rows.append(("power law γ", f"{f.gamma:.3f} ± {f.gamma_err:.3f} (xmin {f.xmin}, Zipf s {f.zipf_exponent:.2f})"))
    if profile.norms is not None:
        rows.append(("norm vs log-freq ρ", f"{profile.norms.spearman_rho:+.3f}"))
    for label, d in (("δ_rel per prompt", profile.delta_prompts), ("δ_rel tokens", profile.delta_tokens)):
        if d is not None:
            rows.append((label, f"{d.mean:.4f} ± {d.std:.4f}  (null {d.null_mean:.4f} ± {d.null_std:.4f}, {d.side_of_null})"))
    ids = [l.twonn.dimension for l in profile.layers if l.twonn is not None]
    if ids:
        rows.append(("TwoNN ID per layer", f"{min(ids):.1f} … {max(ids):.1f} over {len(ids)} layers"))
    if profile.sinks is not None and profile.sinks.n_excluded:
        rows.append(("sink positions left out", f"up to {profile.sinks.n_excluded} of {profile.sinks.n_positions} per layer"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def cmd_probe(args, command: str) -> int:
    out = Path(args.out) if args.out else Path("profiles") / f"{_slug(args.model or 'SmolLM2-135M-Instruct')}.json"
    if out.exists() and out.is_dir():
        raise GeoprobeError(f"--out {out} is a folder; give a file name")
    profile = _measure(args.model, args, command)
    profile.save(out)
    print(summary_table(profile))
    print(f"profile written to {out}")
    return 0


def cmd_report(args, command: str) -> int:
    from .profile import GeometryProfile
    from .report import default_report_path, render_report

    profiles = [GeometryProfile.load(p) for p in args.profile]
    specs = list(args.models) or ([None] if not profiles else [])
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_writable(out)
    for spec in specs:
        prof = _measure(spec, args, command)
        if args.save_profiles:
            prof.save(Path(args.save_profiles) / f"{_slug(prof.model.name)}.json")
        profiles.append(prof)
    path = out or default_report_path(profiles)
    render_report(profiles, path, command=command)
    for prof in profiles:
        print(summary_table(prof))
    print(f"report written to {path}")
    return 0


def _check_writable(path: Path) -> None:
    """Fail before the (long) measurement when the report could not be written."""
    parent = path.parent if str(path.parent) else Path(".")
    probe_dir = parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if path.is_dir():
        raise GeoprobeError(f"--out {path} is a folder; give a file name")
    if not os.access(probe_dir, os.W_OK):
        raise GeoprobeError(f"cannot write {path}: {probe_dir} is not writable")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="geoprobe: %(levelname)s: %(message)s")
    if args.version:
        from . import __version__
        print(f"geoprobe {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    command = "geoprobe " + shlex.join(argv)
    handlers = {"probe": cmd_probe, "report": cmd_report}
    try:
        return handlers[args.command](args, command)
    except GeoprobeError as exc:
        print(f"geoprobe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("geoprobe: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("geoprobe: error: out of memory; try a smaller --max-tokens or a smaller model",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
