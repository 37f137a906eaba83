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


STREAMED_SHAPES = {
    # model_type: (config class, model class, extra config) — 3 layers, hidden 64, 4 heads, 2 KV heads
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 6}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 16, "sliding_window": 6,
                     "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    "bert": ("BertConfig", "BertModel", {}),
    "roberta": ("RobertaConfig", "RobertaModel", {}),
}
"""One tiny random shape per model type that layer-by-layer streaming covers."""


def tiny_model(model_type: str, seed: int = 0, *, tokenizer=None, layers: int = 3):
    """A random model of ``model_type`` (a key of :data:`STREAMED_SHAPES`) in eval mode, its vocabulary
    that of ``tokenizer`` (default: the BPE one), the same weights for the same seed. Decoders are causal
    LMs; encoders bare ``BertModel``/``RobertaModel`` (as ``AutoModel`` builds them)."""
    import transformers

    tokenizer = tokenizer or bpe_tokenizer()
    cfg_name, model_name, extra = STREAMED_SHAPES[model_type]
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, max_position_embeddings=256, **extra)
    if model_type in ("bert", "roberta"):
        kw.update(pad_token_id=1 if model_type == "roberta" else 0)
    else:
        kw.update(num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**kw)
    return getattr(transformers, model_name)(config).eval()


def save_sharded(model, folder, *, tokenizer=None, shard_bytes: int = 200_000, dtype: torch.dtype | None = None):
    """Save ``model`` (cast to ``dtype`` when given) as a model folder of several safetensors shards of
    about ``shard_bytes`` each with a ``model.safetensors.index.json``, and ``tokenizer`` (default: the
    BPE one) beside them. Returns the folder as a Path."""
    from pathlib import Path

    folder = Path(folder)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size=shard_bytes)
    (tokenizer or bpe_tokenizer()).save_pretrained(folder)
    return folder
