"""Data preparation and generation-based evaluation, ours beside the LLM-Adapters way, on GSM8K.

1. Tokenising for training: ``adapters.data.tokenize_for_training`` (batched, prompt and answer
   tokenised apart) against LLM-Adapters' ``generate_and_tokenize_prompt`` recipe (per example:
   tokenise prompt+answer, tokenise the prompt again, mask its length), with the number of examples
   whose mask boundary differs.
2. Padding: batches of 8 padded to their longest example (LLM-Adapters) against ``pack`` rows.
3. Generation: ``generate_answers`` with left-padded batches of 8 against one prompt at a time
   (LLM-Adapters' math ``evaluate.py``), on a small random Llama; the outputs must be identical.

The tokenizer is a byte-level BPE trained on the GSM8K training questions (no hub access here).
Run: python benchmarks/bench_data_eval.py   → appends a run to benchmarks/results/data_eval.json
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.data import IGNORE_INDEX, format_prompt, load_examples, pack, tokenize_for_training  # noqa: E402
from adapters.evaluate import generate_answers  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gsm8k"


def bpe_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def llm_adapters_tokenize(examples, tok, max_length: int) -> list[dict]:
    """LLM-Adapters finetune.py: tokenize(full) with truncation, tokenize(prompt), mask its length."""
    out = []
    for ex in examples:
        prompt = format_prompt(ex)
        full = tok(prompt + ex.answer, truncation=True, max_length=max_length)["input_ids"]
        if len(full) < max_length:
            full = full + [tok.eos_token_id]
        n_prompt = len(tok(prompt, truncation=True, max_length=max_length)["input_ids"])
        out.append({"input_ids": full, "labels": [IGNORE_INDEX] * n_prompt + full[n_prompt:]})
    return out


def main() -> None:
    torch.set_num_threads(1)
    train = load_examples(DATA / "train.jsonl")
    test = load_examples(DATA / "test.jsonl")
    tok = bpe_tokenizer([e.prompt + "\n" + e.answer for e in train])
    max_length = 512

    t0 = time.perf_counter()
    ours = tokenize_for_training(train, tok, max_length=max_length)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = llm_adapters_tokenize(train, tok, max_length)
    t_theirs = time.perf_counter() - t0
    boundary_differs = sum(
        a["labels"] != b["labels"] or a["input_ids"] != b["input_ids"] for a, b in zip(ours, theirs))

    t0 = time.perf_counter()
    packed = pack(ours, max_length)
    t_pack = time.perf_counter() - t0
    n_tokens = sum(len(r["input_ids"]) for r in ours)
    padded_unpacked = sum(8 * max(len(r["input_ids"]) for r in ours[i:i + 8]) for i in range(0, len(ours), 8))
    packed_rows = sorted(len(r["input_ids"]) for r in packed)
    padded_packed = sum(8 * max(packed_rows[i:i + 8]) for i in range(0, len(packed_rows), 8))

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    prompts = [format_prompt(e) for e in test[:32]]
    new_tokens = 32
    generate_answers(model, tok, prompts[:2], max_new_tokens=2)  # warm-up
    t0 = time.perf_counter()
    batched = generate_answers(model, tok, prompts, batch_size=8, max_new_tokens=new_tokens)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = generate_answers(model, tok, prompts, batch_size=1, max_new_tokens=new_tokens)
    t_single = time.perf_counter() - t0

    result = {
        "benchmark": "data preparation and batched generation (GSM8K)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1, "
                   f"load average {os.getloadavg()[0]:.1f}",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "tokenize": {"examples": len(train), "max_length": max_length,
                     "ours_s": round(t_ours, 3), "llm_adapters_recipe_s": round(t_theirs, 3),
                     "speedup": round(t_theirs / t_ours, 2),
                     "examples_where_the_two_differ": boundary_differs},
        "packing": {"tokens": n_tokens, "pack_s": round(t_pack, 3), "packed_rows": len(packed),
                    "padded_tokens_batches_of_8_unpacked": padded_unpacked,
                    "padded_tokens_batches_of_8_packed": padded_packed,
                    "useful_fraction_unpacked": round(n_tokens / padded_unpacked, 4),
                    "useful_fraction_packed": round(n_tokens / padded_packed, 4)},
        "generation": {"model": "random Llama, hidden 128, 2 layers, float32", "prompts": len(prompts),
                       "max_new_tokens": new_tokens, "batched_8_s": round(t_batched, 3),
                       "one_at_a_time_s": round(t_single, 3), "speedup": round(t_single / t_batched, 2),
                       "outputs_identical": batched == single},
        "command": "python benchmarks/bench_data_eval.py",
    }
    append_run(results_path("data_eval"), result, label="cpu")
    import json
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
