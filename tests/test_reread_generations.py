"""benchmarks/reread_generations.py: stored answers read again as if generation had stopped at the end
token. Oracles: the cut on written-out strings, and a comparison folder built here whose answers' first
labels (before a leaked chat turn) are known, so every run's accuracy and the paired difference against
LoRA are counted by hand."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reread_generations.py"


def _script():
    spec = importlib.util.spec_from_file_location("reread_generations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, kept", [
    ("the correct answer is answer2assistant\nthe correct answer is answer3", "the correct answer is answer2"),
    ("the correct answer is true\nsystem\nYou are", "the correct answer is true\n"),
    ("the correct answer is solution1\nassistant\n", "the correct answer is solution1\n"),
    ("the correct answer is option1assistantsystem", "the correct answer is option1assistant"),
    ("the correct answer is answer1.", "the correct answer is answer1."),
    ("ask the user for help\nthe answer is 4", "ask the user for help\nthe answer is 4"),
])
def test_cut_at_chat_turn(text, kept):
    assert _script().cut_at_chat_turn(text) == kept


def _folder(root: Path) -> tuple[Path, dict[str, list[int]]]:
    """A comparison folder (none, LoRA and HypLoRA at 2 seeds) on a 6-question ARC-style set; each
    fine-tuned answer names a first label, then leaks a chat turn naming the gold label. Returns the
    folder and each run's per-question correctness of the first labels."""
    gold = [1, 2, 3, 4, 1, 2]
    data = root / "data" / "ARC-Challenge" / "test.json"
    data.parent.mkdir(parents=True)
    data.write_text(json.dumps([
        {"instruction": f"Please choose the correct answer to the question: Q{i}?\n\nAnswer1: a. Answer2: b. "
                        "Answer3: c. Answer4: d.\n\nAnswer format: answer1/answer2/answer3/answer4",
         "input": "", "output": f"the correct answer is answer{g}", "answer": f"answer{g}"}
        for i, g in enumerate(gold)]))
    first = {"lora-seed0": [1, 2, 3, 1, 1, 1], "lora-seed1": [1, 1, 1, 1, 1, 1],
             "hyplora-seed0": [1, 2, 3, 4, 1, 1], "hyplora-seed1": [2, 2, 3, 4, 1, 2]}
    folder = root / "cmp"
    (folder / "runs").mkdir(parents=True)
    (folder / "predictions").mkdir()
    truth = {}
    for run in ["none", *first]:
        if run == "none":
            texts = [f"The answer is answer{g}, I think." for g in gold]
            truth[run] = [1] * len(gold)
        else:
            texts = [f"the correct answer is answer{f}assistant\nthe correct answer is answer{g}"
                     for f, g in zip(first[run], gold)]
            truth[run] = [int(f == g) for f, g in zip(first[run], gold)]
        preds = [{"prompt_id": i, "generated": t, "extracted": None, "gold": f"answer{g}", "correct": False,
                  "task": "arc_challenge"} for i, (t, g) in enumerate(zip(texts, gold))]
        (folder / "predictions" / f"{run}.json").write_text(json.dumps({"run": run, "predictions": {
            "arc_challenge": preds}}))
        method, _, seed = run.partition("-seed")
        (folder / "runs" / f"{run}.json").write_text(json.dumps({
            "run": run, "method": method, "seed": int(seed) if seed else None,
            "eval": {"arc_challenge": {"metric": "accuracy", "score": 0.0, "accuracy": 0.0, "n": 6, "n_correct": 0,
                                       "n_unreadable": 6, "metrics": {"accuracy": 0.0}, "correct": [0] * 6}}}))
    (folder / "summary.json").write_text(json.dumps({
        "methods": ["none", "lora", "hyplora"], "seeds": [0, 1], "budget": {"r": 4},
        "settings": {"model": "m", "r": 4, "paths": {"data": "d", "evals": {"arc_challenge": str(data)}},
                     "evals": {"arc_challenge": {"n": 6}}},
        "budgets": {"lora": {"lora_parameters": 10}}, "command": "geoprobe compare …"}))
    return folder, truth


def test_reread_scores_the_answer_before_the_leaked_turn(tmp_path):
    script = _script()
    folder, truth = _folder(tmp_path)
    out = tmp_path / "reread"
    assert script.main([str(folder), "--check"]) == 0
    assert not out.exists()
    assert script.main([str(folder), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["table"]["arc_challenge"]
    for run, correct in truth.items():
        record = json.loads((out / "runs" / f"{run}.json").read_text())
        assert record["eval"]["arc_challenge"]["correct"] == correct, run
        assert record["eval"]["arc_challenge"]["accuracy"] == pytest.approx(sum(correct) / 6), run
        assert record["eval"]["arc_challenge"]["n_unreadable"] == 0, run
    assert rows["lora"]["mean"] == pytest.approx((4 / 6 + 2 / 6) / 2)
    hyp = [sum(truth[f"hyplora-seed{k}"]) / 6 - sum(truth[f"lora-seed{k}"]) / 6 for k in (0, 1)]
    assert rows["hyplora"]["difference"]["mean"] == pytest.approx(sum(hyp) / 2)
    counts = summary["reread"]["counts"]
    assert counts == {"answers": 30, "cut": 24, "changed_readings": 30, "now_correct": sum(map(sum, truth.values())),
                      "now_wrong": 0, "unreadable_before": 30, "unreadable_after": 0}
    assert summary["budgets"] == {"lora": {"lora_parameters": 10}} and summary["notes"][0].startswith("Re-read")
    assert (out / "report.html").is_file()


def test_reread_refuses_answers_that_do_not_line_up_with_the_set(tmp_path):
    script = _script()
    folder, _ = _folder(tmp_path)
    path = folder / "predictions" / "lora-seed0.json"
    record = json.loads(path.read_text())
    record["predictions"]["arc_challenge"][0]["gold"] = "answer4"
    path.write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="do not line up"):
        script.main([str(folder), "--check"])


def test_against_a_stopped_rerun_counts_the_answers_that_read_alike(tmp_path, capsys):
    """A rerun folder whose stopped answers are the first labels reads alike on every answer but the one
    changed here; the count is kept in the summary."""
    script = _script()
    folder, truth = _folder(tmp_path)
    rerun = tmp_path / "rerun" / "predictions"
    rerun.mkdir(parents=True)
    total = 0
    for path in (folder / "predictions").glob("*.json"):
        record = json.loads(path.read_text())
        for p in record["predictions"]["arc_challenge"]:
            p["extracted"] = script.extract_prediction(script.cut_at_chat_turn(p["generated"]), p["task"],
                                                       ("answer1", "answer2", "answer3", "answer4"), p["gold"])
            total += 1
        if path.stem == "lora-seed1":
            record["predictions"]["arc_challenge"][2]["extracted"] = "answer4"
        (rerun / path.name).write_text(json.dumps(record))
    assert script.main([str(folder), "--out", str(tmp_path / "out"), "--against", str(tmp_path / "rerun")]) == 0
    got = json.loads((tmp_path / "out" / "summary.json").read_text())["reread"]["agreement"]
    assert (got["answers"], got["same_reading"]) == (total, total - 1) == (30, 29)
    assert got["runs"]["lora-seed1"] == {"answers": 6, "same_reading": 5}
