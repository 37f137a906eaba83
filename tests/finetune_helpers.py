"""Small, fast stand-ins shared by the adapter train tests: a model folder the command line can load
(a tiny Llama of `tiny_models` with its tokenizer), and arithmetic word problems in the GSM8K format."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tiny_models import bpe_tokenizer, tiny_llama

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo


def write_model_folder(folder: Path, seed: int = 0) -> Path:
    """Save a tiny Llama and its tokenizer as a local model folder (safetensors)."""
    model = tiny_llama(seed)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return folder


def arithmetic_problems(n: int, seed: int = 0) -> list[dict[str, str]]:
    """GSM8K-style records {question, answer} with a rationale and a final '#### k' line."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        out.append({"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                    "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return out


def write_problems(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_problems(n, seed)), encoding="utf-8")
    return path
