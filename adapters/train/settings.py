"""The hyperparameters of one fine-tune run and the learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from geoprobe.errors import AdapterError
from geoprobe.profile import Record

__all__ = ["TrainSettings", "lr_factor", "NOT_COMPARED", "FLAGS", "MAX_SEED"]

NOT_COMPARED = ("save_every", "keep_checkpoints", "log_every", "fast_kernels", "compile", "compile_mode",
                "gradient_checkpointing")
"""Settings a resumed run may change: they steer bookkeeping, which kernels compute the same step or which
activations are kept for it, not the trained weights' definition (the fast kernels, the compiled blocks and
activation checkpointing agree with the plain path to rounding)."""

FLAGS = {"lr": "--lr", "epochs": "--epochs", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
         "max_steps": "--max-steps", "max_length": "--max-length", "warmup_ratio": "--warmup-ratio",
         "seed": "--seed", "save_every": "--save-every", "balance_coef": "--balance", "pack": "--no-pack",
         "fast_kernels": "--no-fast-kernels", "compile": "--compile", "compile_mode": "--compile-mode",
         "gradient_checkpointing": "--gradient-checkpointing"}
"""The command-line flag of each setting that has one; messages name the flag the user typed."""

MAX_SEED = 2 ** 64 - 1
"""The largest seed: torch's generators take 64-bit seeds."""


@dataclass(frozen=True)
class TrainSettings(Record):
    """Hyperparameters of one fine-tune run (all recorded in the results).

    ``epochs`` may be fractional; ``max_steps`` (optimizer steps) overrides it. ``warmup_ratio`` is
    the fraction of the steps spent warming up (W = ⌈ratio·T⌉). ``balance_coef`` > 0 switches on
    HydraLoRA's load-balancing loss with that weight. ``log_every``: the losses stay on the device and
    are read every ``log_every`` steps (and at every checkpoint and the last step); every step's loss
    is recorded all the same, so it changes when a non-finite loss is noticed, not the results.
    ``fast_kernels``: use Liger-Kernel's fused kernels where they apply (a CUDA model, liger-kernel
    installed; :mod:`adapters.train.fast`); False (``--no-fast-kernels``) keeps the plain path everywhere.
    ``compile``: compile the transformer blocks with ``torch.compile`` (``--compile``;
    :mod:`adapters.train.compiled`), for launch-bound steps of small models; ``compile_mode`` is
    ``torch.compile``'s mode for them (:data:`adapters.train.compiled.MODES`; ``--compile-mode MODE``):
    ``"auto"`` (the default) replays each compiled block's kernels as a CUDA graph on CUDA
    (``"reduce-overhead"``) and compiles plainly elsewhere. ``gradient_checkpointing``: keep only each
    transformer block's input for backward and run the block again there (``--gradient-checkpointing``;
    :mod:`adapters.train.checkpointing`), for large models whose activations do not fit.
    """

    lr: float = 3e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: Optional[int] = None
    max_length: int = 256
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    pack: bool = True
    template: str = "alpaca"
    balance_coef: float = 0.0
    log_every: int = 10
    fast_kernels: bool = True
    compile: bool = False
    compile_mode: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not _positive_number(self.lr):
            raise self._bad("lr", "a positive number")
        if not _positive_number(self.epochs):
            raise self._bad("epochs", "a positive number")
        for name in ("batch_size", "grad_accum", "save_every", "keep_checkpoints", "log_every"):
            self._positive_int(name)
        self._positive_int("max_length", 2)
        if self.max_steps is not None:
            self._positive_int("max_steps")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0.0 <= self.warmup_ratio < 1.0):
            raise self._bad("warmup_ratio", "in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise self._bad("weight_decay", "≥ 0")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise self._bad("max_grad_norm", "a positive number or None")
        if not (math.isfinite(self.balance_coef) and self.balance_coef >= 0):
            raise self._bad("balance_coef", "≥ 0")
        if not isinstance(self.fast_kernels, bool):
            raise AdapterError(f"training setting fast_kernels = {self.fast_kernels!r}; it must be True or False "
                               f"(the command line's {FLAGS['fast_kernels']} sets it to False)")
        if not isinstance(self.compile, bool):
            raise AdapterError(f"training setting compile = {self.compile!r}; it must be True or False "
                               f"(the command line's {FLAGS['compile']} sets it to True)")
        if not isinstance(self.gradient_checkpointing, bool):
            raise AdapterError(f"training setting gradient_checkpointing = {self.gradient_checkpointing!r}; it must "
                               f"be True or False (the command line's {FLAGS['gradient_checkpointing']} sets it to True)")
        from .compiled import MODES

        if self.compile_mode not in MODES:
            raise AdapterError(f"{FLAGS['compile_mode']} {self.compile_mode!r}: choose one of {', '.join(MODES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise self._bad("seed", "an integer from 0 to 2^64 − 1")

    def _bad(self, name: str, want: str) -> AdapterError:
        value = getattr(self, name)
        if name in FLAGS:
            return AdapterError(f"{FLAGS[name]} {value!r}: it must be {want} (training setting {name})")
        return AdapterError(f"training setting {name} = {value!r}; it must be {want}")

    def _positive_int(self, name: str, minimum: int = 1) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self._bad(name, f"an integer ≥ {minimum}")


def _positive_number(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate for the step with index ``step`` (0-based) of ``total``:
    (step + 1)/warmup during warm-up, then (total − step)/(total − warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / max(total - warmup, 1)
