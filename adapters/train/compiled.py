"""Compiled transformer blocks for launch-bound training steps (``--compile``).

A small model's training step on a GPU is bound by the host launching kernels, not by the GPU: a
SmolLM2-135M step of 16 × 256 tokens runs hundreds of small kernels per decoder layer (norms, rotary
embedding, attention, the MLP, every adapter's dropout, down- and up-projection and scaled add, and
their backward). ``torch.compile`` of each block (``nn.Module.compile``, the per-block compilation
torchtitan uses) lets Inductor fuse the elementwise work into a few generated kernels; since recent
torch treats a module's parameters as graph inputs, one compiled graph serves every block of the same
class, so the compile is paid at the first steps (about 30 s for a tiny Llama on a CPU, more on a GPU):
one graph for the first block (its input needs no gradient) and one for the others. The trainer gives
every micro-batch one shape under compiled blocks (cut at the data's longest sequence, filled to the
batch's rows with copies that carry no target: :meth:`adapters.train.batches.SequenceBank.collate`), so
no later step recompiles (a batch of another shape would compile once more, with dynamic sizes).

On CUDA the blocks are compiled in ``reduce-overhead`` mode by default (:data:`MODES`, ``auto``):
Inductor's kernels of each block's forward and backward are recorded once as CUDA graphs and replayed,
so the host issues one launch per block and direction instead of its kernels; the trainer marks each
forward's start (``torch.compiler.cudagraph_mark_step_begin``). Measured on an H100 with SmolLM2-135M,
16 examples a step: 2.92× the tokens per second of HF Trainer + PEFT LoRA (BENCHMARKS.md).

What is compiled: the blocks of the model's largest ``nn.ModuleList`` whose entries all share one class
(the decoder layers of a causal LM, the encoder layers of BERT), with the adapter layers inside them.
While the compiler traces them the adapter layers take their plain torch formulas
(:func:`adapters.kernels._internals.compiling`), not the C++ nodes or Triton launches, each of which
would split the block's graph; so every method's block is one graph (``tests/test_train_compiled.py``);
the embedding, the final norm, the output layer and the loss stay eager (the answer loss picks a
varying number of rows, which would recompile). The numbers equal the eager step to rounding
(``tests/test_train_compiled.py`` on a CPU, and on CUDA with and without graphs). It is off by default:
the compile costs about as much as it saves on a run of a few hundred steps
(``benchmarks/bench_small_train.py``, rows ``lora-compiled`` and ``lora-graphs``). Not with FSDP (the
blocks are sharded units there). When the first compiled step
fails (an operation the compiler cannot take), the trainer logs one line, takes the compiled blocks off
again and redoes the step eagerly (:meth:`Compiled.revert`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from geoprobe.profile import Record

__all__ = ["CompiledBlocks", "Compiled", "MODES", "find_blocks", "compile_blocks"]

log = logging.getLogger(__name__)

MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes the blocks may be compiled with: ``auto`` (``reduce-overhead`` on CUDA,
``default`` elsewhere: the fastest measured, ``benchmarks/bench_small_train.py``), ``default``
(Inductor's fused kernels), ``reduce-overhead`` (the same kernels, each block's forward and backward
replayed as a CUDA graph, so the host launches one graph per block instead of its kernels; CUDA only),
``max-autotune-no-cudagraphs`` (Inductor also benchmarks GEMM and Triton configurations at the compile).
Blocks under activation checkpointing (``gradient_checkpointing_enable``) are compiled with the
checkpoint inside the compiled function (:func:`_compile_checkpointed`), so CUDA graphs serve them too."""


@dataclass(frozen=True)
class CompiledBlocks(Record):
    """Whether the run's blocks are compiled: ``applied``, ``reason`` (why not, "" when applied; or what
    changed), the ``block_class``, how many blocks (``n_blocks``) and ``torch.compile``'s ``mode``."""

    applied: bool
    reason: str = ""
    block_class: Optional[str] = None
    n_blocks: int = 0
    mode: str = "default"


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
    (``nn.Module.compile`` keeps it beside the module's own, which stays as it was) and gives checkpointed
    blocks their own activation checkpointing back."""

    def __init__(self, blocks: Any, checkpointed: bool = False) -> None:
        self.blocks = blocks
        self.checkpointed = checkpointed

    def revert(self) -> None:
        for block in self.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; None restores the plain call
            if self.checkpointed:
                block.gradient_checkpointing = True


def _checkpointed_forward(block: Any, *args: Any, **kwargs: Any) -> Any:
    """``block``'s call under non-reentrant activation checkpointing while it trains with gradients (as
    transformers' ``GradientCheckpointingLayer`` does, the cache off), its plain call otherwise: the
    function compiled for checkpointed blocks, so the checkpoint is inside the graph."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if block.training and torch.is_grad_enabled():
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(block._call_impl, *args, use_reentrant=False, **kwargs)
    return block._call_impl(*args, **kwargs)


def _compile_checkpointed(blocks: Any, options: dict[str, Any]) -> None:
    """Compile ``blocks`` with their activation checkpoint inside the compiled function: each block's own
    checkpointing is switched off, and one compiled :func:`_checkpointed_forward` (the block an input, so
    blocks of one class share its graph) checkpoints instead. Compiled inside the checkpoint, as
    transformers applies it, the block would run its compiled forward again within the backward pass,
    which CUDA graphs cannot record ("graph recording observed an input tensor deallocate …", torch
    2.11); inside the compiled function AOTAutograd puts the recompute in the backward graph."""
    import torch

    from ..kernels._internals import checkpoint_side_effects_skipped

    compiled = torch.compile(_checkpointed_forward, **options)
    for block in blocks:
        block.gradient_checkpointing = False

        def call(*args: Any, _block: Any = block, **kwargs: Any) -> Any:
            with checkpoint_side_effects_skipped():
                return compiled(_block, *args, **kwargs)

        block._compiled_call_impl = call


def compile_blocks(model: Any, *, enabled: bool, sharded: bool = False,
                   mode: str = "auto") -> tuple[CompiledBlocks, Optional[Compiled]]:
    """Compile the blocks of ``model`` (:func:`find_blocks`) with ``torch.compile`` in ``mode``
    (:data:`MODES`) when ``enabled``; (the record, a handle to revert) or (the record saying why not,
    None). The compile itself happens at the first forward. CUDA graphs (``reduce-overhead``) need the
    model on CUDA; elsewhere the blocks are compiled in the default mode and the record says so. Blocks
    under activation checkpointing keep it, inside the compiled function; the record says so."""
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
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(MODES)}")
    reason = ""
    on_cuda = next(blocks.parameters()).device.type == "cuda"
    checkpointed = any(getattr(block, "gradient_checkpointing", False) for block in blocks)
    if mode == "auto":
        mode = "reduce-overhead" if on_cuda else "default"
    elif mode == "reduce-overhead" and not on_cuda:
        mode, reason = "default", "CUDA graphs need CUDA: compiled in the default mode"
    options = {} if mode == "default" else {"mode": mode}
    if checkpointed:  # the checkpoint inside the compiled function (automatic dynamic shapes, as below)
        _compile_checkpointed(blocks, options)
        reason = "; ".join(filter(None, [reason, "activation checkpointing inside the compiled blocks"]))
    else:
        for block in blocks:  # automatic dynamic shapes: a second sequence length compiles one dynamic graph
            block.compile(**options)
    record = CompiledBlocks(applied=True, reason=reason, block_class=type(blocks[0]).__name__, n_blocks=len(blocks),
                            mode=mode)
    log.info("compiled blocks: %d × %s (torch.compile, mode %s, at the first step)%s", record.n_blocks,
             record.block_class, mode, f"; {reason}" if reason else "")
    return record, Compiled(blocks, checkpointed)
