"""adapters.train on a tiny random Llama (CPU): exact resumption after an interruption, the packed
loss against unpacked forward passes, gradient accumulation against one large batch, checkpoint
rotation and atomicity, the results record; the answer-position loss against the full-logits formula,
the first step's loss against per-example forward passes, deferred loss reads; and the finetune /
evaluate / run commands end to end on a tiny model folder, with bad input giving one line and a
non-zero exit. One CUDA test (marked gpu) compares the GPU loop with the CPU one."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from adapters.data import collate, load_examples, pack, tokenize_for_training
import adapters.train.loss as loss_module
from adapters.train import (ADAPTER, CHECKPOINTS, RESULTS, TrainSettings, batch_loss, finetune,
                            list_checkpoints, lr_factor)
from geoprobe import workflows
from geoprobe.cli import main
from geoprobe.errors import AdapterError, DataFormatError
from geoprobe.profile import FinetuneResult, GeometryProfile

from finetune_helpers import write_model_folder, write_problems
from profile_factory import make_profile
from tiny_models import bpe_tokenizer, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = write_problems(tmp_path_factory.mktemp("data") / "train.jsonl", 24)
    return load_examples(path)


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _Interrupt(Exception):
    pass


def _stop_at(n: int):
    def on_step(step: int, loss: float) -> None:
        if step == n:
            raise _Interrupt
    return on_step


# --------------------------------------------------------------------------- resumption
@pytest.mark.parametrize("method,extra,accum", [
    ("lora", {}, 1),
    ("hyplora", {}, 2),
    ("hydralora", {"n_heads": 3}, 1),
    ("hyplora+gelora", {"layer_ranks": [2, 5]}, 1),
])
def test_resume_equals_uninterrupted_run(method, extra, accum, examples, tmp_path):
    tok = bpe_tokenizer()
    settings = TrainSettings(lr=5e-3, max_steps=6, batch_size=2, grad_accum=accum, max_length=160, save_every=1,
                             seed=3, balance_coef=0.01 if "hydra" in method else 0.0)
    straight = finetune(tiny_llama(), tok, examples, method, out=tmp_path / "a", settings=settings,
                        progress=False, r=4, **extra)
    victim = tiny_llama()
    with pytest.raises(_Interrupt):
        finetune(victim, tok, examples, method, out=tmp_path / "b", settings=settings, progress=False,
                 on_step=_stop_at(3), r=4, **extra)
    # the interrupted run hands the model back without adapters, weights and outputs as before
    assert not any(isinstance(m, BaseTunerLayer) for m in victim.modules()) and not victim.training
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert torch.equal(victim(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2, 3]
    resumed = finetune(tiny_llama(), tok, examples, method, out=tmp_path / "b", settings=settings,
                       progress=False, resume=True, r=4, **extra)
    assert resumed.resumed_from == 3
    a, b = _adapter_tensors(straight.model), _adapter_tensors(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.result.loss_values == straight.result.loss_values
    assert resumed.result.loss_steps == list(range(1, 7))
    # the training actually moved the adapter and the loss is finite
    fresh = _adapter_tensors(finetune(tiny_llama(), tok, examples, method, out=tmp_path / "c",
                                      settings=TrainSettings(lr=5e-3, max_steps=1, batch_size=2, max_length=160,
                                                             seed=3, balance_coef=settings.balance_coef),
                                      progress=False, r=4, **extra).model)
    assert any(not torch.equal(fresh[k], a[k]) for k in a)
    # only the newest two checkpoints remain, no temporary folders
    for run in ("a", "b"):
        root = tmp_path / run / CHECKPOINTS
        assert sorted(p.name for p in root.iterdir()) == ["step-5", "step-6"]


def test_resume_refuses_other_settings_and_existing_runs(examples, tmp_path):
    tok = bpe_tokenizer()
    s = TrainSettings(lr=5e-3, max_steps=4, batch_size=2, max_length=160, save_every=2)
    with pytest.raises(_Interrupt):
        finetune(tiny_llama(), tok, examples, "lora", out=tmp_path, settings=s, progress=False,
                 on_step=_stop_at(2), r=4)
    with pytest.raises(AdapterError, match="--resume"):
        finetune(tiny_llama(), tok, examples, "lora", out=tmp_path, settings=s, progress=False, r=4)
    other = TrainSettings(lr=1e-3, max_steps=4, batch_size=2, max_length=160, save_every=2)
    with pytest.raises(AdapterError, match="lr"):
        finetune(tiny_llama(), tok, examples, "lora", out=tmp_path, settings=other, progress=False,
                 resume=True, r=4)
    with pytest.raises(AdapterError, match="embedding_sha256"):  # another base model
        finetune(tiny_llama(seed=9), tok, examples, "lora", out=tmp_path, settings=s, progress=False,
                 resume=True, r=4)
    with pytest.raises(AdapterError, match="n_examples|data_sha256"):  # other data
        finetune(tiny_llama(), tok, examples[:-1], "lora", out=tmp_path, settings=s, progress=False,
                 resume=True, r=4)
    done = finetune(tiny_llama(), tok, examples, "lora", out=tmp_path, settings=s, progress=False,
                    resume=True, r=4)
    assert done.resumed_from == 2 and len(done.result.loss_values) == 4


def test_corrupt_checkpoint_state_names_the_file(examples, tmp_path):
    tok = bpe_tokenizer()
    s = TrainSettings(lr=5e-3, max_steps=4, batch_size=2, max_length=160, save_every=2)
    with pytest.raises(_Interrupt):
        finetune(tiny_llama(), tok, examples, "lora", out=tmp_path, settings=s, progress=False,
                 on_step=_stop_at(2), r=4)
    state = tmp_path / CHECKPOINTS / "step-2" / "trainer_state.json"
    state.write_text('{"step": 2, "run": ', encoding="utf-8")
    model = tiny_llama()
    with pytest.raises(AdapterError, match="trainer_state.json.*not valid JSON"):
        finetune(model, tok, examples, "lora", out=tmp_path, settings=s, progress=False, resume=True, r=4)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_failed_checkpoint_write_leaves_no_partial_folder(examples, tmp_path, monkeypatch):
    tok = bpe_tokenizer()
    s = TrainSettings(lr=5e-3, max_steps=4, batch_size=2, max_length=160, save_every=1)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # the second checkpoint (3 torch.save calls each), after some files exist
            raise OSError("disk full")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        finetune(tiny_llama(), tok, examples, "hyplora", out=tmp_path / "run", settings=s, progress=False, r=4)
    monkeypatch.undo()
    root = tmp_path / "run" / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]
    assert not (tmp_path / "run" / ADAPTER).exists()
    resumed = finetune(tiny_llama(), tok, examples, "hyplora", out=tmp_path / "run", settings=s,
                       progress=False, resume=True, r=4)
    straight = finetune(tiny_llama(), tok, examples, "hyplora", out=tmp_path / "ref", settings=s,
                        progress=False, r=4)
    a, b = _adapter_tensors(straight.model), _adapter_tensors(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the objective
def test_packed_loss_equals_unpacked_forward_passes(examples):
    tok = bpe_tokenizer()
    model = tiny_llama().double()
    rows = tokenize_for_training(examples[:7], tok, max_length=400)
    packed = pack(rows, 400)
    assert len(packed) < len(rows)  # several examples share a sequence
    total, n = 0.0, 0
    for seq in packed:
        b = collate([seq], tok.eos_token_id)
        assert "attention_mask" not in b
        with torch.no_grad():
            part, k = batch_loss(model, b)
        total += float(part)
        n += k
    # oracle: every example alone, plain forward, loss on its answer tokens (first label excluded,
    # as pack() masks the first token of every example)
    ref, m = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != -100
        ref += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        m += int(keep.sum())
    assert n == m
    assert total == pytest.approx(ref, rel=1e-10)


def _old_batch_loss(model, batch):
    """The loss as first written: full logits, then the answer rows gathered by a boolean mask."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    target = labels[:, 1:]
    mask = target != -100
    sel = logits[:, :-1][mask]
    if sel.dtype in (torch.float16, torch.bfloat16):
        sel = sel.float()
    return torch.nn.functional.cross_entropy(sel, target[mask], reduction="sum"), int(mask.sum())


def _random_rows(seed: int, n: int = 7, vocab: int = 300) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 50, (1,), generator=g))
        ids = torch.randint(2, vocab, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("head_hook", [True, False])
def test_answer_position_loss_equals_the_full_logits_formula(layout, head_hook):
    """Logits computed at the answer positions only (or, without the output-layer hook, gathered by
    index) give the loss, the token count and the gradients of the full-logits formula."""
    model = tiny_llama().double()
    for p in model.parameters():
        p.requires_grad_(True)
    rows = _random_rows(5 if layout == "padded" else 6)
    batch = collate(rows, 1) if layout == "padded" else collate(pack(rows, 64), 1)
    assert ("position_ids" in batch) == (layout == "packed")
    if not head_hook:
        model.get_output_embeddings = lambda: None  # the fallback: full logits, rows gathered
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape)))

    ref, n_ref = _old_batch_loss(model, batch)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got, n = batch_loss(model, batch)
    grads = torch.autograd.grad(got, list(model.parameters()))
    handle.remove()

    assert n == n_ref == int((batch["labels"][:, 1:] != -100).sum()) > 0
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    width = batch["input_ids"].shape
    # the output layer saw the full sequence for the reference, and only the n answer rows with the hook
    assert seen[0] == (*width, model.config.vocab_size)
    assert seen[1] == ((n, model.config.vocab_size) if head_hook else (*width, model.config.vocab_size))


def test_answer_position_loss_in_half_precision_and_without_answers():
    model = tiny_llama().to(torch.bfloat16)
    batch = collate(_random_rows(7), 1)
    with torch.no_grad():
        got, n = batch_loss(model, batch)
        ref, n_ref = _old_batch_loss(model, batch)
    assert got.dtype == torch.float32 and n == n_ref
    assert float(got) == pytest.approx(float(ref), rel=1e-3)
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    zero, k = batch_loss(model.float(), empty)
    assert k == 0 and float(zero) == 0.0


@pytest.mark.parametrize("packed", [False, True])
def test_first_step_loss_is_the_mean_answer_nll_of_the_base_model(packed, examples, tmp_path):
    """Step 1 (three accumulated micro-batches covering every example once, adapter output zero at
    initialisation) records the base model's mean negative log-likelihood over all answer tokens,
    computed here one example at a time with a plain forward pass."""
    tok = bpe_tokenizer()
    max_length = 400
    rows = tokenize_for_training(examples, tok, max_length=max_length)
    n_seq = len(pack(rows, max_length)) if packed else len(rows)
    batch_size = math.ceil(n_seq / 3)
    assert math.ceil(n_seq / batch_size) == 3  # one epoch = the three micro-batches of step 1
    seen = []
    model = tiny_llama()
    model.lm_head.register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape)))
    run = finetune(model, tok, examples, "lora", out=tmp_path, progress=False, r=4,
                   settings=TrainSettings(lr=1e-3, max_steps=1, batch_size=batch_size, grad_accum=3,
                                          max_length=max_length, pack=packed, log_every=5))
    base = tiny_llama()
    total, count = 0.0, 0
    for row in rows:
        labels = torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
        keep = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    assert run.result.loss_steps == [1]
    assert run.result.loss_values[0] == pytest.approx(total / count, rel=2e-6)
    # the training forward passes fed the output layer the answer positions only
    assert len(seen) == 3 and sum(shape[0] for shape in seen) == count
    assert run.result.settings["optimizer"] == "AdamW foreach"


def test_deferred_loss_reads_change_nothing(examples, tmp_path):
    tok = bpe_tokenizer()
    runs = {}
    for every in (1, 4):
        s = TrainSettings(lr=5e-3, max_steps=6, batch_size=2, grad_accum=2, max_length=160, save_every=5,
                          log_every=every, seed=2)
        runs[every] = finetune(tiny_llama(), tok, examples, "hyplora", out=tmp_path / str(every), settings=s,
                               progress=False, r=4)
    a, b = _adapter_tensors(runs[1].model), _adapter_tensors(runs[4].model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[1].result.loss_values == runs[4].result.loss_values
    assert runs[4].result.loss_steps == list(range(1, 7))
    saved = json.loads((tmp_path / "4" / CHECKPOINTS / "step-5" / "trainer_state.json").read_text())
    assert saved["loss_values"] == runs[1].result.loss_values[:5]
    # a checkpoint written under another log_every resumes (log_every is not part of the run's identity)
    resumed = finetune(tiny_llama(), tok, examples, "hyplora", out=tmp_path / "4", resume=True, progress=False,
                       r=4, settings=TrainSettings(lr=5e-3, max_steps=6, batch_size=2, grad_accum=2,
                                                   max_length=160, save_every=5, log_every=3, seed=2))
    assert resumed.resumed_from == 6 and resumed.result.loss_values == runs[1].result.loss_values


def test_non_finite_loss_read_late_names_its_step_and_writes_no_checkpoint(examples, tmp_path, monkeypatch):
    real = loss_module.answer_loss_sum
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(loss_module, "answer_loss_sum", poisoned)
    model = tiny_llama()
    with pytest.raises(AdapterError, match="nan at step 2"):
        finetune(model, bpe_tokenizer(), examples, "lora", out=tmp_path, progress=False, r=4,
                 settings=TrainSettings(lr=5e-3, max_steps=6, batch_size=2, max_length=160, save_every=3,
                                        log_every=10))
    assert calls["n"] == 3  # read at the step-3 checkpoint, not at step 2
    assert list_checkpoints(tmp_path) == []
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loop_matches_the_cpu_loop(examples, tmp_path):
    """On CUDA (bf16 autocast, fused AdamW, pinned non-blocking copies, deferred loss reads) the
    losses follow the float32 CPU run; the output layer sees the answer positions only."""
    tok = bpe_tokenizer()
    s = TrainSettings(lr=5e-3, max_steps=5, batch_size=2, grad_accum=2, max_length=400, log_every=3, save_every=5)
    cpu = finetune(tiny_llama(), tok, examples, "lora", out=tmp_path / "cpu", settings=s, progress=False, r=4,
                   dropout=0.0)
    model = tiny_llama().cuda()
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dim()))
    gpu = finetune(model, tok, examples, "lora", out=tmp_path / "gpu", settings=s, progress=False, r=4, dropout=0.0)
    assert gpu.result.settings["optimizer"] == "AdamW fused"
    assert gpu.result.loss_steps == list(range(1, 6)) and set(seen) == {2}
    assert gpu.result.loss_values == pytest.approx(cpu.result.loss_values, rel=2e-2)


def test_backward_runs_outside_autocast(examples, tmp_path, monkeypatch):
    """The trainer's forward runs under its autocast and its backward outside it, as torch.amp
    prescribes: a custom node's backward (the fused HypLoRA nodes compute in the adapter's float32)
    must not see its products cast. The CPU loop has no autocast, so this run gets a bfloat16 one; a
    hook on every adapter gradient records whether autocast was on when the gradient was formed."""
    from adapters.train.trainer import Trainer

    original = Trainer._setup_step

    def with_cpu_autocast(self):
        original(self)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(Trainer, "_setup_step", with_cpu_autocast)
    model, seen, forward_seen = tiny_llama(), [], []

    def hooks():
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(lambda g: seen.append(torch.is_autocast_enabled("cpu")))
        model.get_input_embeddings().register_forward_hook(
            lambda *_: forward_seen.append(torch.is_autocast_enabled("cpu")))

    s = TrainSettings(lr=5e-3, max_steps=2, batch_size=2, grad_accum=2, max_length=160, seed=0)
    finetune(model, bpe_tokenizer(), examples, "hyplora", out=tmp_path / "run", settings=s, progress=False,
             r=4, on_ready=hooks)
    assert forward_seen and all(forward_seen)  # the forward did run under autocast
    assert seen and not any(seen)


def test_grad_accumulation_equals_one_large_batch(examples, tmp_path):
    tok = bpe_tokenizer()
    kw = dict(lr=1e-2, max_steps=3, max_length=160, warmup_ratio=0.0, save_every=10)
    big = finetune(tiny_llama(), tok, examples, "lora", out=tmp_path / "big", progress=False, r=4, dropout=0.0,
                   settings=TrainSettings(batch_size=4, grad_accum=1, **kw))
    acc = finetune(tiny_llama(), tok, examples, "lora", out=tmp_path / "acc", progress=False, r=4, dropout=0.0,
                   settings=TrainSettings(batch_size=2, grad_accum=2, **kw))
    a, b = _adapter_tensors(big.model), _adapter_tensors(acc.model)
    assert all(torch.allclose(a[k], b[k], atol=2e-5, rtol=0) for k in a)  # lr 1e-2, 3 Adam steps
    assert acc.result.loss_values == pytest.approx(big.result.loss_values, rel=1e-6)


def test_lr_schedule_shape():
    total, warm = 10, 3
    f = [lr_factor(i, total, warm) for i in range(total)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[3:] == pytest.approx([(total - i) / (total - warm) for i in range(3, total)])
    assert min(f) > 0 and max(f) == 1.0 and f[-1] == pytest.approx(1 / 7)
    assert [lr_factor(i, 4, 0) for i in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_loss_falls_and_only_adapters_train(examples, tmp_path):
    tok = bpe_tokenizer()
    base = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    run = finetune(base, tok, examples, "lora", out=tmp_path, progress=False, r=8,
                   settings=TrainSettings(lr=2e-2, max_steps=25, batch_size=4, max_length=160, save_every=25))
    losses = run.result.loss_values
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    for name, p in run.model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, frozen[key]), name
    record = FinetuneResult.from_dict(json.loads((tmp_path / RESULTS).read_text()))
    assert record.loss_steps == list(range(1, 26)) and record.loss_values == pytest.approx(losses)
    assert record.trainable_parameters == sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert record.settings["lr"] == 2e-2 and record.settings["n_examples"] == len(examples)
    assert record.tokens_per_second and record.tokens_per_second > 0
    assert (tmp_path / ADAPTER / "geoprobe_adapter.json").is_file()


def test_too_long_answers_are_dropped_as_tokenize_for_training_would(tmp_path):
    tok = bpe_tokenizer()
    from adapters.data import Example
    exs = [Example(prompt="Q" * (5 * i), answer="word " * (2 + 3 * i), label="1", task="math") for i in range(12)]
    max_length = 40
    # oracle: the data module's own rule, one example at a time
    kept = []
    for ex in exs:
        try:
            kept.extend(tokenize_for_training([ex], tok, max_length=max_length))
        except DataFormatError:
            pass
    assert 0 < len(kept) < len(exs)
    run = finetune(tiny_llama(), tok, exs, "lora", out=tmp_path, progress=False, r=4,
                   settings=TrainSettings(max_steps=1, max_length=max_length, pack=False))
    assert run.result.settings["n_dropped_too_long"] == len(exs) - len(kept)
    assert run.result.settings["n_sequences"] == len(kept)


def test_bad_settings_and_models(examples, tmp_path):
    with pytest.raises(AdapterError, match="lr"):
        TrainSettings(lr=0)
    with pytest.raises(AdapterError, match="batch_size"):
        TrainSettings(batch_size=0)
    from tiny_models import tiny_bert
    with pytest.raises(AdapterError, match="causal"):
        finetune(tiny_bert(), bpe_tokenizer(), examples, "lora", out=tmp_path, progress=False)
    with pytest.raises(AdapterError, match="HydraLoRA only"):
        finetune(tiny_llama(), bpe_tokenizer(), examples, "lora", out=tmp_path, progress=False,
                 settings=TrainSettings(balance_coef=0.1))
    with pytest.raises(DataFormatError, match="max_length"):
        finetune(tiny_llama(), bpe_tokenizer(), examples, "lora", out=tmp_path / "x", progress=False,
                 settings=TrainSettings(max_length=8))


# --------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = write_model_folder(root / "model")
    other = write_model_folder(root / "other", seed=4)
    train = write_problems(root / "train.jsonl", 30)
    test = write_problems(root / "test.jsonl", 6, seed=1)
    return {"root": root, "model": model, "other": other, "train": train, "test": test}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if "geoprobe" in ln]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("geoprobe: error: ")
    return lines[0]


def test_cli_finetune_resume_and_evaluate(cli_files, tmp_path, capsys):
    f = cli_files
    args = ["finetune", str(f["model"]), "--data", str(f["train"]), "--adapter", "hydralora", "--r", "4",
            "--max-steps", "4", "--batch-size", "2", "--save-every", "2", "--quiet", "--max-length", "160",
            "--out", str(tmp_path / "run"), "--balance", "0.01"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "adapter written to" in out and "hydralora" in out
    record = json.loads((tmp_path / "run" / RESULTS).read_text())
    assert record["loss_steps"] == [1, 2, 3, 4] and record["method"] == "hydralora"
    assert record["settings"]["balance_coef"] == 0.01
    assert main(args) == 2  # an existing run without --resume
    assert "--resume" in _one_line_error(capsys)
    assert main(args + ["--resume"]) == 0  # finished run: resumes at its last checkpoint
    capsys.readouterr()

    ev = tmp_path / "eval.json"
    assert main(["evaluate", str(f["model"]), "--adapter", str(tmp_path / "run" / "adapter"), "--data",
                 str(f["test"]), "--max-new-tokens", "6", "--batch-size", "4", "--out", str(ev)]) == 0
    assert "accuracy" in capsys.readouterr().out
    d = json.loads(ev.read_text())
    assert d["n"] == 6 and len(d["predictions"]) == 6 and 0.0 <= d["accuracy"] <= 1.0
    assert all(p["gold"] is not None for p in d["predictions"])

    # the adapter on another base model: one line, exit 2
    assert main(["evaluate", str(f["other"]), "--adapter", str(tmp_path / "run" / "adapter"), "--data",
                 str(f["test"]), "--max-new-tokens", "2", "--out", str(ev)]) == 2
    assert "another base model" in _one_line_error(capsys)


def test_cli_bad_input(cli_files, tmp_path, capsys):
    f = cli_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "reply": "y"}) + "\n")
    base = [str(f["model"]), "--quiet", "--max-steps", "1", "--out", str(tmp_path / "o")]
    assert main(["finetune", *base, "--data", str(bad)]) == 2
    assert "fields" in _one_line_error(capsys)
    assert main(["finetune", *base, "--data", str(f["train"]), "--target-modules", "c_attn,c_proj"]) == 2
    assert "q_proj" in _one_line_error(capsys)
    # plans that cannot be met: a profile without this model's layers, a profile of another model
    tok = bpe_tokenizer()
    no_layers = make_profile("tiny", n_layers=2, hidden=64, vocab=len(tok)).with_updates(layers=[])
    no_layers.save(tmp_path / "nolayers.json")
    assert main(["finetune", *base, "--data", str(f["train"]), "--adapter", "auto",
                 "--plan", str(tmp_path / "nolayers.json")]) == 2
    assert "layers" in _one_line_error(capsys)
    make_profile("big", n_layers=30, hidden=576, vocab=49152).save(tmp_path / "big.json")
    assert main(["finetune", *base, "--data", str(f["train"]), "--adapter", "gelora",
                 "--plan", str(tmp_path / "big.json")]) == 2
    assert "measured on big" in _one_line_error(capsys)
    assert main(["finetune", *base, "--data", str(f["train"]), "--adapter", "gelora", "--r", "0",
                 "--plan", str(tmp_path / "nolayers.json")]) == 2
    _one_line_error(capsys)
    assert main(["evaluate", str(f["model"]), "--adapter", str(tmp_path), "--data", str(f["test"])]) == 2
    assert "not an adapter folder" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists() or not list_checkpoints(tmp_path / "o")


def test_cli_gelora_from_profile_plan(cli_files, tmp_path, capsys):
    """--plan with a profile: GeLoRA ranks planned from its intrinsic dimensions, kept in OUT/plan.json."""
    f = cli_files
    tok = bpe_tokenizer()
    make_profile("tiny", n_layers=2, hidden=64, vocab=len(tok)).save(tmp_path / "p.json")
    assert main(["finetune", str(f["model"]), "--data", str(f["train"]), "--adapter", "gelora", "--plan",
                 str(tmp_path / "p.json"), "--r", "4", "--max-steps", "2", "--batch-size", "2", "--quiet",
                 "--max-length", "160", "--out", str(tmp_path / "run")]) == 0
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    side = json.loads((tmp_path / "run" / ADAPTER / "geoprobe_adapter.json").read_text())
    assert plan["method"] == "gelora" and len(plan["layer_ranks"]) == 2
    # the sidecar keeps the plan (the ranks themselves are GeLoRA's rank_pattern in adapter_config.json)
    assert side["plan"]["layer_ranks"] == plan["layer_ranks"] and side["method"] == "gelora"


def test_cli_run_on_a_tiny_model(cli_files, tmp_path, capsys):
    f = cli_files
    out = tmp_path / "run"
    assert main(["run", str(f["model"]), "--data", str(f["train"]), "--eval", str(f["test"]), "--r", "4",
                 "--max-steps", "2", "--batch-size", "2", "--max-length", "160", "--quiet",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plan:" in printed and "report written to" in printed
    profile = GeometryProfile.load(out / "profile.json")
    assert profile.adapter_plan is not None and len(profile.finetune) == 1
    ft = profile.finetune[0]
    assert ft.eval_metrics["n_eval"] == 6.0 and 0.0 <= ft.eval_metrics["accuracy"] <= 1.0
    assert ft.method == profile.adapter_plan.method and len(ft.loss_values) == 2
    html = (out / "report.html").read_text()
    assert "Fine-tune results" in html and ft.method in html


def test_run_workflow_as_one_library_call(cli_files, tmp_path):
    from geoprobe.models import load_model
    from geoprobe.workflows import RunResult, run

    f = cli_files
    lm = load_model(str(f["model"]), device="cpu")
    out = tmp_path / "run"
    planned = []
    done = run(lm, load_examples(f["train"]), load_examples(f["test"]), out=out, r=4, progress=False,
               settings=TrainSettings(max_steps=2, batch_size=2, max_length=160), max_new_tokens=4,
               on_plan=planned.append)
    assert isinstance(done, RunResult) and len(planned) == 1 and done.method == planned[0].method
    assert RunResult.from_dict(json.loads(json.dumps(done.to_dict()))) == done
    for path in (done.plan_path, done.profile_path, done.results_path, done.eval_path, done.report_path):
        assert Path(path).is_file() and Path(path).parent == out
    assert Path(done.adapter_dir) == out / ADAPTER
    assert done.n_eval == 6 and 0 <= done.n_correct <= 6 and done.accuracy == done.n_correct / 6
    assert done.finetune.eval_metrics == done.eval_metrics and done.eval_metrics["n_eval"] == 6.0
    assert json.loads(Path(done.results_path).read_text())["eval_metrics"] == done.eval_metrics
    assert GeometryProfile.load(done.profile_path).finetune[0].loss_values == done.finetune.loss_values


def test_plan_file_errors_are_plan_errors(cli_files, tmp_path):
    from geoprobe.errors import PlanError
    from geoprobe.workflows import plan_from_file

    (tmp_path / "bad.json").write_text('{"method": ', encoding="utf-8")
    with pytest.raises(PlanError, match="does not exist"):
        plan_from_file(tmp_path / "none.json", None, [])
    with pytest.raises(PlanError, match="bad.json is not valid JSON"):
        plan_from_file(tmp_path / "bad.json", None, [])


def test_cli_evaluate_several_sets(cli_files, tmp_path, capsys):
    """`--data a --data b`: one JSON with a record per set that equals the one-set evaluation of
    that set, and the pooled counts; a one-set call keeps the one-set format."""
    f = cli_files
    second = write_problems(tmp_path / "more.jsonl", 5, seed=9)
    common = [str(f["model"]), "--max-new-tokens", "6", "--quiet"]
    singles = []
    for k, data in enumerate((f["test"], second)):
        out = tmp_path / f"one{k}.json"
        assert main(["evaluate", *common, "--data", str(data), "--out", str(out)]) == 0
        singles.append(json.loads(out.read_text()))
        assert singles[-1]["schema"] == "geoprobe.evaluation"
    capsys.readouterr()
    both = tmp_path / "both.json"
    assert main(["evaluate", *common, "--data", str(f["test"]), "--data", str(second), "--eval-batch-size", "3",
                 "--out", str(both)]) == 0
    printed = capsys.readouterr().out
    assert f"on {f['test']}" in printed and f"on {second}" in printed and "on all 2 sets" in printed
    d = json.loads(both.read_text())
    assert d["schema"] == "geoprobe.evaluation-sets" and d["schema_version"] == 1
    assert [s["data"] for s in d["sets"]] == [str(f["test"]), str(second)]
    for got, alone in zip(d["sets"], singles):
        for key in ("n", "accuracy", "n_unparsed", "predictions", "task", "metrics"):
            assert got[key] == alone[key], key
    assert d["overall"]["n"] == 11 == sum(s["n"] for s in d["sets"])
    assert d["overall"]["n_correct"] == sum(p["correct"] for s in d["sets"] for p in s["predictions"])
    assert workflows.read_evaluation(both) == d["sets"]
    assert workflows.read_evaluation(tmp_path / "one0.json") == [singles[0]]


def test_cli_evaluate_bad_input(cli_files, tmp_path, capsys):
    """Refused in one line before the model is loaded (the model path does not exist)."""
    f = cli_files
    missing = str(tmp_path / "no-model")
    unknown = tmp_path / "colours.json"
    unknown.write_text(json.dumps([{"instruction": "Name the colour of the sky.", "output": "", "answer": "blue"}]))
    out = tmp_path / "e.json"
    assert main(["evaluate", missing, "--data", str(f["test"]), "--data", str(unknown), "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert f"--data {unknown}" in line and "cannot tell how to score" in line
    for flag in ("--eval-batch-size", "--batch-size"):
        assert main(["evaluate", missing, "--data", str(f["test"]), flag, "0", "--out", str(out)]) == 2
        assert "--eval-batch-size" in _one_line_error(capsys)
    assert main(["evaluate", missing, "--data", str(f["test"]), "--data", str(f["test"]), "--out", str(out)]) == 2
    assert "given twice" in _one_line_error(capsys)
    assert main(["run", missing, "--data", str(f["train"]), "--eval", str(f["test"]), "--eval-batch-size", "0",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--eval-batch-size must be ≥ 1" in _one_line_error(capsys)
    assert main(["run", missing, "--data", str(f["train"]), "--eval", str(unknown), "--out", str(tmp_path / "r")]) == 2
    assert f"--eval {unknown}" in _one_line_error(capsys)
    assert not out.exists() and not (tmp_path / "r").exists()
