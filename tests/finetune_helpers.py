"""Small, fast stand-ins shared by the adapter build/train tests: a lossless byte-level BPE tokenizer,
tiny random Llama and BERT models, a model folder the command line can load, and arithmetic word
problems in the GSM8K format."""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo


@functools.lru_cache(maxsize=None)
def bpe_tokenizer():
    """Byte-level BPE (BOS prepended, EOS defined, no pad), trained on CPython's reference prose."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:30], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, vocab: int | None = None, hidden: int = 64, layers: int = 2):
    """A random LlamaForCausalLM (hidden 64, 2 layers), the same weights for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, vocab: int = 120):
    """A random BertModel encoder (hidden 64, 2 layers), the same weights for the same seed."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128)
    return BertModel(cfg).eval()


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
