"""The tiny stand-ins every adapter test builds on: a lossless byte-level BPE tokenizer and random
Llama and BERT models, the same weights for the same seed. One factory per model; each test module
passes the shape it has always used (vocabulary, widths, positions), so a given call builds exactly
the model it did before."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def bpe_tokenizer(vocab_size: int = 400, n_topics: int = 30):
    """Byte-level BPE (BOS `<s>` prepended, EOS `</s>` defined, no pad), trained on the first
    `n_topics` of CPython's reference prose; cached, so every caller of one shape shares it."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:n_topics], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, *, vocab: int | None = None, hidden: int = 64, inter: int | None = None,
               layers: int = 2, positions: int = 1024, tokenizer=None, dtype: torch.dtype | None = None):
    """A random LlamaForCausalLM in eval mode (4 heads, 2 key/value heads), the same weights for the
    same seed. `inter` defaults to 2·hidden. With a `tokenizer` (the default BPE one when neither it
    nor `vocab` is given) the vocabulary is its length and BOS/EOS are its tokens, with no pad;
    otherwise the ids are LlamaConfig's defaults."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None and vocab is None:
        tokenizer = bpe_tokenizer()
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=None)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden,
                      intermediate_size=inter or 2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=positions, **special)
    model = LlamaForCausalLM(cfg)
    return (model if dtype is None else model.to(dtype)).eval()


def tiny_bert(seed: int = 0, vocab: int = 120):
    """A random BertModel encoder (hidden 64, 2 layers), the same weights for the same seed."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128)
    return BertModel(cfg).eval()
