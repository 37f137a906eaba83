"""Bad inputs and faults, table by table: every case runs the real command line in-process (or the library
call), and each asserts the exit code, no traceback on stderr, one ``geoprobe: error:`` line that names
the problem, no file or temporary file left behind, and — where there was one — the previous result
(profile, report, checkpoint, evaluation) unchanged byte for byte.

Order: the cases that need no model first (a model load there fails the test: every option, path,
device and file is checked before it); then the API-level faults (full disk, permission, interrupted
writes); then the cases that load a model, which share one tiny model loaded once per module; last the
signals, in subprocesses. Full and read-only disks are small tmpfs mounts, skipped where the test
cannot mount one.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

import geoprobe.models
from finetune_helpers import write_model_folder, write_problems
from geoprobe.cli import main
from geoprobe.errors import (CorpusError, GeoprobeError, ModelLoadError, OutputError, PlanError, ProfileError,
                             UnsafeModelError)
from profile_factory import make_profile

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (relative path → SHA-256, "dir" for folders): equal
    snapshots mean nothing was added, removed or changed, temporary files included."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_line(err: str) -> str:
    """The single ``geoprobe: error:`` line of stderr, after checking that stderr holds no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("geoprobe: error:")]
    assert len(lines) == 1, err
    return lines[0]


def command(text: str, files: dict[str, Path]) -> list[str]:
    """The argument list of ``text`` with each ``{name}`` replaced by the shared file of that name."""
    return shlex.split(re.sub(r"\{([^{}]+)\}", lambda m: str(files[m.group(1)]), text))


def evil_pickle(path: Path, marker: Path) -> Path:
    """A pickle that runs a shell command when unpickled without restriction (it would create
    ``marker``)."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs shared by the cases, outside every case's own folder: a tiny model folder, training and
    test data, a good profile and plan, and the bad files each table needs."""
    root = tmp_path_factory.mktemp("inputs")
    f = {"root": root, "model": write_model_folder(root / "model"),
         "train": write_problems(root / "train.jsonl", 16), "test": write_problems(root / "test.jsonl", 3, seed=1)}
    profile = make_profile("tiny", n_layers=2, hidden=64, vocab=400)
    profile.save(root / "profile.json")
    f["profile"] = root / "profile.json"
    good = profile.to_dict()

    def bad_profile(name: str, edit: Callable[[dict], object], raw: Optional[str] = None) -> None:
        d = copy.deepcopy(good)
        edit(d)
        text = raw if raw is not None else json.dumps(d)
        (root / name).write_text(text, encoding="utf-8")
        f[name] = root / name

    text = json.dumps(good)
    bad_profile("nan.json", lambda d: None, raw=text.replace('"gamma": ', '"gamma": NaN, "was": ', 1))
    bad_profile("inf.json", lambda d: None, raw=text.replace('"gamma": ', '"gamma": 1e999, "was": ', 1))
    bad_profile("notjson.json", lambda d: None, raw=text[: len(text) // 2])
    bad_profile("schema.json", lambda d: d.update(schema="something.else"))
    bad_profile("newer.json", lambda d: d.update(schema_version=99))
    bad_profile("strlist.json", lambda d: d["frequency"].update(count_values="12"))
    bad_profile("boolint.json", lambda d: d["model"].update(n_layers=True))
    bad_profile("pairs.json", lambda d: d["frequency"].update(count_values=d["frequency"]["count_values"][:-1]))
    bad_profile("array.json", lambda d: None, raw="[1, 2, 3]")
    bad_profile("layers.json", lambda d: d["layers"].reverse())

    plan = {"schema": "geoprobe.adapter_plan", "method": "lora", "r": 4, "alpha": 8.0,
            "target_modules": ["q_proj", "v_proj"]}

    def bad_plan(name: str, **changes) -> None:
        (root / name).write_text(json.dumps({**plan, **changes}), encoding="utf-8")
        f[name] = root / name

    bad_plan("plan.json")
    bad_plan("plan-string.json", target_modules="q_proj,v_proj")
    bad_plan("plan-r0.json", r=0)
    bad_plan("plan-unknown.json", colour="blue")
    bad_plan("plan-ranks.json", method="gelora", layer_ranks=[4, -1])
    bad_plan("plan-hydra.json", method="hydralora", n_heads=2)
    bad_plan("plan-alien.json", target_modules=["c_attn"])
    (root / "plan-nan.json").write_text(json.dumps(plan).replace('"alpha": 8.0', '"alpha": NaN'))
    f["plan-nan.json"] = root / "plan-nan.json"

    # corpora and data files
    (root / "empty.txt").write_text(" \n\n \t\n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02\xff" * 64)
    (root / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (root / "plain.txt").write_text("one paragraph\n\nanother paragraph\n")
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("a text file\n")
    (root / "broken.jsonl").write_text('{"question": "fine"}\n{"question": \n')
    (root / "nofield.jsonl").write_text('{"prompt": "x", "reply": "y"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "nan.json").write_text('[{"question": "q", "answer": NaN}]')
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "long.tsv").write_text("sentence\tlabel\n" + "a" * 200_000 + "\t1\n")
    (root / "sets").mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        shutil.copy(f["train"], root / "sets" / name)
    for name in ("empty.txt", "binary.txt", "latin1.txt", "plain.txt", "texts", "broken.jsonl", "nofield.jsonl",
                 "empty.jsonl", "nan.json", "sets", "deep.json", "long.tsv"):
        f[name] = root / name

    # models and adapters
    f["pickled"] = _pickle_model(root / "pickled", f["model"])
    f["evil"] = _pickle_model(root / "evil", f["model"])
    evil_pickle(f["evil"] / "pytorch_model.bin", root / "PWNED")
    f["pwned"] = root / "PWNED"
    corrupt = root / "corrupt"
    shutil.copytree(f["model"], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    f["corrupt"] = corrupt
    remote = root / "remote"
    shutil.copytree(f["model"], remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    f["remote"] = remote
    (root / "noconfig").mkdir()
    shutil.copy(f["model"] / "model.safetensors", root / "noconfig")
    f["noconfig"] = root / "noconfig"
    (root / "fake.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 16)
    (root / "notgguf.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    (root / "readme.txt").write_text("not a model")
    for name in ("fake.gguf", "notgguf.gguf", "readme.txt"):
        f[name] = root / name
    for name, edit in (("adapter-corrupt", "weights"), ("adapter-pickle", "pickle"), ("adapter-method", "method")):
        f[name] = _bad_adapter(root / name, edit)
    return f


def _pickle_model(folder: Path, model: Path) -> Path:
    """The tiny model with its weights as a pickle (``pytorch_model.bin``) instead of safetensors."""
    from safetensors.torch import load_file

    shutil.copytree(model, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    return folder


def _bad_adapter(folder: Path, edit: str) -> Path:
    """An adapter folder with one broken file: truncated weights, pickle weights only, or a sidecar
    naming an unknown method."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    if edit == "weights":
        (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00")
    elif edit == "pickle":
        torch.save({"w": torch.zeros(2)}, folder / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
        (folder / "geoprobe_adapter.json").write_text(json.dumps(
            {"schema": "geoprobe.adapter", "schema_version": 2, "method": "qlora"}))
    return folder


# --------------------------------------------------------------------------- the table without a model
@dataclass(frozen=True)
class Case:
    """One bad command line: ``argv`` (formatted with the shared ``files``; run in the case's own
    empty folder), the pattern its one error line must match, and what ``setup`` puts in that folder
    first (it must be left exactly as it was)."""

    id: str
    argv: str
    message: str
    setup: Callable[[Path, dict], None] = lambda root, f: None
    env: dict = field(default_factory=dict)
    code: int = 2


def _mkdir(*names: str) -> Callable[[Path, dict], None]:
    return lambda root, f: [(root / n).mkdir(parents=True) for n in names]


def _touch(*names: str, text: str = "previous\n") -> Callable[[Path, dict], None]:
    def setup(root: Path, f: dict) -> None:
        for n in names:
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            (root / n).write_text(text)
    return setup


def _earlier_run(root: Path, f: dict) -> None:
    """A finished-looking fine-tune folder: results and an adapter."""
    (root / "run" / "adapter").mkdir(parents=True)
    (root / "run" / "results.json").write_text('{"method": "lora"}\n')


def _broken_checkpoint(root: Path, f: dict) -> None:
    """A checkpoint whose every file is broken: state JSON cut short, states and adapter garbage."""
    step = root / "run" / "checkpoints" / "step-2"
    (step / "adapter").mkdir(parents=True)
    (step / "trainer_state.json").write_text('{"step": 2, "loss_values": [')
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        (step / name).write_bytes(b"not a torch file")
    (step / "adapter" / "adapter_config.json").write_text("{")
    (step / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00")


def _bad_state(root: Path, f: dict) -> None:
    """A checkpoint whose state JSON is valid but lacks fields (the other files are missing too)."""
    step = root / "run" / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 1, "loss_values": ["x"]}))


def _bad_run_plan(root: Path, f: dict) -> None:
    (root / "run").mkdir()
    (root / "run" / "plan.json").write_text(json.dumps({"method": "gelora", "r": 4, "target_modules": "q_proj"}))


M, T, D = "{model}", "{train}", "{test}"
FT = f"finetune {M} --data {T} --quiet"
EV = f"evaluate {M} --data {D} --quiet"
RUN = f"run {M} --data {T} --eval {D} --quiet"
CMP = f"compare {M} --data {T} --eval {D} --quiet --out cmp"
NO_MODEL_CASES = [
    # options
    Case("probe-seed-negative", "probe --seed -1", r"--seed must be an integer from 0"),
    Case("report-seed-negative", "report --seed -1", r"--seed must be an integer from 0"),
    Case("finetune-seed-65-bits", f"{FT} --seed {2 ** 64}", r"--seed 18446744073709551616: it must be an integer"),
    Case("probe-n-prompts-0", f"probe {M} --n-prompts 0", r"--n-prompts = 0: it must be at least 2"),
    Case("probe-level", f"probe {M} --level 1.5", r"--level must be a confidence level"),
    Case("probe-bootstrap", f"probe {M} --bootstrap 1", r"--bootstrap = 1"),
    Case("probe-token-sets", f"probe {M} --token-sets 0", r"--token-sets = 0"),
    Case("probe-max-tokens", f"probe {M} --max-tokens 0", r"--max-tokens = 0"),
    Case("finetune-batch-size", f"{FT} --batch-size 0", r"--batch-size 0: it must be an integer ≥ 1"),
    Case("finetune-lr", f"{FT} --lr 0", r"--lr 0\.0: it must be a positive number"),
    Case("finetune-epochs-inf", f"{FT} --epochs inf", r"--epochs inf: it must be a positive number"),
    Case("finetune-warmup", f"{FT} --warmup-ratio 1", r"--warmup-ratio 1\.0"),
    Case("finetune-max-length", f"{FT} --max-length 1", r"--max-length 1: it must be an integer ≥ 2"),
    Case("finetune-dropout", f"{FT} --dropout 1.5", r"--dropout \(dropout\) = 1\.5 is outside \[0, 1\)"),
    Case("finetune-rank", f"{FT} --r 0", r"--r \(rank r\) must be an integer ≥ 1"),
    Case("finetune-alpha-nan", f"{FT} --alpha nan", r"--alpha \(alpha\) = nan is outside"),
    Case("finetune-heads-on-lora", f"{FT} --adapter lora --n-heads 3", r"--n-heads \(n_heads\) applies to hydralora"),
    Case("finetune-curvature-on-dora", f"{FT} --adapter dora --curvature 2", r"--curvature \(curvature\) applies to hyplora"),
    Case("finetune-targets-empty", f"{FT} --target-modules ,", r"--target-modules is empty"),
    Case("finetune-limit", f"{FT} --limit 0", r"--limit must be ≥ 1, got 0"),
    Case("evaluate-new-tokens", f"{EV} --max-new-tokens 0", r"--max-new-tokens must be ≥ 1"),
    Case("evaluate-batch", f"{EV} --batch-size 0", r"--eval-batch-size \(--batch-size\) must be ≥ 1"),
    Case("evaluate-max-length", f"{EV} --max-length 0", r"--max-length must be ≥ 2 tokens, got 0"),
    Case("run-eval-limit", f"{RUN} --eval-limit 0 --out r", r"--eval-limit must be ≥ 1"),
    Case("compare-seeds", f"{CMP} --seeds 0", r"--seeds must be at least 1"),
    Case("compare-plan-seed", f"{CMP} --plan-seed -2", r"--plan-seed must be an integer from 0"),
    Case("compare-unknown-method", f"{CMP} --methods lora,qlora", r"qlora"),
    Case("compare-needs-out", f"compare {M} --data {T}", r"needs --eval, --out"),
    # devices
    Case("device-name", f"probe {M} --device warp9", r"--device warp9: not a device name"),
    Case("device-cuda-index", f"{FT} --device cuda:97", r"--device cuda:97: (CUDA is not available|this machine has)"),
    Case("device-meta", f"{EV} --device meta", r"--device meta: meta is not available"),
    # environment switches
    Case("env-native", f"probe {M}", r"GEOPROBE_NATIVE='sometimes' is not understood: use one of",
         env={"GEOPROBE_NATIVE": "sometimes"}),
    Case("env-private-apis", f"probe {M}", r"GEOPROBE_PRIVATE_APIS='maybe' is not understood: use 1 or 0",
         env={"GEOPROBE_PRIVATE_APIS": "maybe"}),
    Case("env-delta-triton", "report --profile {profile}", r"GEOPROBE_DELTA_TRITON='2'",
         env={"GEOPROBE_DELTA_TRITON": "2"}),
    # corpora
    Case("corpus-missing", f"probe {M} --corpus nowhere.txt", r"corpus path nowhere\.txt does not exist"),
    Case("corpus-device", f"probe {M} --corpus /dev/zero", r"/dev/zero is not a regular file"),
    Case("corpus-binary", f"probe {M} --corpus {{binary.txt}}", r"looks binary \(NUL byte at offset 0\)"),
    Case("corpus-latin1", f"probe {M} --corpus {{latin1.txt}}", r"is not UTF-8 text"),
    Case("corpus-blank", f"probe {M} --corpus {{empty.txt}}", r"is empty \(no non-blank document\)"),
    Case("corpus-field-on-text", f"probe {M} --corpus {{plain.txt}} --field question",
         r"--field question selects a field of \.jsonl/\.json records, but .*plain\.txt is plain text"),
    Case("corpus-field-on-text-folder", f"probe {M} --corpus {{texts}} --field question",
         r"--field question .* holds only plain-text files"),
    Case("corpus-field-without-corpus", f"probe {M} --field question", r"--field needs --corpus"),
    Case("corpus-broken-jsonl", f"probe {M} --corpus {{broken.jsonl}}", r"invalid JSON on line 2"),
    Case("corpus-too-deep", f"probe {M} --corpus {{deep.json}}", r"unusable JSON \(arrays or objects nested too deeply\)"),
    Case("corpus-missing-field", f"probe {M} --corpus {{nofield.jsonl}} --field question",
         r"has no field 'question' .*fields there: prompt, reply"),
    # data files
    Case("data-missing", f"finetune {M} --data nowhere.jsonl", r"data file nowhere\.jsonl does not exist"),
    Case("data-device", f"finetune {M} --data /dev/null", r"/dev/null is not a regular file"),
    Case("data-fields", f"finetune {M} --data {{nofield.jsonl}}", r"fields"),
    Case("data-empty", f"finetune {M} --data {{empty.jsonl}}", r"empty"),
    Case("data-nan", f"finetune {M} --data {{nan.json}}", r"not usable JSON \(NaN is not a number JSON allows"),
    Case("data-folder-of-sets", f"finetune {M} --data {{sets}}", r"is a folder holding test\.jsonl, train\.jsonl"),
    Case("data-tsv-field-limit", f"finetune {M} --data {{long.tsv}}", r"is not a readable (TSV|tab-separated) file \(field larger"),
    Case("data-twice", f"evaluate {M} --data {D} --data {D}", r"is given twice"),
    # profiles given to report
    Case("profile-missing", "report --profile nowhere.json", r"profile nowhere\.json does not exist"),
    Case("profile-nan", "report --profile {nan.json}", r"not usable JSON \(NaN is not a number JSON allows"),
    Case("profile-overflow", "report --profile {inf.json}", r"not usable JSON \(the number 1e999 is too large"),
    Case("profile-truncated", "report --profile {notjson.json}", r"is not valid JSON"),
    Case("profile-schema", "report --profile {schema.json}", r"is not a geoprobe profile"),
    Case("profile-newer", "report --profile {newer.json}", r"schema version 99"),
    Case("profile-string-for-list", "report --profile {strlist.json}",
         r"count_values: expected a list, got a string"),
    Case("profile-bool-for-int", "report --profile {boolint.json}", r"n_layers: expected an integer, got True"),
    Case("profile-unpaired-counts", "report --profile {pairs.json}", r"count_values has \d+ entries but"),
    Case("profile-too-deep", "report --profile {deep.json}", r"is not usable JSON \(the JSON is nested too deeply\)"),
    Case("profile-array", "report --profile {array.json}", r"does not hold a JSON object"),
    Case("profile-layer-order", "report --profile {layers.json}", r"layers must be numbered 0, 1, 2"),
    # plans
    Case("plan-missing", f"{FT} --adapter auto --plan nowhere.json", r"--plan nowhere\.json does not exist"),
    Case("plan-targets-string", f"{FT} --adapter auto --plan {{plan-string.json}}",
         r"target_modules must be a non-empty list of module names .*got \"q_proj,v_proj\""),
    Case("plan-rank-0", f"{FT} --adapter auto --plan {{plan-r0.json}}", r"r must be an integer ≥ 1, got 0"),
    Case("plan-alpha-nan", f"{FT} --adapter auto --plan {{plan-nan.json}}", r"NaN is not a number JSON allows"),
    Case("plan-unknown-field", f"{FT} --adapter auto --plan {{plan-unknown.json}}", r"unknown fields \['colour'\]"),
    Case("plan-negative-rank", f"{FT} --adapter auto --plan {{plan-ranks.json}}", r"layer_ranks must be"),
    Case("plan-other-method", f"{FT} --adapter gelora --plan {{plan-hydra.json}}",
         r"plans hydralora, not --adapter gelora"),
    Case("plan-profile-broken", f"{FT} --adapter auto --plan {{nan.json}}", r"NaN is not a number"),
    # adapters
    Case("adapter-not-a-folder", f"{EV} --adapter {{root}}", r"is not an adapter folder"),
    Case("adapter-corrupt", f"{EV} --adapter {{adapter-corrupt}}", r"adapter_model\.safetensors is corrupt or truncated"),
    Case("adapter-pickle", f"{EV} --adapter {{adapter-pickle}}", r"holds pickle weights \(adapter_model\.bin\)"),
    Case("adapter-unknown-method", f"{EV} --adapter {{adapter-method}}", r"names an unknown method 'qlora'"),
    # outputs
    Case("probe-out-folder", f"probe {M} --out prof", r"cannot write --out prof: it is a folder", _mkdir("prof")),
    Case("probe-out-under-file", f"probe {M} --out f/p.json", r"f is a file, not a folder", _touch("f")),
    Case("evaluate-out-folder", f"{EV} --out e", r"cannot write --out e: it is a folder", _mkdir("e")),
    Case("report-out-folder", "report --profile {profile} --out r", r"--out r: it is a folder", _mkdir("r")),
    Case("report-save-profiles-file", f"report {M} --save-profiles keep", r"--save-profiles keep: it is a file",
         _touch("keep")),
    Case("finetune-out-file", f"{FT} --out o", r"--out o is a file; give a folder", _touch("o")),
    Case("finetune-earlier-run", f"{FT} --out run", r"already holds a fine-tune run .*pass --resume", _earlier_run),
    Case("finetune-resume-broken", f"{FT} --out run --resume",
         r"--resume: checkpoint run/checkpoints/step-2 cannot be resumed: trainer_state\.json is not valid JSON.*"
         r"optimizer\.pt cannot be read.*scheduler\.pt cannot be read.*rng\.pt cannot be read.*"
         r"adapter config.*Delete run/checkpoints/step-2", _broken_checkpoint),
    Case("finetune-resume-state-fields", f"{FT} --out run --resume",
         r"trainer_state\.json lacks micro_step, total_steps.*optimizer\.pt is missing", _bad_state),
    Case("finetune-resume-bad-plan", f"{FT} --adapter gelora --out run --resume",
         r"plan run/plan\.json: target_modules must be a non-empty list", _bad_run_plan),
    Case("run-out-file", f"{RUN} --out o", r"--out o is a file", _touch("o")),
    Case("compare-out-file", f"compare {M} --data {T} --eval {D} --out c", r"--out c is a file", _touch("c")),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the case: its problem must be found before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")
    monkeypatch.setattr(geoprobe.models, "load_model", refuse)


@pytest.mark.parametrize("case", NO_MODEL_CASES, ids=lambda c: c.id)
def test_refused_before_any_model_loads(case, files, tmp_path, monkeypatch, capsys, no_model_load):
    if case.id == "device-cuda-index" and torch.cuda.device_count() > 97:
        pytest.skip("this machine has 98 GPUs")
    case.setup(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    before = snapshot(tmp_path)
    rc = main(command(case.argv, files))
    line = error_line(capsys.readouterr().err)
    assert rc == case.code
    assert re.search(case.message, line), line
    assert snapshot(tmp_path) == before  # nothing written, nothing removed, nothing changed


def test_the_table_is_wide_enough():
    """At least 60 distinct bad inputs and faults in all (this table plus the API, model and signal
    tables below)."""
    total = len(NO_MODEL_CASES) + len(API_CASES) + len(MODEL_CASES) + 3 + 2 + 2
    assert total >= 60 and len({c.id for c in NO_MODEL_CASES}) == len(NO_MODEL_CASES)


def test_argument_errors_are_argparse_usage(capsys):
    """A value that is not a number, or an unknown command, is argparse's usage error (exit 2)."""
    for argv in (["probe", "--seed", "abc"], ["frobnicate"], ["finetune", "--adapter", "qlora", "--data", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "invalid" in err


@pytest.mark.parametrize("raised,code,message", [
    (RuntimeError("boom in a library\nsecond line"), 1,
     r"^geoprobe: error: unexpected RuntimeError: boom in a library \(a bug in geoprobe or a library it uses; "
     r"rerun with -v to see the traceback\)$"),
    (MemoryError(), 3, r"^geoprobe: error: out of memory; try smaller sizes \(--max-tokens"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
                            "79.18 GiB of which 20.25 MiB is free.\nmore"), 3,
     r"^geoprobe: error: the GPU ran out of memory \(CUDA out of memory\. Tried to allocate 20\.00 MiB\.\); "
     r"try a smaller --batch-size or --max-length, fewer --jobs side by side"),
    (OutputError("cannot write x: the disk is full"), 2, r"^geoprobe: error: cannot write x: the disk is full$"),
])
def test_the_error_boundary(raised, code, message, files, tmp_path, monkeypatch, capsys):
    """Whatever escapes a command: a GeoprobeError exits 2, an unexpected exception 1 with the hint to
    rerun with -v (which then shows the traceback), running out of memory 3; one line each."""
    import geoprobe.cli as cli

    def fail(args, command):
        raise raised
    monkeypatch.setattr(cli, "cmd_report", fail)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--profile", str(files["profile"])]) == code
    assert re.search(message, error_line(capsys.readouterr().err))
    if code == 1:
        assert main(["report", "--profile", str(files["profile"]), "-v"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "rerun with -v" not in err
    assert snapshot(tmp_path) == {}


def test_gpu_out_of_memory_while_training_names_gradient_checkpointing(monkeypatch, capsys):
    """A training command that runs out of GPU memory names --gradient-checkpointing, unless it was given;
    exit 3, one line."""
    import geoprobe.cli as cli

    def fail(args, command=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                     "capacity of 23.5 GiB")
    monkeypatch.setattr(cli, "cmd_finetune", fail)
    base = ["finetune", "--data", "train.jsonl"]
    assert main(base) == 3
    line = error_line(capsys.readouterr().err)
    assert re.search(r"^geoprobe: error: the GPU ran out of memory \(CUDA out of memory\. Tried to allocate "
                     r"2\.00 GiB\.\); try a smaller --batch-size or --max-length, add --gradient-checkpointing "
                     r"\(each block keeps only its input for backward\)", line), line
    assert main([*base, "--gradient-checkpointing"]) == 3
    assert "--gradient-checkpointing" not in error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- the library calls
def _disk_full_on_replace(monkeypatch):
    import geoprobe.records as records

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(records.os, "replace", full)


def _no_permission(monkeypatch):
    import geoprobe.records as records

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(records.tempfile, "mkstemp", denied)
    monkeypatch.setattr(records.tempfile, "mkdtemp", denied)


def api_profile_disk_full(tmp_path, monkeypatch):
    _disk_full_on_replace(monkeypatch)
    make_profile("tiny", n_layers=2, hidden=64, vocab=400).save(tmp_path / "p.json")


def api_report_no_permission(tmp_path, monkeypatch):
    from geoprobe.report import render_report

    _no_permission(monkeypatch)
    render_report([make_profile("tiny", n_layers=2, hidden=64, vocab=400)], tmp_path / "new" / "r.html")


def api_json_parent_is_file(tmp_path, monkeypatch):
    from geoprobe.records import write_json

    write_json(tmp_path / "blocker" / "deeper" / "x.json", {"a": 1})


def api_folder_write_fails(tmp_path, monkeypatch):
    from geoprobe.records import atomic_folder

    class SafetensorError(Exception):
        pass

    with atomic_folder(tmp_path / "made" / "adapter") as tmp:
        (tmp / "half.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def api_first_checkpoint_fails(tmp_path, monkeypatch):
    """The first checkpoint cannot be written: no checkpoints/ folder (empty or not) is left."""
    from adapters.train import checkpoints

    def full(model, folder, **kwargs):
        Path(folder).mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints, "write_adapter", full)
    checkpoints.write_checkpoint(tmp_path / "run" / "checkpoints", 1, None, {}, {}, {}, {}, keep=2)


def api_read_only(tmp_path, monkeypatch):
    from geoprobe.records import write_text

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    import geoprobe.records as records
    monkeypatch.setattr(records.tempfile, "mkstemp", read_only)
    write_text(tmp_path / "r.html", "<html>")


def api_profile_nan(tmp_path, monkeypatch):
    from geoprobe.profile import GeometryProfile

    d = make_profile("tiny", n_layers=2, hidden=64, vocab=400).to_dict()
    d["norms"]["spearman_rho"] = float("nan")
    GeometryProfile.from_json_dict(d, "profile p.json")


def api_plan_string_targets(tmp_path, monkeypatch):
    from adapters.plan import AdapterPlan

    AdapterPlan.from_dict({"method": "lora", "target_modules": "q_proj"})


def api_corpus_device(tmp_path, monkeypatch):
    from geoprobe.corpus import Corpus

    Corpus.from_path("/dev/zero")


def api_bad_device_keeps_cache(tmp_path, monkeypatch):
    """A bad device on the default model is refused before the GGUF cache is read or written."""
    monkeypatch.setenv("GEOPROBE_CACHE", str(tmp_path / "cache"))
    geoprobe.models.load_model(None, device="cuda:99" if not torch.cuda.is_available() else "warp9")


def api_corrupt_gguf_not_remembered(tmp_path, monkeypatch):
    """A GGUF that fails to load leaves no entry in the hash cache."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("GEOPROBE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + bytes(2048))
    try:
        geoprobe.models.load_model(str(tmp_path / "bad.gguf"))
    finally:
        index = tmp_path / "cache" / "models" / "hashes.json"
        assert not index.exists() or str((tmp_path / "bad.gguf").resolve()) not in json.loads(index.read_text())
        (tmp_path / "bad.gguf").unlink()


def api_evil_pickle_state(tmp_path, monkeypatch):
    from geoprobe.models.safety import load_pickle

    evil_pickle(tmp_path / "optimizer.pt", tmp_path / "PWNED")
    try:
        load_pickle(tmp_path / "optimizer.pt", "checkpoint")
    finally:
        assert not (tmp_path / "PWNED").exists()
        (tmp_path / "optimizer.pt").unlink()


API_SETUP = {api_profile_disk_full: lambda root: (root / "p.json").write_text("previous profile"),
             api_json_parent_is_file: lambda root: (root / "blocker").write_text("a file")}
"""What a case finds in its folder first (and must leave as it was)."""

API_CASES = [
    (api_profile_disk_full, OutputError, r"cannot write .*p\.json: the disk is full; free some space"),
    (api_report_no_permission, OutputError, r"r\.html: permission denied; choose a folder you can write to"),
    (api_json_parent_is_file, OutputError, r"blocker is a file, not a folder"),
    (api_folder_write_fails, OutputError, r"adapter: the disk is full"),
    (api_first_checkpoint_fails, OutputError, r"cannot write the checkpoint .*step-1: the disk is full"),
    (api_read_only, OutputError, r"r\.html: the file system is read-only"),
    (api_profile_nan, ProfileError, r"spearman_rho: expected a finite number, got nan"),
    (api_plan_string_targets, PlanError, r"target_modules must be a non-empty list of module names"),
    (api_corpus_device, CorpusError, r"/dev/zero is not a regular file"),
    (api_bad_device_keeps_cache, ModelLoadError, r"--device"),
    (api_corrupt_gguf_not_remembered, ModelLoadError, r"bad\.gguf"),
    (api_evil_pickle_state, UnsafeModelError, r"optimizer\.pt could not be loaded safely .*refuses to execute"),
]


@pytest.mark.parametrize("call,error,message", API_CASES, ids=[c[0].__name__ for c in API_CASES])
def test_library_faults(call, error, message, tmp_path, monkeypatch):
    API_SETUP.get(call, lambda root: None)(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=message) as info:
        call(tmp_path, monkeypatch)
    assert isinstance(info.value, GeoprobeError)
    assert "weights_only" not in str(info.value)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # no temporary file or folder, no empty folder, old file intact


# --------------------------------------------------------------------------- full and read-only disks
@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, size, setup=None, read_only=False)``: a tmpfs of ``size`` at ``tmp_path/name``
    (``setup`` fills it before it is made read-only); skipped where the test cannot mount one."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(name: str, size: str, setup: Optional[Callable[[Path], None]] = None, read_only: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        if setup is not None:
            setup(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> None:
    """Write until the file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_read_only_outputs_refused_before_the_model(tmpfs, files, tmp_path, monkeypatch, capsys, no_model_load):
    ro = tmpfs("ro", "64k", setup=lambda p: (p / "kept.json").write_text("previous"), read_only=True)
    monkeypatch.chdir(tmp_path)
    before = snapshot(ro)
    for argv in (["probe", str(files["model"]), "--out", "ro/p.json"],
                 ["finetune", str(files["model"]), "--data", str(files["train"]), "--out", "ro/run"],
                 ["evaluate", str(files["model"]), "--data", str(files["test"]), "--out", "ro/kept.json"],
                 ["report", str(files["model"]), "--save-profiles", "ro/profiles"]):
        assert main(argv) == 2
        line = error_line(capsys.readouterr().err)
        assert "the file system is read-only; choose a writable location" in line and " ro/" in line
    assert snapshot(ro) == before


# --------------------------------------------------------------------------- with the model, loaded once
@pytest.fixture(scope="module")
def tiny_lm(files):
    from geoprobe.models import load_model

    return load_model(str(files["model"]), device="cpu")


@pytest.fixture
def shared_model(tiny_lm, files, monkeypatch):
    """Loads of the tiny model's folder get a copy of the module's one loaded model; other specs load
    as usual."""
    real = geoprobe.models.load_model

    def load(spec=None, **kwargs):
        if spec is not None and Path(spec) == files["model"]:
            return copy.deepcopy(tiny_lm)
        return real(spec, **kwargs)
    monkeypatch.setattr(geoprobe.models, "load_model", load)


MODEL_CASES = [
    Case("model-missing", "probe ./nowhere/model --out p.json", r"no such file or folder: \./nowhere/model"),
    Case("model-no-config", "probe {noconfig} --out p.json", r"not a model folder: it has no config\.json"),
    Case("model-not-a-model", "probe {readme.txt} --out p.json", r"is a file but not a model"),
    Case("model-corrupt-safetensors", "probe {corrupt} --out p.json", r"not a readable safetensors file"),
    Case("model-pickle-refused", "probe {pickled} --out p.json",
         r"has only pickle weights \(pytorch_model\.bin\); unpickling can run arbitrary code"),
    Case("model-evil-pickle-allowed", "probe {evil} --allow-pickle --out p.json",
         r"pytorch_model\.bin could not be loaded safely .*refuses to execute code from a pickle file"),
    Case("model-remote-code", "probe {remote} --out p.json", r"ships its own model code .*--trust-remote-code"),
    Case("model-fake-gguf", "probe {fake.gguf} --out p.json", r"cannot read GGUF file .*fake\.gguf|fake\.gguf is not a readable GGUF file"),
    Case("model-not-gguf", "probe {notgguf.gguf} --out p.json", r"is not a GGUF file"),
    Case("model-hub-offline", "probe no-such-org/no-such-model-xyz --out p.json", r"no-such-org/no-such-model-xyz",
         env={"HF_HUB_OFFLINE": "1"}),
    Case("plan-rejected-by-model", f"{FT} --adapter auto --plan {{plan-alien.json}} --max-steps 1 --out run",
         r"c_attn"),
    Case("plan-rejected-keeps-run", f"{FT} --adapter auto --plan {{plan-alien.json}} --max-steps 1 --out run "
         "--resume", r"c_attn", _mkdir("run/checkpoints")),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.id)
def test_refused_at_or_after_the_load(case, files, tmp_path, monkeypatch, capsys, shared_model):
    case.setup(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEOPROBE_CACHE", str(files["root"] / "cache"))
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    before = snapshot(tmp_path)
    rc = main(command(case.argv, files))
    err = capsys.readouterr().err
    line = error_line(err)
    assert rc == case.code and re.search(case.message, line), line
    assert "weights_only" not in err
    assert not files["pwned"].exists()  # the malicious pickle never ran
    assert snapshot(tmp_path) == before  # a rejected plan is not kept in --out, no empty folder is left


def test_full_disk_during_finetune(tmpfs, files, tmp_path, monkeypatch, capsys, shared_model):
    """A disk that fills at the second checkpoint: one line, the first checkpoint whole, no partial
    second one; a disk full at the first: no checkpoints/ folder at all."""
    from adapters.train.checkpoints import checkpoint_problems

    monkeypatch.chdir(tmp_path)
    args = ["finetune", str(files["model"]), "--data", str(files["train"]), "--adapter", "lora", "--r", "4",
            "--max-steps", "3", "--save-every", "1", "--batch-size", "2", "--max-length", "160", "--quiet"]
    disk = tmpfs("disk", "200k")
    assert main(args + ["--out", "disk/run"]) == 2
    line = error_line(capsys.readouterr().err)
    assert re.search(r"cannot write (the checkpoint disk/run/checkpoints/step-\d|disk/run/results\.json): "
                     r"the disk is full", line), line
    steps = sorted(p.name for p in (disk / "run" / "checkpoints").iterdir())
    assert steps and all(re.fullmatch(r"step-\d", s) for s in steps)  # no temporary folder
    assert all(checkpoint_problems(disk / "run" / "checkpoints" / s) == [] for s in steps)
    assert not (disk / "run" / "adapter").exists()

    tiny = tmpfs("tiny", "16k")
    assert main(args + ["--out", "tiny/run"]) == 2
    assert "the disk is full" in error_line(capsys.readouterr().err)
    assert snapshot(tiny) == {}  # neither run/ nor an empty checkpoints/ is left


def test_full_disk_after_evaluation_keeps_the_previous_result(tmpfs, files, tmp_path, monkeypatch, capsys,
                                                             shared_model):
    disk = tmpfs("disk", "16k", setup=lambda p: ((p / "eval.json").write_text('{"accuracy": 0.5}\n'), _fill(p)))
    monkeypatch.chdir(tmp_path)
    before = snapshot(disk)
    assert main(["evaluate", str(files["model"]), "--data", str(files["test"]), "--max-new-tokens", "2", "--quiet",
                 "--out", "disk/eval.json"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "cannot write disk/eval.json: the disk is full; free some space" in line
    assert snapshot(disk) == before


def test_recorded_paths_are_relative(files, tmp_path, monkeypatch, capsys, shared_model):
    """A command typed with absolute paths under the working directory is recorded with relative ones."""
    from geoprobe.cli import recorded_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copy(files["train"], tmp_path / "data" / "train.jsonl")
    command = recorded_command(["probe", str(tmp_path / "model"), f"--out={tmp_path / 'p.json'}",
                                "--corpus", str(tmp_path / "data" / "train.jsonl"), "--corpus", "/elsewhere/x"])
    assert command == "geoprobe probe model --out=p.json --corpus data/train.jsonl --corpus /elsewhere/x"
    assert str(tmp_path) not in command
    assert main(["finetune", str(files["model"]), "--data", str(tmp_path / "data" / "train.jsonl"), "--r", "4",
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "160", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["data"] == "data/train.jsonl"


# --------------------------------------------------------------------------- signals
INTERRUPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path[:0] = {paths!r}
    {patch}
    from geoprobe.cli import main
    sys.exit(main(sys.argv[1:]))
""")

INTERRUPT_RENDER = """
import geoprobe.report.html as html
real = html.render_html
def render(*args, **kwargs):
    text = real(*args, **kwargs)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except KeyboardInterrupt:
        pass  # a library that swallows the interrupt
    return text
html.render_html = render
"""

INTERRUPT_STEP = """
from adapters.train.trainer import Trainer
real = Trainer.step
def step(self):
    real(self)
    if self.step_count == 2:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
Trainer.step = step
"""


def _interrupted(patch: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = INTERRUPT.format(paths=[str(ROOT), str(ROOT / "tests")], patch=patch)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_ctrl_c_while_rendering_is_never_swallowed(files, tmp_path):
    """Ctrl-C during rendering, caught by the code it interrupted: exit 130, one line, and the report
    already there is left as it was."""
    (tmp_path / "r.html").write_text("<p>previous report</p>")
    before = snapshot(tmp_path)
    done = _interrupted(INTERRUPT_RENDER, ["report", "--profile", str(files["profile"]), "--out", "r.html"], tmp_path)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1] == "geoprobe: interrupted"
    assert done.stderr.count("geoprobe: interrupted") == 1
    assert snapshot(tmp_path) == before


def test_ctrl_c_during_finetune_keeps_the_checkpoints(files, tmp_path):
    """Ctrl-C after step 2: exit 130, the checkpoints of steps 1 and 2 whole, no adapter, no temporary
    folder."""
    from adapters.train.checkpoints import checkpoint_problems

    done = _interrupted(INTERRUPT_STEP, ["finetune", str(files["model"]), "--data", str(files["train"]), "--r", "4",
                                         "--max-steps", "4", "--save-every", "1", "--batch-size", "2",
                                         "--max-length", "160", "--quiet", "--out", "run"], tmp_path)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("geoprobe: interrupted") == 1
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["step-1", "step-2"]
    assert all(checkpoint_problems(tmp_path / "run" / "checkpoints" / s) == [] for s in steps)
    assert not (tmp_path / "run" / "adapter").exists()
