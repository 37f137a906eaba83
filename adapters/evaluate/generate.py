"""Greedy generation for evaluation, fast on a GPU and plain on a CPU.

How a call runs (:func:`generate_answers`):

1. **Batch size.** Given, or chosen by :func:`auto_batch_size`: on CUDA from the free memory and the
   KV cache one sequence needs, ``layers × 2 × kv_heads × head_dim × (prompt + new tokens) × dtype
   bytes`` (:func:`kv_cache_bytes_per_token`), plus the activations of its prompt's forward pass;
   half the free memory is spent, at most :data:`MAX_AUTO_BATCH` sequences. On a CPU the batch is
   :data:`CPU_BATCH`, where larger batches stop paying.
2. **Length-sorted batches.** Prompts are sorted by token length (longest first, so an
   out-of-memory shows at once) and left-padded within a batch; answers come back in input order.
3. **Greedy decoding with early stops** (:func:`greedy_batch`): one prefill forward that keeps only
   the last position's logits, then one token per step with a dynamic KV cache; a sequence stops at
   its end token, and finished sequences are dropped from the batch (rows of the cache, mask and
   positions selected away) once they are a sixteenth of it or more — until then they are carried
   along and ignored. Each sequence sees exactly what it would alone: its own positions
   (``cumsum(mask) − 1``, as ``transformers`` computes them) and a mask that hides the padding.
4. **Static cache (CUDA only, opt-in).** ``static_cache=True`` on a CUDA model runs each batch
   through ``model.generate`` with ``cache_implementation="static"``, which ``transformers`` compiles
   (``torch.compile``, CUDA graphs) on CUDA; every batch is padded to the longest prompt and the full
   batch size so one compiled graph serves them all, and finished sequences are masked rather than
   dropped. Compiling costs tens of seconds, so it pays only on long evaluations;
   ``benchmarks/bench_eval_gpu.py`` measures both. On a CPU the flag is refused with a clear error.

The answers equal those of ``model.generate(do_sample=False)`` run one prompt at a time (tested on the
embedded SmolLM2 and on a random Llama with mixed prompt lengths).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional, Sequence

from geoprobe.errors import DataFormatError, InputDataError

log = logging.getLogger(__name__)

__all__ = ["generate_answers", "greedy_batch", "auto_batch_size", "kv_cache_bytes_per_token",
           "CPU_BATCH", "MAX_AUTO_BATCH"]

CPU_BATCH = 16
"""Batch size on a CPU: the forward pass is compute-bound there, so larger batches gain little."""
MAX_AUTO_BATCH = 1024
"""Largest batch :func:`auto_batch_size` picks: beyond it a decoding step is compute-bound on any GPU."""
MEMORY_FRACTION = 0.5
"""Share of the free GPU memory the KV caches and activations of one batch may take."""
DROP_FRACTION = 16
"""Finished sequences are dropped from a batch once they are at least 1/DROP_FRACTION of it."""


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_cache_bytes_per_token(model: Any, dtype: Any = None) -> int:
    """Bytes of KV cache one token of one sequence takes: ``layers × 2 × kv_heads × head_dim × bytes``
    (keys and values of every layer; ``dtype`` defaults to the model's)."""
    import torch

    cfg = _text_config(model)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = dtype or next(model.parameters()).dtype
    return int(cfg.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size())


def _sequence_bytes(model: Any, prompt_tokens: int, max_new_tokens: int) -> int:
    """Memory one sequence of a batch needs: its KV cache at full length, plus the transient
    activations of its prompt's forward pass (hidden states and MLP of one layer, attention scores
    of one layer, the last position's logits in float32)."""
    import torch

    cfg = _text_config(model)
    dtype_bytes = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    kv = kv_cache_bytes_per_token(model) * (prompt_tokens + max_new_tokens)
    activations = prompt_tokens * (6 * hidden + 3 * inter) * dtype_bytes
    scores = cfg.num_attention_heads * prompt_tokens * prompt_tokens * 4
    logits = 2 * cfg.vocab_size * 4
    return int(kv + activations + scores + logits)


def auto_batch_size(model: Any, prompt_tokens: int, max_new_tokens: int, device: Any,
                    n_prompts: Optional[int] = None) -> int:
    """The batch size for generating ``max_new_tokens`` after prompts of up to ``prompt_tokens``
    tokens: on CUDA, ``MEMORY_FRACTION`` of the free memory divided by one sequence's KV cache and
    prompt activations (at most :data:`MAX_AUTO_BATCH`); elsewhere :data:`CPU_BATCH`. Never more
    than ``n_prompts`` when given, never less than 1."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        from geoprobe.runtime import cuda_free_bytes

        per_sequence = _sequence_bytes(model, prompt_tokens, max_new_tokens)
        size = min(MAX_AUTO_BATCH, int(MEMORY_FRACTION * cuda_free_bytes(device)) // max(per_sequence, 1))
    else:
        size = CPU_BATCH
    if n_prompts is not None:
        size = min(size, n_prompts)
    return max(1, size)


def end_token_ids(model: Any, tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """The end tokens of the model's generation config (else the tokenizer's), then ``extra``."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return ids + [int(e) for e in extra if e is not None and int(e) not in ids]


def _forward_names(model: Any) -> tuple[str, bool]:
    """The name the model's forward gives its KV cache argument (``cache`` in recent
    ``transformers``, ``past_key_values`` before) and whether it takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def greedy_batch(model: Any, input_ids: Any, attention_mask: Any, *, max_new_tokens: int, eos_ids: Sequence[int],
                 on_finished: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """Greedy continuations of one left-padded batch: the new token ids of each row, up to and
    including its end token (or ``max_new_tokens`` of them).

    Finished rows are dropped from the batch once they make up 1/:data:`DROP_FRACTION` of it;
    ``on_finished(k)`` is called as ``k`` more rows finish.
    """
    import torch
    from transformers import DynamicCache

    cache_name, keeps_logits = _forward_names(model)
    extra = {"logits_to_keep": 1} if keeps_logits else {}
    n = input_ids.shape[0]
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache()
    rows = torch.arange(n, device=input_ids.device)  # original row of each batch row
    done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(list(eos_ids) or [-1], device=input_ids.device)
    out: list[list[int]] = [[] for _ in range(n)]
    tokens = input_ids
    for step in range(max_new_tokens):
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_name: cache}, **extra).logits[:, -1]
        nxt = logits.argmax(dim=-1)
        live = ~done
        for r, t in zip(rows[live].tolist(), nxt[live].tolist()):
            out[r].append(t)
        newly = live & torch.isin(nxt, eos)
        n_new = int(newly.sum())
        if n_new and on_finished is not None:
            on_finished(n_new)
        done = done | newly
        n_done = int(done.sum())
        if n_done == len(rows) or step == max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        tokens = nxt[:, None]
        if n_done and n_done * DROP_FRACTION >= len(rows):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, done, mask, positions, tokens = rows[keep], done[keep], mask[keep], positions[keep], tokens[keep]
    if on_finished is not None and int((~done).sum()):
        on_finished(int((~done).sum()))
    return out


def _static_batch(model: Any, tokenizer: Any, prompts: Sequence[str], *, width: int, batch_size: int,
                  max_new_tokens: int, eos_ids: Sequence[int], device: Any) -> list[list[int]]:
    """One batch through ``model.generate`` with a static KV cache (compiled by ``transformers`` on
    CUDA), padded to ``width`` prompt tokens and ``batch_size`` rows so every batch has one shape."""
    from transformers import GenerationConfig

    filled = list(prompts) + [prompts[-1]] * (batch_size - len(prompts))
    enc = tokenizer(filled, return_tensors="pt", padding="max_length", max_length=width, add_special_tokens=True)
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=list(eos_ids) or None,
                              cache_implementation="static")
    seqs = model.generate(**enc, generation_config=config)[: len(prompts), width:].tolist()
    out = []
    for row in seqs:
        cut = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
        out.append(row[:cut])
    return out


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: Optional[int] = None,
                     max_new_tokens: int = 256, device: Any = None, static_cache: bool = False,
                     progress: bool = False, desc: str = "generating", bar: Any = None,
                     stop_ids: Sequence[int] = ()) -> list[str]:
    """Greedy continuations of ``prompts`` (only the new text, special tokens dropped), in input order.

    A sequence ends at an end token of the model's generation config (as ``model.generate`` ends it)
    or at any of ``stop_ids``.

    ``batch_size`` ``None`` picks one for the device (:func:`auto_batch_size`; the choice is logged).
    ``static_cache`` (CUDA only) generates with a compiled static cache (see the module doc).
    ``progress`` shows one bar over all prompts; ``bar`` (a tqdm-like object with ``update``) is
    advanced instead when a caller shows one bar over several calls. The tokenizer is switched to left padding and given
    ``pad_token = eos_token`` when it has none, both restored afterwards; the model is put in eval
    mode and restored.

    Raises:
        InputDataError: ``batch_size`` or ``max_new_tokens`` below 1, ``static_cache`` off CUDA.
        DataFormatError: a tokenizer with neither a pad nor an end token.
    """
    import torch

    from geoprobe.runtime import progress as progress_bar

    if batch_size is not None and batch_size < 1:
        raise InputDataError(f"the evaluation batch size must be ≥ 1, got {batch_size}")
    if max_new_tokens < 1:
        raise InputDataError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    prompts = list(prompts)
    if not prompts:
        return []
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if static_cache and device.type != "cuda":
        raise InputDataError(f"a static, compiled KV cache is for CUDA devices; this model is on {device}")
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise DataFormatError("the tokenizer has neither a pad_token nor an eos_token; set one "
                                      "(tokenizer.pad_token = ...) before generating")
            tokenizer.pad_token = tokenizer.eos_token
        eos_ids = end_token_ids(model, tokenizer, stop_ids)
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        if batch_size is None:
            batch_size = auto_batch_size(model, max(lengths), max_new_tokens, device, n_prompts=len(prompts))
            log.info("evaluation batch size %d on %s (prompts up to %d tokens, %d new tokens)",
                     batch_size, device, max(lengths), max_new_tokens)
        new_ids: list[Optional[list[int]]] = [None] * len(prompts)
        own_bar = bar is None
        if own_bar:
            bar = progress_bar(len(prompts), desc, enabled=progress, unit="answer")
        model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    batch = [prompts[i] for i in idx]
                    if static_cache:
                        got = _static_batch(model, tokenizer, batch, width=max(lengths), batch_size=batch_size,
                                            max_new_tokens=max_new_tokens, eos_ids=eos_ids, device=device)
                        bar.update(len(idx))
                    else:
                        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=True)
                        got = greedy_batch(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                           max_new_tokens=max_new_tokens, eos_ids=eos_ids, on_finished=bar.update)
                    for i, ids in zip(idx, got):
                        new_ids[i] = ids
        finally:
            if own_bar:
                bar.close()
        return tokenizer.batch_decode([ids or [] for ids in new_ids], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = saved_side
        tokenizer.pad_token = saved_pad
        model.train(was_training)
