"""Tests for adapters.evaluate: extraction rules on hand-written outputs and against LLM-Adapters'
own rules (reproduced below as oracles), GLUE metrics against scikit-learn, batched greedy
generation against one-at-a-time generation and a hand-written greedy loop, and the evaluation
wiring against a scripted model whose answers are known."""
from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

from adapters.data import Example, format_prompt
from adapters.evaluate import (COMMONSENSE_LABELS, EvalResult, accuracy, evaluate, extract_choice,
                               extract_commonsense, extract_label, extract_number, extract_prediction,
                               f1_binary, generate_answers, is_correct, matthews_corrcoef)
from geoprobe.errors import DataFormatError

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


def test_batched_greedy_with_early_stops(bpe_tokenizer, tiny_llama):
    """Make a token the model often emits the EOS: sequences then stop at different steps, and the
    finished ones are padded while the others go on; outputs still equal one-at-a-time decoding."""
    tok, model = bpe_tokenizer, tiny_llama
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
        many = generate_answers(model, tok, PROMPTS, batch_size=4, max_new_tokens=8)
        ref = [_greedy_reference(model, tok, p, 8, stop) for p in PROMPTS]
    finally:
        model.generation_config.eos_token_id = saved
    assert many == one == ref
    assert len({len(r) for r in ref}) > 1


def test_generate_needs_pad_or_eos(tiny_llama):
    class NoSpecials:
        padding_side = "right"
        pad_token = None
        eos_token = None

    with pytest.raises(DataFormatError, match="pad_token"):
        generate_answers(tiny_llama, NoSpecials(), ["x"])
    assert generate_answers(tiny_llama, NoSpecials(), []) == []


# --------------------------------------------------------------------------- evaluation wiring
class ScriptedLM(torch.nn.Module):
    """Answers each prompt with a fixed text: a stand-in whose outputs are known in advance."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok = tokenizer
        self.answers = answers
        self.generation_config = None
        self.batch_sizes: list[int] = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.batch_sizes.append(int(input_ids.shape[0]))
        assert (attention_mask[:, -1] == 1).all()  # left padding
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()], skip_special_tokens=True)
            rows.append(self.tok(self.answers[prompt], add_special_tokens=False)["input_ids"]
                        + [generation_config.eos_token_id])
        width = max(map(len, rows))
        new = torch.tensor([r + [generation_config.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


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
def test_evaluate_glue_metrics_against_sklearn(bpe_tokenizer, task):
    sk = pytest.importorskip("sklearn.metrics")
    examples, replies, y_true, y_pred = _scripted_glue(task, 41, seed=7)
    model = ScriptedLM(bpe_tokenizer, replies)
    res = evaluate(model, bpe_tokenizer, examples, batch_size=6)
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
    assert max(model.batch_sizes) == 6 and sum(model.batch_sizes) == 41
    assert res.to_dict()["metrics"] == res.metrics


def test_evaluate_mixed_tasks_and_math(bpe_tokenizer):
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
    res = evaluate(ScriptedLM(bpe_tokenizer, replies), bpe_tokenizer, examples, batch_size=3)
    assert [p["extracted"] for p in res.predictions] == [4.0, 2.4, "B", "true"]
    assert [p["correct"] for p in res.predictions] == [True, False, True, True]
    assert res.task == "mixed" and res.accuracy == 0.75
    assert res.metrics["accuracy/svamp"] == 0.0 and res.metrics["accuracy/aqua"] == 1.0
    with pytest.raises(DataFormatError, match="no gold label"):
        evaluate(ScriptedLM(bpe_tokenizer, replies), bpe_tokenizer,
                 [Example(prompt="q", answer="", label=None, task="sst2")])


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
