"""The training loss: Σ −log p over the answer tokens, with logits computed at the answer
positions only; for a sequence classifier, Σ −log p(y | x) over the examples, from the head's logits.

For one optimizer step over micro-batches b = 1…G,

    L = Σ_b Σ_{t ∈ answer(b)} −log p(x_t | x_<t) / N,   N = number of answer tokens in all G micro-batches,

so accumulating G micro-batches gives exactly the gradient of the concatenated batch. Only answer
tokens count: the prompt is labelled −100 by :func:`adapters.data.tokenize_for_training` (the
LLM-Adapters / Alpaca-LoRA recipe). The output layer receives only the hidden states at the answer
positions (a forward pre-hook), so logits, softmax and their gradients cover the answer tokens and not
the prompt or the padding.

A sequence classifier (an encoder with a classification head, :func:`class_loss_sum`) is trained on
the cross-entropy of its head's logits z ∈ R^C against the class id y of each example,

    L = Σ_b Σ_{i ∈ b} −log softmax(z_i)_{y_i} / N,   N = number of examples in all G micro-batches,

the same sum-then-divide rule, with examples in place of answer tokens.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..data import IGNORE_INDEX

__all__ = ["answer_targets", "answer_loss_sum", "batch_loss", "class_loss_sum"]


def answer_targets(labels: Any) -> tuple[Any, Any]:
    """Where the loss is taken in a (B, T) label tensor: the flat indices b·T + t of the positions
    whose logits predict an answer token (``labels[b, t + 1] != -100``) and those tokens, in
    row-major order. Computed wherever ``labels`` lives; on the host it costs no device round trip."""
    import torch

    width = labels.shape[1]
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    return rows * width + cols, labels[rows, cols + 1]


def answer_loss_sum(model: Any, inputs: dict[str, Any], index: Any, target: Any, *, head: Any = None,
                    fused: Optional[Callable[..., Any]] = None) -> Any:
    """Σ_k −log p(target_k | position index_k) for the model called on ``inputs`` (no labels).

    ``index`` / ``target`` come from :func:`answer_targets` (on the model's device). The output layer
    is fed only the hidden states at ``index`` (a forward pre-hook on ``get_output_embeddings()``),
    so the vocabulary projection, the logits and the softmax cover the answer positions alone: the
    same rows of logits as ``logits.flatten(0, 1)[index]``, without computing the rest. When the
    model's output layer is not called on the full (B, T, H) hidden states (the hook does not apply),
    the full logits are computed and the rows gathered. No host synchronisation. The sum is taken in
    float32 for half-precision logits (float64 logits stay float64). ``head``: the output layer, for a
    ``model`` that does not expose it (a DDP wrapper); by default ``model.get_output_embeddings()``.

    ``fused``: a fused linear cross-entropy ``fused(W, rows, target, b)`` = Σ_k −log softmax(rows_k Wᵀ +
    b)_{target_k} (:func:`adapters.train.fast.fused_cross_entropy`, for a plain linear ``head``). Then the
    hook keeps the answer rows and hands the output layer none (its logits are a 0 × V tensor), and the
    loss is ``fused(head.weight, rows, target, head.bias)``: the logits are never held whole (Liger's
    kernel counts the targets on the host, one synchronisation per call). When the hook does not apply,
    or there is no answer row, the plain path below is taken. Without ``fused`` the plain path is the
    reference, unchanged.
    """
    import torch
    import torch.nn.functional as F

    ids = inputs.get("input_ids")
    shape = tuple(ids.shape) if ids is not None else tuple(inputs["inputs_embeds"].shape[:2])
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    fed: list[Any] = []
    if fused is not None and index.numel() == 0:
        fused = None  # no answer rows: the plain loss is an empty sum

    def pick(module: Any, args: tuple) -> Optional[tuple]:
        if fed or not args or not torch.is_tensor(args[0]) or args[0].dim() != 3 or tuple(args[0].shape[:2]) != shape:
            return None
        hidden = args[0]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        fed.append(rows)
        return (rows[:0] if fused is not None else rows, *args[1:])

    handle = head.register_forward_pre_hook(pick) if isinstance(head, torch.nn.Module) else None
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if fused is not None and fed and logits.dim() == 2 and logits.shape[0] == 0:
        return fused(head.weight, fed[0], target, head.bias)
    if fed and logits.dim() == 2 and logits.shape[0] == index.numel():
        sel = logits
    else:
        sel = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
    if sel.dtype in (torch.float16, torch.bfloat16):
        sel = sel.float()
    return F.cross_entropy(sel, target, reduction="sum")


def batch_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """(Σ of −log p over the answer tokens of ``batch``, number of those tokens).

    Logits at position t predict token t + 1; positions labelled −100 are skipped. Packed batches
    (with ``position_ids``) are run without an attention mask; every batch with ``use_cache=False``.
    The sum is taken in float32 for half-precision logits (float64 logits stay float64); logits are
    computed at the answer positions only (:func:`answer_loss_sum`). Labels on a GPU cost one
    synchronisation here (to count the tokens); the training loop counts on the host instead.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    index, target = answer_targets(labels)
    return answer_loss_sum(model, inputs, index, target), int(index.numel())


def class_loss_sum(model: Any, inputs: dict[str, Any], target: Any) -> Any:
    """Σ_i −log softmax(z_i)_{target_i} for a sequence classifier called on ``inputs`` (no labels):
    the cross-entropy of the head's logits z (B, C) against the class ids ``target`` (B,), summed, in
    float32 for half-precision logits."""
    import torch
    import torch.nn.functional as F

    logits = model(**inputs).logits
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, target, reduction="sum")
