"""Read a comparison's stored generations again as if generation had stopped at the end token: every
answer cut where the text of a leaked chat turn begins, then read and scored by the same rules, and the
comparison's summary, table and report made again from the re-read runs.

Why this is sound. Greedy decoding is causal: the tokens a sequence produces before its end token do not
depend on whether decoding stops there, so an answer that ran on past its end token holds, up to that
token, the answer a stopped generation gives. Only what follows is extra. SmolLM2's chat turns are
`<|im_end|>` `<|im_start|>` ROLE `\\n`, and the answers are decoded without special tokens, so a leaked
turn reads as its role word (`system`, `user`, `assistant`) followed by a line break, glued to the answer
(`the correct answer is answer2assistant\\n…`) or on a line of its own. The cut is at the first role word
followed by a line break or by the end of the text; text without one is read whole. Two caveats: batched
decoding drops finished rows, so a stopped run's batches differ from these in bfloat16 rounding, which
can flip a greedy choice where two tokens nearly tie; and a role word that ends a real word of an answer
(`…user` at a line's end) would be cut too. The script counts the answers it cuts and the readings that
change.

    python benchmarks/reread_generations.py reports/experiments/commonsense-smollm2/generation-not-stopped \\
        --out reports/experiments/commonsense-smollm2/reread-at-end-token

FOLDER holds `summary.json`, `runs/` and the generations (`predictions/` or `predictions.tar.xz`); the
evaluation sets are read from the paths in the summary's settings (relative to the repository), or from
--data-root with the same last two path parts, and must match the stored gold labels. --check only
counts (nothing is written). --against FOLDER counts how many re-read answers read as those of a rerun
whose generation stopped (the check of the cut).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.data import load_examples  # noqa: E402
from adapters.evaluate import extract_prediction, is_correct  # noqa: E402
from geoprobe.compare.workflow import format_table, summarize  # noqa: E402
from geoprobe.records import write_json  # noqa: E402
from geoprobe.report.comparison import render_comparison  # noqa: E402

CHAT_TURN = re.compile(r"(?:system|user|assistant)(?=\n|$)")
RULE = ("each answer cut at its first chat-role word (system, user, assistant) followed by a line break or "
        "the end of the text: where a leaked chat turn begins once the special tokens are left out")
# What a summary carries beyond summarize()'s result, taken over from the stored summary unchanged.
KEPT = ("budgets", "protocol", "plans", "command", "jobs", "after")


def cut_at_chat_turn(text: str) -> str:
    """``text`` up to the first chat-role word that a line break or the end of the text follows."""
    m = CHAT_TURN.search(text)
    return text if m is None else text[:m.start()]


def _generations(folder: Path) -> dict[str, dict[str, Any]]:
    """Run name → its stored predictions record, from ``predictions/`` or ``predictions.tar.xz``."""
    out = {}
    if (folder / "predictions").is_dir():
        for path in sorted((folder / "predictions").glob("*.json")):
            out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    elif (folder / "predictions.tar.xz").is_file():
        with tarfile.open(folder / "predictions.tar.xz", "r:xz") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".json"):
                    data = tar.extractfile(member)
                    if data is not None:
                        out[Path(member.name).stem] = json.load(io.TextIOWrapper(data, encoding="utf-8"))
    if not out:
        raise SystemExit(f"{folder}: no stored generations (predictions/ or predictions.tar.xz)")
    return out


def _eval_examples(settings: dict[str, Any], data_root: Optional[Path]) -> dict[str, list]:
    """Each evaluation set's examples as the comparison read them (its first n)."""
    sets = {}
    for name, rel in settings["paths"]["evals"].items():
        path = Path(rel)
        if data_root is not None:
            path = data_root / Path(*path.parts[-2:])
        elif not path.is_absolute():
            path = REPO / path
        sets[name] = load_examples(path, limit=settings["evals"][name]["n"])
    return sets


def reread(folder: Path, settings: dict[str, Any], data_root: Optional[Path] = None
           ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, dict[str, list]]]:
    """The run records of ``folder`` (a comparison of these ``settings``) re-scored on the cut answers,
    counts of what changed, and every run's new readings per set."""
    examples = _eval_examples(settings, data_root)
    generations = _generations(folder)
    runs, readings = {}, {}
    counts = {"answers": 0, "cut": 0, "changed_readings": 0, "now_correct": 0, "now_wrong": 0,
              "unreadable_before": 0, "unreadable_after": 0}
    for path in sorted((folder / "runs").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        name = record["run"]
        new = copy.deepcopy(record)
        for ev, score in record["eval"].items():
            preds = generations[name]["predictions"][ev]
            exs = examples[ev]
            if len(preds) != len(exs) or any(str(p["gold"]) != str(ex.label) for p, ex in zip(preds, exs)):
                raise SystemExit(f"{name}: {ev}: the stored answers do not line up with the set's gold labels")
            correct, unreadable = [], 0
            read = readings.setdefault(name, {}).setdefault(ev, [])
            for p, ex in zip(preds, exs):
                text = cut_at_chat_turn(p["generated"])
                pred = extract_prediction(text, p["task"], ex.choices, ex.label)
                read.append(pred)
                ok = is_correct(pred, ex.label, p["task"])
                correct.append(int(ok))
                unreadable += pred is None
                counts["answers"] += 1
                counts["cut"] += text != p["generated"]
                counts["changed_readings"] += pred != p["extracted"]
                counts["now_correct"] += ok and not p["correct"]
                counts["now_wrong"] += p["correct"] and not ok
            counts["unreadable_before"] += score["n_unreadable"]
            counts["unreadable_after"] += unreadable
            acc = sum(correct) / len(correct)
            e = new["eval"][ev]
            if e.get("metric", "accuracy") != "accuracy":
                raise SystemExit(f"{name}: {ev}: only accuracy is re-read (the set's headline is {e['metric']})")
            e.update(accuracy=acc, score=acc, n_correct=sum(correct), n_unreadable=unreadable, correct=correct)
            e["metrics"] = {**e.get("metrics", {}), "accuracy": acc}
        new["reread"] = {"rule": RULE, "from": str(path.relative_to(folder.parent))}
        runs[name] = new
    return runs, counts, readings


def agreement(readings: dict[str, dict[str, list]], other: Path) -> dict[str, Any]:
    """How many of the re-read answers read as the stored answers of ``other`` (a comparison of the same
    runs whose generation did stop at the end token) read: per run and in all, over the runs and sets
    both hold."""
    theirs = _generations(other)
    per_run, agree, total = {}, 0, 0
    for name in sorted(set(readings) & set(theirs)):
        same = n = 0
        for ev, mine in readings[name].items():
            stored = theirs[name]["predictions"].get(ev)
            if stored is None:
                continue
            if len(stored) != len(mine):
                raise SystemExit(f"{other}: {name}: {ev} holds {len(stored)} answers, the re-read run {len(mine)}")
            same += sum(a == p["extracted"] for a, p in zip(mine, stored))
            n += len(mine)
        per_run[name] = {"answers": n, "same_reading": same}
        agree, total = agree + same, total + n
    return {"against": str(other), "answers": total, "same_reading": agree, "runs": per_run}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a comparison folder with summary.json, runs/ and the generations")
    ap.add_argument("--out", type=Path, help="where to write the re-read runs, summary.json and report.html")
    ap.add_argument("--data-root", type=Path, help="folder of the evaluation sets (default: the summary's paths)")
    ap.add_argument("--check", action="store_true", help="only count what the cut changes")
    ap.add_argument("--against", type=Path, help="a rerun of the same comparison whose generation stopped: "
                                                 "count how many re-read answers read as its answers")
    args = ap.parse_args(argv)
    old = json.loads((args.folder / "summary.json").read_text(encoding="utf-8"))
    runs, counts, readings = reread(args.folder, old["settings"], args.data_root)
    print(json.dumps(counts))
    against = agreement(readings, args.against) if args.against is not None else None
    if against is not None:
        print(json.dumps({k: v for k, v in against.items() if k != "runs"}))
    if args.check:
        return 0
    if args.out is None:
        ap.error("--out is needed unless --check is given")
    summary = summarize(runs, old["methods"], len(old["seeds"]), settings=old["settings"])
    summary["budget"] = {**old.get("budget", {}), **{k: v for k, v in summary["budget"].items() if v is not None}}
    for key in KEPT:
        if key in old:
            summary[key] = old[key]
    summary["notes"].insert(0, f"Re-read from the stored generations of {args.folder.name}/ ({RULE}); "
                               f"{counts['cut']:,} of {counts['answers']:,} answers were cut and "
                               f"{counts['changed_readings']:,} readings changed. The training is that run's.")
    summary["reread"] = {"rule": RULE, "source": args.folder.name, "counts": counts, "agreement": against,
                         "command": "python benchmarks/reread_generations.py "
                                    + " ".join(map(str, argv if argv is not None else sys.argv[1:]))}
    for name, record in runs.items():
        write_json(args.out / "runs" / f"{name}.json", record)
    write_json(args.out / "summary.json", summary)
    render_comparison(summary, args.out / "report.html")
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
