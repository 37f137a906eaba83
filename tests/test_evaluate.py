"""Tests for adapters.evaluate: extraction rules on hand-written outputs and against LLM-Adapters'
own rules (reproduced below as oracles), GLUE metrics against scikit-learn, batched greedy
generation against one-at-a-time generation and a hand-written greedy loop, and the evaluation
wiring against a scripted model whose answers are known."""
from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.data import Example, format_prompt
import adapters.evaluate.generate as gen_module
from adapters.evaluate import (COMMONSENSE_LABELS, EvalResult, SetsResult, accuracy, auto_batch_size, evaluate,
                               evaluate_sets, extract_choice, extract_commonsense, extract_label, extract_number,
                               extract_prediction, f1_binary, generate_answers, is_correct,
                               kv_cache_bytes_per_token, matthews_corrcoef)
from geoprobe.errors import DataFormatError, InputDataError

import tiny_models


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


# --------------------------------------------------------------------------- LLM-Adapters' rules
# (evaluate.py / commonsense_evaluate.py of AGI-Edgerunners/LLM-Adapters, restated as oracles)
def ref_number(sentence: str) -> float:
    sentence = sentence.replace(",", "")
    pred = re.findall(r"-?\d+\.?\d*", sentence)
    return float(pred[-1]) if pred else float("inf")


def ref_letter(sentence: str) -> str:
    pred = re.findall(r"A|B|C|D|E", sentence.strip())
    return pred[0] if pred else ""


def ref_commonsense(task: str, sentence: str) -> str:
    pattern = {"boolq": r"true|false", "piqa": r"solution1|solution2",
               "hellaswag": r"ending1|ending2|ending3|ending4", "winogrande": r"option1|option2"}.get(
        task, r"answer1|answer2|answer3|answer4|answer5")
    pred = re.findall(pattern, sentence.strip())
    return pred[0] if pred else ""


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("text,want", [
    ("There are 7 - 3 = 4 crayons. The answer is 4.", 4.0),
    ("He earns $1,234,567 in total.", 1234567.0),
    ("The temperature falls to -15 degrees.", -15.0),
    ("First 3.5 then 2.25", 2.25),
    ("So 10 - 12 = -2.5", -2.5),
    ("The answer is 9.", 9.0),
    ("Each gets 3/4 of a pie.", 0.75),
    ("Divide: 10 / 4", 2.5),
    ("-6/4 of it", -1.5),
    ("Impossible: 5/0", 0.0),
    ("no digits at all", None),
    ("", None),
    ("\nA: 2 + 2 = 4. The answer is 4.\n\n### Instruction:\nWhat is 9 + 9?\n\n### Response:\n18", 4.0),
    ("Below is an instruction that describes a task.\n\n### Instruction:\nprompt 77\n\n### Response:\nThe answer is 12.", 12.0),
])
def test_extract_number_cases(text, want):
    got = extract_number(text)
    assert got == want if want is not None else got is None


def test_extract_number_fraction_switch():
    assert extract_number("The answer is 3/4") == 0.75
    assert extract_number("The answer is 3/4", fractions=False) == 4.0  # LLM-Adapters' reading


@pytest.mark.parametrize("seed", range(3))
def test_extract_number_matches_llm_adapters_rule(seed):
    rng = random.Random(seed)
    alphabet = "0123456789-.,/ ab\n"
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ref = ref_number(s)
        got = extract_number(s, fractions=False)
        assert (got is None and ref == float("inf")) or got == ref, s
        if "/" not in s:  # fractions only change texts with a slash
            got = extract_number(s)
            assert (got is None and ref == float("inf")) or got == ref, s


# --------------------------------------------------------------------------- letters
@pytest.mark.parametrize("text,want", [
    ("\nRationale: Let x be ... Because 4x + 1 = 21 the perimeter is 62 m.The answer is (C).", "C"),
    ("Answer: B", "B"),
    ("the answer is E because of that", "E"),
    ("I pick option D.", "D"),
    ("(B) 61 m is right", "B"),
    ("A train covers 60 km in an hour, so E", "E"),  # the article "A" is skipped
    ("A", "A"),
    ("C.", "C"),
    ("Nothing useful here", None),
    ("", None),
    ("### Response:\nThe answer is (A).\n\n### Instruction:\nThe answer is (B)", "A"),
])
def test_extract_choice_cases(text, want):
    assert extract_choice(text) == want


def test_extract_choice_letters_and_rules():
    assert extract_choice("The answer is (E).", letters="ABCD") is None
    assert extract_choice("The answer is (D).", letters="ABCD") == "D"
    # LLM-Adapters' rule takes the first A-E anywhere, inside words too
    assert extract_choice("Because the sum is 62, the answer is (C).", rule="llm_adapters") == "B"
    assert extract_choice("Because the sum is 62, the answer is (C).") == "C"
    with pytest.raises(DataFormatError):
        extract_choice("x", letters="abc")
    with pytest.raises(DataFormatError):
        extract_choice("x", rule="fuzzy")


@pytest.mark.parametrize("seed", range(3))
def test_extract_choice_llm_adapters_rule_matches_reference(seed):
    rng = random.Random(seed)
    alphabet = "ABCDEFGabcde() .:\n"
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        got = extract_choice(s, rule="llm_adapters")
        assert (got or "") == ref_letter(s), s


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("task,text,want", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "True.", "true"),
    ("boolq", "It is untrue, so false", "false"),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("arc_challenge", "the correct answer is Answer3", "answer3"),
    ("arc_easy", "answer5", "answer5"),
    ("social_i_qa", "answer10 is not a label", None),
    ("openbookqa", "the correct answer is answer4 not answer1", "answer4"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("hellaswag", "ending3", "ending3"),
    ("boolq", "maybe", None),
])
def test_extract_commonsense_cases(task, text, want):
    assert extract_commonsense(text, task) == want


@pytest.mark.parametrize("words,text,want", [
    (("entailment", "not_entailment"), "the correct answer is not_entailment", "not_entailment"),
    (("entailment", "not_entailment"), "the correct answer is not entailment", "not_entailment"),
    (("entailment", "not_entailment"), "the correct answer is entailment", "entailment"),
    (("unacceptable", "acceptable"), "the correct answer is unacceptable", "unacceptable"),
    (("unacceptable", "acceptable"), "Acceptable", "acceptable"),
    (("not_equivalent", "equivalent"), "equivalent, surely", "equivalent"),
    (("negative", "positive"), "neutral", None),
])
def test_extract_label_glue_words(words, text, want):
    assert extract_label(text, words) == want


@pytest.mark.parametrize("task", sorted(COMMONSENSE_LABELS))
def test_extract_commonsense_matches_llm_adapters_on_plain_text(task):
    """On lower-case text of whole words the rule reads what LLM-Adapters reads."""
    rng = random.Random(task)
    vocab = ["the", "correct", "answer", "is", "so", "we", "pick", *COMMONSENSE_LABELS[task], "answer5"]
    for _ in range(500):
        s = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))
        assert (extract_commonsense(s, task) or "") == ref_commonsense(task, s), s


def test_extract_prediction_dispatch():
    assert extract_prediction("so 12 apples", "gsm8k") == 12.0
    assert extract_prediction("The answer is (B)", "aqua", choices=tuple("ABCDE")) == "B"
    assert extract_prediction("the correct answer is option2", "winogrande") == "option2"
    assert extract_prediction("the correct answer is positive", "sst2") == "positive"
    assert extract_prediction("answer2", "commonsense", choices=("answer1", "answer2")) == "answer2"
    assert extract_prediction("7", "custom", gold="7.0") == 7.0
    with pytest.raises(DataFormatError, match="cannot tell"):
        extract_prediction("x", "custom", gold="blue")


@pytest.mark.parametrize("pred,gold,task,want", [
    (4.0, "4", "addsub", True),
    (576.0, "576.0", "gsm8k", True),
    (1.8335, "1.8333333333333335", "mawps", True),   # within 0.001
    (1.83, "1.8333333333333335", "mawps", False),     # off by 0.0033
    (1006.0, "1,006", "gsm8k", True),
    (None, "4", "gsm8k", False),
    (float("inf"), "4", "gsm8k", False),
    ("C", "C", "aqua", True),
    ("c", "C", "aqua", True),
    ("B", "C", "aqua", False),
    ("answer3", "answer3", "arc_easy", True),
    ("not_entailment", "not_entailment", "rte", True),
    ("entailment", "not_entailment", "rte", False),
    ("true", "false", "boolq", False),
])
def test_is_correct(pred, gold, task, want):
    assert is_correct(pred, gold, task) is want


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", range(12))
def test_metrics_match_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    k = 2 if seed < 8 else int(rng.integers(3, 6))
    y_true = rng.integers(0, k, n)
    y_pred = rng.integers(0, k, n) if seed % 4 else np.where(rng.random(n) < 0.8, y_true, 1 - y_true % 2)
    if seed == 5:
        y_pred = np.zeros(n, dtype=int)  # a constant predictor: MCC 0, F1 0
    assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=1e-12)
    assert matthews_corrcoef(y_true, y_pred) == pytest.approx(sk.matthews_corrcoef(y_true, y_pred), abs=1e-12)
    if k == 2:
        assert f1_binary(y_true, y_pred) == pytest.approx(
            sk.f1_score(y_true, y_pred, pos_label=1, zero_division=0.0), abs=1e-12)
        assert f1_binary(y_true, y_pred, positive=0) == pytest.approx(
            sk.f1_score(y_true, y_pred, pos_label=0, zero_division=0.0), abs=1e-12)


def test_metrics_closed_forms():
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0
    assert f1_binary([1, 0, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.5)
    with pytest.raises(DataFormatError):
        accuracy([1, 2], [1])


# --------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny_llama(bpe_tokenizer):
    """The tiny Llama of `tiny_models` on the shared BPE tokenizer (conftest), in float64."""
    return tiny_models.tiny_llama(0, tokenizer=bpe_tokenizer, positions=512, dtype=torch.float64)


PROMPTS = ["Hi", "The function returns a new list of the items.",
           "x = 3\nprint(x)", " ".join(["the module imports the name"] * 12), "What is 2 + 2?",
           "A class definition creates a class object whose attribute names are bound.", "ok ok"]


def _greedy_reference(model, tok, prompt: str, max_new_tokens: int, eos: int) -> str:
    """Greedy decoding by hand: full forward each step, argmax, stop after EOS."""
    ids = tok(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            nxt = int(torch.argmax(logits))
            new.append(nxt)
            if nxt == eos:
                break
    return tok.decode(new, skip_special_tokens=True)


def test_batched_greedy_equals_unbatched(bpe_tokenizer, tiny_llama):
    tok, model = bpe_tokenizer, tiny_llama
    assert tok.pad_token is None and tok.padding_side == "right"
    lengths = {len(tok(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) >= 5  # mixed prompt lengths, so batches carry left padding
    one = generate_answers(model, tok, PROMPTS, batch_size=1, max_new_tokens=10)
    for bs in (3, 8):
        assert generate_answers(model, tok, PROMPTS, batch_size=bs, max_new_tokens=10) == one
    assert one == [_greedy_reference(model, tok, p, 10, tok.eos_token_id) for p in PROMPTS]
    # the tokenizer and model are left as they were
    assert tok.pad_token is None and tok.padding_side == "right" and not model.training


@pytest.mark.parametrize("drop", [1, 16])
def test_batched_greedy_with_early_stops(bpe_tokenizer, tiny_llama, monkeypatch, drop):
    """Make a token the model often emits the EOS: sequences then stop at different steps. With
    DROP_FRACTION 16 finished rows leave the batch (cache rows selected away); with 1 they stay,
    masked, until all are done. Outputs equal one-at-a-time decoding and plain `model.generate`."""
    from transformers import DynamicCache

    tok, model = bpe_tokenizer, tiny_llama
    monkeypatch.setattr(gen_module, "DROP_FRACTION", drop)
    selections = []
    original = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda self, idx: (selections.append(len(idx)), original(self, idx))[1])
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    firsts = []
    with torch.no_grad():
        for seq in ids:
            seq = list(seq)
            for _ in range(8):
                nxt = int(torch.argmax(model(input_ids=torch.tensor([seq])).logits[0, -1]))
                seq.append(nxt)
            firsts.append(seq[len(seq) - 8:])
    counts: dict[int, int] = {}
    for gen in firsts:
        for t in set(gen[1:6]):
            counts[t] = counts.get(t, 0) + 1
    stop = next((t for t, c in sorted(counts.items(), key=lambda kv: -kv[1]) if 1 <= c < len(PROMPTS)), None)
    if stop is None:
        pytest.skip("no token stops only some of the random model's generations")
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop
    try:
        one = generate_answers(model, tok, PROMPTS, batch_size=1, max_new_tokens=8)
        selections.clear()
        many = generate_answers(model, tok, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=8)
        ref = [_greedy_reference(model, tok, p, 8, stop) for p in PROMPTS]
        plain = _plain_generate(model, tok, PROMPTS, 8)
    finally:
        model.generation_config.eos_token_id = saved
    assert many == one == ref == plain
    assert len({len(r) for r in ref}) > 1
    if drop == 1:
        assert selections == []  # finished rows were masked, never dropped
    else:
        assert selections and all(0 < k < len(PROMPTS) for k in selections)


def _plain_generate(model, tok, prompts, max_new_tokens: int) -> list[str]:
    """The plain loop: `model.generate(do_sample=False)` on one prompt at a time, new text only."""
    out = []
    with torch.no_grad():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            seq = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.eos_token_id)
            out.append(tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_equals_plain_generate_loop(bpe_tokenizer, dtype):
    """Length-sorted, left-padded, early-stopping batches give the answers of plain one-at-a-time
    `model.generate(do_sample=False)`, for every batch size including the device's choice."""
    tok = bpe_tokenizer
    model = tiny_models.tiny_llama(3, tokenizer=tok, positions=512, dtype=dtype)
    prompts = PROMPTS + [p[::-1] for p in PROMPTS] + ["Why?"]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) >= 8  # mixed lengths
    plain = _plain_generate(model, tok, prompts, 12)
    for bs in (None, 2, 5, len(prompts)):
        assert generate_answers(model, tok, prompts, batch_size=bs, max_new_tokens=12) == plain, bs


def test_static_cache_batches_equal_plain(bpe_tokenizer, tiny_llama):
    """The static-cache batches (one shape for all: padded to the longest prompt and to the full
    batch) give the plain answers; only their compiling is CUDA's, and the flag is refused elsewhere."""
    tok, model = bpe_tokenizer, tiny_llama
    width = max(len(tok(p)["input_ids"]) for p in PROMPTS)
    eos = [tok.eos_token_id]
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    try:
        with torch.no_grad():
            got = gen_module._static_batch(model, tok, PROMPTS[:3], width=width, batch_size=5,
                                           max_new_tokens=10, eos_ids=eos, device="cpu")
    finally:
        tok.pad_token, tok.padding_side = None, "right"
    assert tok.batch_decode(got, skip_special_tokens=True) == _plain_generate(model, tok, PROMPTS[:3], 10)
    with pytest.raises(InputDataError, match="CUDA"):
        generate_answers(model, tok, PROMPTS, static_cache=True)


def test_batch_size_and_new_tokens_checked(bpe_tokenizer, tiny_llama):
    for bad in (0, -3):
        with pytest.raises(InputDataError, match="batch size"):
            generate_answers(tiny_llama, bpe_tokenizer, PROMPTS, batch_size=bad)
    with pytest.raises(InputDataError, match="max_new_tokens"):
        generate_answers(tiny_llama, bpe_tokenizer, PROMPTS, max_new_tokens=0)


def test_kv_cache_bytes_match_a_real_cache(bpe_tokenizer):
    """The per-token KV size equals the bytes a real DynamicCache holds after a forward pass."""
    from transformers import DynamicCache

    for dtype in (torch.float32, torch.float64):
        model = tiny_models.tiny_llama(0, tokenizer=bpe_tokenizer, layers=3, dtype=dtype)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]] * 2)
        cache = DynamicCache()
        with torch.no_grad():
            name, _ = gen_module._forward_names(model)
            model(input_ids=ids, use_cache=True, **{name: cache})
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert kv_cache_bytes_per_token(model) == held // ids.numel()


def test_auto_batch_size_rule(bpe_tokenizer, monkeypatch):
    import geoprobe.runtime

    model = tiny_models.tiny_llama(0, tokenizer=bpe_tokenizer)
    assert auto_batch_size(model, 100, 256, "cpu") == gen_module.CPU_BATCH
    assert auto_batch_size(model, 100, 256, "cpu", n_prompts=5) == 5
    per_seq = gen_module._sequence_bytes(model, 300, 256)
    assert per_seq > kv_cache_bytes_per_token(model) * 556  # the cache plus the prompt's activations
    for free in (10**8, 3 * 10**9, 10**12):
        monkeypatch.setattr(geoprobe.runtime, "cuda_free_bytes", lambda device, free=free: free)
        b = auto_batch_size(model, 300, 256, "cuda")
        budget = gen_module.MEMORY_FRACTION * free
        assert 1 <= b <= gen_module.MAX_AUTO_BATCH
        assert b * per_seq <= budget and (b == gen_module.MAX_AUTO_BATCH or (b + 1) * per_seq > budget)
        assert auto_batch_size(model, 300, 256, "cuda", n_prompts=7) == min(b, 7)
        assert auto_batch_size(model, 300, 1024, "cuda") <= b  # longer answers, no larger batch


def test_generate_needs_pad_or_eos(tiny_llama):
    class NoSpecials:
        padding_side = "right"
        pad_token = None
        eos_token = None

    with pytest.raises(DataFormatError, match="pad_token"):
        generate_answers(tiny_llama, NoSpecials(), ["x"])
    assert generate_answers(tiny_llama, NoSpecials(), []) == []


# --------------------------------------------------------------------------- evaluation wiring
class Scripted:
    """Stands in for generation: answers each templated prompt with a fixed text, recording calls."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls: list[dict] = []

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls.append({"n": len(prompts), **kwargs})
        return [self.answers[p] for p in prompts]


@pytest.fixture
def scripted(monkeypatch):
    """Install a :class:`Scripted` generator for `evaluate`/`evaluate_sets` and return a factory."""
    import adapters.evaluate as ev

    def install(answers: dict[str, str]) -> Scripted:
        fake = Scripted(answers)
        monkeypatch.setattr(ev, "generate_answers", fake)
        return fake

    return install


def _scripted_glue(task: str, n: int, seed: int):
    words = {"mrpc": ("not_equivalent", "equivalent"), "cola": ("unacceptable", "acceptable")}[task]
    rng = random.Random(seed)
    examples, replies, y_true, y_pred = [], {}, [], []
    for i in range(n):
        gold = rng.randrange(2)
        ex = Example(prompt=f"Sentence pair {i}: item {rng.random():.6f}\n\nAnswer format: {words[0]}/{words[1]}",
                     answer=f"the correct answer is {words[gold]}", label=words[gold], task=task, choices=words)
        r = rng.random()
        if r < 0.1:
            text, pred = "I cannot tell.", 1 - gold  # unreadable: counted as the wrong class
        else:
            pred = gold if r < 0.7 else 1 - gold
            text = f"the correct answer is {words[pred]}"
        examples.append(ex)
        replies[format_prompt(ex)] = text
        y_true.append(gold)
        y_pred.append(pred)
    return examples, replies, y_true, y_pred


@pytest.mark.parametrize("task", ["mrpc", "cola"])
def test_evaluate_glue_metrics_against_sklearn(bpe_tokenizer, tiny_llama, scripted, task):
    sk = pytest.importorskip("sklearn.metrics")
    examples, replies, y_true, y_pred = _scripted_glue(task, 41, seed=7)
    fake = scripted(replies)
    res = evaluate(tiny_llama, bpe_tokenizer, examples, batch_size=6)
    assert isinstance(res, EvalResult) and res.task == task and res.n == 41
    assert res.accuracy == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert res.metrics["accuracy"] == res.accuracy
    if task == "mrpc":
        assert res.metrics["f1"] == pytest.approx(sk.f1_score(y_true, y_pred))
    else:
        assert res.metrics["mcc"] == pytest.approx(sk.matthews_corrcoef(y_true, y_pred))
    assert [p["prompt_id"] for p in res.predictions] == list(range(41))
    assert [p["generated"] for p in res.predictions] == [replies[format_prompt(e)] for e in examples]
    assert res.n_unparsed == sum(p["generated"] == "I cannot tell." for p in res.predictions)
    assert fake.calls == [{"n": 41, "batch_size": 6, "max_new_tokens": 32, "device": None,
                           "static_cache": False, "progress": False,
                          "stop_ids": [bpe_tokenizer.eos_token_id]}]
    assert res.to_dict()["metrics"] == res.metrics


def test_evaluate_mixed_tasks_and_math(bpe_tokenizer, tiny_llama, scripted):
    examples = [
        Example(prompt="What is 2 + 2?", answer="", label="4", task="addsub"),
        Example(prompt="What is 10 / 4?", answer="", label="2.5", task="svamp"),
        Example(prompt="Pick. Answer Choices: (A) 1 (B) 2", answer="", label="B", task="aqua",
                choices=("A", "B")),
        Example(prompt="Is it so?\n\nAnswer format: true/false", answer="", label="true", task="boolq",
                choices=("true", "false")),
    ]
    replies = {format_prompt(examples[0]): "2 + 2 = 4. The answer is 4.",
               format_prompt(examples[1]): "10 / 4 = 2.4. The answer is 2.4",
               format_prompt(examples[2]): "Because 1 + 1 = 2, the answer is (B).",
               format_prompt(examples[3]): "the correct answer is true"}
    scripted(replies)
    res = evaluate(tiny_llama, bpe_tokenizer, examples, batch_size=3)
    assert [p["extracted"] for p in res.predictions] == [4.0, 2.4, "B", "true"]
    assert [p["correct"] for p in res.predictions] == [True, False, True, True]
    assert res.task == "mixed" and res.accuracy == 0.75
    assert res.metrics["accuracy/svamp"] == 0.0 and res.metrics["accuracy/aqua"] == 1.0
    with pytest.raises(DataFormatError, match="no gold label"):
        evaluate(tiny_llama, bpe_tokenizer, [Example(prompt="q", answer="", label=None, task="sst2")])


def test_evaluate_real_model_consistency(bpe_tokenizer, tiny_llama):
    """On a real (random) model, evaluate reports exactly what generation + extraction give."""
    examples = [Example(prompt=p, answer="", label=str(i), task="gsm8k") for i, p in enumerate(PROMPTS[:4])]
    res = evaluate(tiny_llama, bpe_tokenizer, examples, batch_size=2, max_new_tokens=6)
    gen = generate_answers(tiny_llama, bpe_tokenizer, [format_prompt(e) for e in examples], max_new_tokens=6)
    assert [p["generated"] for p in res.predictions] == gen
    for p, e in zip(res.predictions, examples):
        assert p["extracted"] == extract_number(p["generated"])
        assert p["correct"] == is_correct(p["extracted"], e.label, "gsm8k")
        assert p["gold"] == e.label
    assert res.accuracy == pytest.approx(np.mean([p["correct"] for p in res.predictions]))
    assert res.seconds > 0 and math.isfinite(res.seconds)


# --------------------------------------------------------------------------- several test sets
def _three_sets():
    math = [Example(prompt=p, answer="", label=str(i), task="gsm8k") for i, p in enumerate(PROMPTS[:4])]
    yes_no = [Example(prompt=p + "\n\nAnswer format: true/false", answer="", label=("true", "false")[i % 2],
                      task="boolq", choices=("true", "false")) for i, p in enumerate(PROMPTS[2:])]
    letters = [Example(prompt=p + " Answer Choices: (A) 1 (B) 2", answer="", label="AB"[i % 2], task="aqua",
                       choices=("A", "B")) for i, p in enumerate(PROMPTS[1:4])]
    return [("math.json", math), ("boolq.json", yes_no), ("aqua.json", letters)]


@pytest.mark.parametrize("new_tokens", [None, 7])
def test_evaluate_sets_equals_separate_evaluations(bpe_tokenizer, tiny_llama, new_tokens):
    """Each set's record from one multi-set call equals `evaluate` on that set alone (answers,
    readings, scores, counts); the pooled figures are the sums."""
    sets = _three_sets()
    res = evaluate_sets(tiny_llama, bpe_tokenizer, sets, batch_size=4, max_new_tokens=new_tokens)
    assert isinstance(res, SetsResult) and res.names == [n for n, _ in sets]
    for (name, examples), got in zip(sets, res.results):
        alone = evaluate(tiny_llama, bpe_tokenizer, examples, batch_size=3, max_new_tokens=new_tokens)
        assert got.predictions == alone.predictions, name
        assert (got.n, got.accuracy, got.n_unparsed, got.task, got.metrics) == \
            (alone.n, alone.accuracy, alone.n_unparsed, alone.task, alone.metrics)
    assert res.n == sum(len(ex) for _, ex in sets) == sum(r.n for r in res.results)
    assert res.n_correct == sum(p["correct"] for r in res.results for p in r.predictions)
    assert res.accuracy == pytest.approx(res.n_correct / res.n)
    assert res.n_unparsed == sum(r.n_unparsed for r in res.results)
    assert SetsResult.from_dict(res.to_dict()) == res


def test_evaluate_sets_one_call_and_one_bar(bpe_tokenizer, tiny_llama, scripted):
    sets = _three_sets()
    fake = scripted({format_prompt(ex): "the correct answer is true. The answer is (B). 3"
                     for _, examples in sets for ex in examples})
    evaluate_sets(tiny_llama, bpe_tokenizer, sets, max_new_tokens=9)
    assert len(fake.calls) == 1 and fake.calls[0]["n"] == sum(len(ex) for _, ex in sets)
    bars = {id(c["bar"]) for c in fake.calls}
    fake.calls.clear()
    evaluate_sets(tiny_llama, bpe_tokenizer, sets)  # labels 32 tokens, math and letters 256: two groups
    assert sorted(c["max_new_tokens"] for c in fake.calls) == [32, 256]
    assert len({id(c["bar"]) for c in fake.calls}) == 1 and bars


def test_evaluate_sets_refuses_before_generating(bpe_tokenizer, tiny_llama, scripted):
    fake = scripted({})
    sets = _three_sets()
    unknown = [Example(prompt="Name the colour of the sky.", answer="", label="blue", task="generic")]
    with pytest.raises(DataFormatError, match=r"colours\.json: example 0: cannot tell how to score"):
        evaluate_sets(tiny_llama, bpe_tokenizer, sets + [("colours.json", unknown)])
    with pytest.raises(DataFormatError, match="given twice"):
        evaluate_sets(tiny_llama, bpe_tokenizer, sets + [sets[0]])
    with pytest.raises(DataFormatError, match="at least one"):
        evaluate_sets(tiny_llama, bpe_tokenizer, [])
    assert fake.calls == []


# --------------------------------------------------------------------------- the real model
GSM8K_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.slow
def test_fast_path_equals_plain_generate_on_smollm2():
    """The embedded SmolLM2 on 12 GSM8K test questions: the fast path (the CPU's batch, and batches
    of 5 that carry left padding) answers exactly as plain one-at-a-time `model.generate`."""
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K test set not found at {GSM8K_TEST}")
    from adapters.data import load_examples
    from geoprobe import load_model

    lm = load_model()
    prompts = [format_prompt(ex) for ex in load_examples(GSM8K_TEST, limit=12)]
    lengths = {len(lm.tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) >= 6
    plain = []
    with torch.no_grad():
        for p in prompts:
            enc = lm.tokenizer(p, return_tensors="pt")
            seq = lm.model.generate(**enc, do_sample=False, max_new_tokens=48,
                                    pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id)
            plain.append(lm.tokenizer.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert generate_answers(lm.model, lm.tokenizer, prompts, max_new_tokens=48) == plain
    assert generate_answers(lm.model, lm.tokenizer, prompts, batch_size=5, max_new_tokens=48) == plain
    assert sum(len(a) for a in plain) > 12 * 40  # real answers, not empty strings


def _often_emitted(model, tok) -> int:
    """A token the random model emits within 6 greedy steps for some prompts but not all."""
    counts: dict[int, int] = {}
    with torch.no_grad():
        for p in PROMPTS:
            seq = list(tok(p)["input_ids"])
            gen = []
            for _ in range(6):
                nxt = int(torch.argmax(model(input_ids=torch.tensor([seq + gen])).logits[0, -1]))
                gen.append(nxt)
            for t in set(gen[1:]):
                counts[t] = counts.get(t, 0) + 1
    stop = next((t for t, c in sorted(counts.items(), key=lambda kv: -kv[1]) if 1 <= c < len(PROMPTS)), None)
    if stop is None:
        pytest.skip("no token stops only some of the random model's generations")
    return stop


def test_evaluation_stops_at_the_token_fine_tuning_ends_answers_with(bpe_tokenizer, tiny_llama, caplog):
    """A converted checkpoint whose generation config ends on another token than the tokenizer's: fine-
    tuning ends every answer with tokenizer.eos_token_id, so evaluation stops there as well (one-at-a-time
    greedy decoding stopping at that token is the oracle), with a warning; plain generation with the
    config's end token alone runs on past it."""
    import adapters.evaluate as ev

    tok, model = bpe_tokenizer, tiny_llama
    stop = _often_emitted(model, tok)
    never = len(tok) - 1  # an end token the config names that these prompts do not reach
    saved_cfg, saved_eos = model.generation_config.eos_token_id, tok.eos_token
    model.generation_config.eos_token_id = never
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    ev._REPORTED_ENDS.clear()
    try:
        assert tok.eos_token_id == stop
        with caplog.at_level("WARNING", logger="adapters.evaluate"):
            assert ev.answer_end_ids(model, tok) == [stop]
        assert any("end token" in r.getMessage() for r in caplog.records)
        ends = generate_answers(model, tok, PROMPTS, batch_size=3, max_new_tokens=6, stop_ids=[stop])
        runs_on = generate_answers(model, tok, PROMPTS, batch_size=3, max_new_tokens=6)
        ref = [_greedy_reference(model, tok, p, 6, stop) for p in PROMPTS]
        examples = [Example(prompt=p, answer="x", label="true", task="boolq") for p in PROMPTS]
        seen = []
        original = ev.generate_answers
        ev.generate_answers = lambda *a, **k: (seen.append(k.get("stop_ids")), original(*a, **k))[1]
        try:
            res = ev.evaluate(model, tok, examples, max_new_tokens=6, batch_size=3, template="plain")
        finally:
            ev.generate_answers = original
    finally:
        model.generation_config.eos_token_id = saved_cfg
        tok.eos_token = saved_eos
    assert ends == ref
    assert ends != runs_on  # without it, some generations run past the token
    assert seen == [[stop]]
    assert [p["generated"] for p in res.predictions] == [
        _greedy_reference(model, tok, format_prompt(ex, "plain"), 6, stop) for ex in examples]
