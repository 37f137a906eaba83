"""Batched greedy generation for evaluation: left padding, length-sorted batches, answers back in
input order."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from geoprobe.errors import DataFormatError

__all__ = ["generate_answers"]


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 8,
                     max_new_tokens: int = 256, device: Any = None) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding; returns only the new text.

    Prompts are sorted by token length so each batch pads little, and answers come back in input
    order. The tokenizer is switched to left padding (decoder-only models must see the prompt end
    right before the first generated token) and given ``pad_token = eos_token`` when it has none,
    both restored afterwards; the attention mask keeps padding out, so batching does not change
    the greedy output. Special tokens are dropped from the decoded text.
    """
    import torch
    from transformers import GenerationConfig

    if batch_size < 1:
        raise DataFormatError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise DataFormatError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = list(prompts)
    if not prompts:
        return []
    if device is None:
        device = next(model.parameters()).device
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise DataFormatError("the tokenizer has neither a pad_token nor an eos_token; set one "
                                      "(tokenizer.pad_token = ...) before generating")
            tokenizer.pad_token = tokenizer.eos_token
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        out: list[Optional[str]] = [None] * len(prompts)
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=True)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                seqs = model.generate(**enc, generation_config=config)
                new = seqs[:, enc["input_ids"].shape[1]:]
                for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    out[i] = text
    finally:
        tokenizer.padding_side = saved_side
        tokenizer.pad_token = saved_pad
        model.train(was_training)
    return [o if o is not None else "" for o in out]
