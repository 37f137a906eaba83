"""Compiled transformer blocks for launch-bound training steps (``--compile``).

A small model's training step on a GPU is bound by the host launching kernels, not by the GPU: a
SmolLM2-135M step of 16 × 256 tokens runs hundreds of small kernels per decoder layer (norms, rotary
embedding, attention, the MLP, every adapter's dropout, down- and up-projection and scaled add, and
their backward). ``torch.compile`` of each block (``nn.Module.compile``, the per-block compilation
torchtitan uses) lets Inductor fuse the elementwise work into a few generated kernels; since recent
torch treats a module's parameters as graph inputs, one compiled graph serves every block of the same
class, so the compile is paid at the first steps (about 30 s for a tiny Llama on a CPU, more on a GPU):
one graph for the first block (its input needs no gradient) and one for the others, and once more
with a dynamic sequence length (and batch size) when a step's batch has another shape than the first
(``torch.compile``'s automatic dynamic shapes). Packed rows of ``max_length`` tokens keep the shapes
nearly fixed, so the compiles stay within those few.

What is compiled: the blocks of the model's largest ``nn.ModuleList`` whose entries all share one class
(the decoder layers of a causal LM, the encoder layers of BERT), with the adapter layers inside them;
the embedding, the final norm, the output layer and the loss stay eager (the answer loss picks a
varying number of rows, which would recompile). The numbers equal the eager step to rounding
(``tests/test_train_compiled.py`` on a CPU). It is off by default: the compile costs more than it saves
on short runs, and the gain on a GPU is measured by ``benchmarks/bench_small_train.py`` (row
``lora-compiled``). Not with FSDP (the blocks are sharded units there). When the first compiled step
fails (an operation the compiler cannot take), the trainer logs one line, takes the compiled blocks off
again and redoes the step eagerly (:meth:`Compiled.revert`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from geoprobe.profile import Record

__all__ = ["CompiledBlocks", "Compiled", "find_blocks", "compile_blocks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledBlocks(Record):
    """Whether the run's blocks are compiled: ``applied``, ``reason`` (why not, "" when applied), the
    ``block_class`` and how many blocks (``n_blocks``)."""

    applied: bool
    reason: str = ""
    block_class: Optional[str] = None
    n_blocks: int = 0


def find_blocks(model: Any) -> Optional[Any]:
    """The model's largest ``torch.nn.ModuleList`` whose entries share one class (its transformer
    blocks), or None. A PEFT model is searched through its base model."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    best = None
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and \
                len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
            best = module
    return best


class Compiled:
    """The blocks compiled on one model instance; :meth:`revert` takes the compiled forward off again
    (``nn.Module.compile`` keeps it beside the module's own, which stays as it was)."""

    def __init__(self, blocks: Any) -> None:
        self.blocks = blocks

    def revert(self) -> None:
        for block in self.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; None restores the plain call


def compile_blocks(model: Any, *, enabled: bool, sharded: bool = False) -> tuple[CompiledBlocks, Optional[Compiled]]:
    """Compile the blocks of ``model`` (:func:`find_blocks`) with ``torch.compile`` when
    ``enabled``; (the record, a handle to revert) or (the record saying why not, None). The compile
    itself happens at the first forward."""
    if not enabled:
        return CompiledBlocks(applied=False, reason="off (--compile not given)"), None
    if sharded:
        return CompiledBlocks(applied=False, reason="FSDP shards the blocks"), None
    import torch

    if not hasattr(torch, "compile"):
        return CompiledBlocks(applied=False, reason=f"torch {torch.__version__} has no torch.compile"), None
    blocks = find_blocks(model)
    if blocks is None:
        return CompiledBlocks(applied=False, reason="no list of blocks of one class in the model"), None
    for block in blocks:
        block.compile()  # automatic dynamic shapes: a second sequence length compiles one dynamic graph
    record = CompiledBlocks(applied=True, block_class=type(blocks[0]).__name__, n_blocks=len(blocks))
    log.info("compiled blocks: %d × %s (torch.compile, at the first step)", record.n_blocks, record.block_class)
    return record, Compiled(blocks)
