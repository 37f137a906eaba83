"""Fine-tuning: a plain PyTorch loop over answer-masked, packed examples, with exact resumption.

Objective (:mod:`.loss`). For one optimizer step over micro-batches b = 1…G (gradient accumulation G),

    L = Σ_b Σ_{t ∈ answer(b)} −log p(x_t | x_<t) / N,   N = number of answer tokens in all G micro-batches,

so accumulating G micro-batches gives exactly the gradient of the concatenated batch (the loss is not
averaged per micro-batch). Only answer tokens count: the prompt is labelled −100 by
:func:`adapters.data.tokenize_for_training` (the LLM-Adapters / Alpaca-LoRA recipe). With HydraLoRA's
load balancing on, coef · Σ_layers L_aux / G is added (Switch-Transformer loss, see
:mod:`adapters.hydralora`).

Layout. Short examples are packed into sequences of at most ``max_length`` tokens
(:func:`adapters.data.pack`) whose ``position_ids`` restart at 0 for every example; the model is
called without an attention mask and with ``use_cache=False``, so transformers builds the
block-diagonal causal mask from the position ids (padding-free attention).

Optimisation (:mod:`.trainer`, :mod:`.settings`). AdamW over the adapter parameters only; learning
rate lr·f(s) for the s-th step (s = 0…T−1) with linear warm-up over W steps and linear decay,

    f(s) = (s + 1)/W for s < W,   f(s) = (T − s)/(T − W) otherwise,

which never gives a zero step.

Order and resumption (:mod:`.order`, :mod:`.checkpoints`). Epoch e visits the packed sequences in
the order of a permutation drawn from ``numpy.random.default_rng([seed, e])``, so the data position
is the micro-batch count alone. Every ``save_every`` steps (and at the last step) a checkpoint
``OUT/checkpoints/step-N`` holds the adapter, the optimizer and scheduler states, the torch RNG states,
the step, the micro-batch count and the loss history. ``resume=True`` rebuilds the adapter with the
same seed, restores all of that from the newest checkpoint and continues; on the CPU the result
equals an uninterrupted run bit for bit.

Several processes (:mod:`.parallel`, :mod:`.launch`): ``accelerate launch`` or torchrun starts them
(``geoprobe finetune --num-processes N`` through Accelerate's launcher); each computes its run of every
micro-batch of the same global step (DDP, or FSDP2 for models that do not fit one GPU), and the main
process writes the checkpoints in the one-process format.
"""
from __future__ import annotations


from .checkpoints import ADAPTER, CHECKPOINTS, RESULTS, STATE, check_out, latest_checkpoint, list_checkpoints
from .loss import answer_loss_sum, answer_targets, batch_loss
from .order import Order, data_digest
from .settings import TrainSettings, lr_factor
from .trainer import FinetuneRun, Trainer, finetune

__all__ = [
    "TrainSettings",
    "FinetuneRun",
    "Trainer",
    "finetune",
    "lr_factor",
    "batch_loss",
    "answer_targets",
    "answer_loss_sum",
    "latest_checkpoint",
    "list_checkpoints",
    "check_out",
    "Order",
    "data_digest",
    "CHECKPOINTS",
    "ADAPTER",
    "RESULTS",
    "STATE",
]
