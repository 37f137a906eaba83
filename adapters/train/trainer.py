"""The training loop as a small object: :class:`Trainer` (``setup``, ``step``, ``checkpoint``,
``result``) and :func:`finetune`, which drives it.

Optimisation. AdamW over the adapter parameters only (the base model stays frozen); learning rate
lr·f(s) for the s-th step (:func:`~adapters.train.settings.lr_factor`: linear warm-up, linear decay).
bf16 autocast on CUDA, float32 on the CPU; gradient clipping at ``max_grad_norm``. AdamW runs as
PyTorch's fused kernel on CUDA and as the multi-tensor (foreach) implementation on the CPU. With
HydraLoRA's load balancing on, coef · Σ_layers L_aux / G is added to the objective
(Switch-Transformer loss, see :mod:`adapters.hydralora`). On CUDA with liger-kernel installed, Liger's
fused kernels (RMSNorm, SwiGLU, RoPE) and its fused linear cross-entropy serve the steps
(:mod:`.fast`, recorded as ``fast_kernels`` in the results' settings); ``fast_kernels=False``
(``--no-fast-kernels``) keeps the plain path.

Several processes (:mod:`.parallel`): each computes its run of every micro-batch of the same global
step, with the objective scaled so that the averaged gradient is the one-process gradient; the main
process writes the checkpoints, the adapter and the results.

The loop never waits on the GPU within a step: the answer positions and the token count are computed
on the host from the collated labels, a micro-batch is cut from sequences tensorised once
(:class:`~adapters.train.batches.SequenceBank`) and goes to the GPU in one pinned, non-blocking copy
(:func:`~adapters.train.batches.move_together`), and the per-step losses stay on the device until
they are read every ``log_every`` steps, at a checkpoint, at the end, or every step when ``on_step``
is given.

Two objectives, chosen by the model: a causal LM is trained on its answers (packed, answer-masked
sequences, :func:`~adapters.train.loss.answer_loss_sum`); a sequence-classification model (an encoder
with a classification head, PEFT ``SEQ_CLS``) on the cross-entropy of its head's logits against the
class ids (one padded row per example, :func:`~adapters.train.loss.class_loss_sum`), its head trained
in full beside the adapters (``modules_to_save``) and saved with them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from geoprobe import runtime
from geoprobe.errors import AdapterError, DataFormatError
from geoprobe.models import is_causal_lm, is_sequence_classifier
from geoprobe.models.quantize import quantization_of
from geoprobe.profile import FinetuneResult
from geoprobe.records import write_json

from .. import registry
from ..build import build, unload
from ..io import adapter_spec, save
from ..data import IGNORE_INDEX, Example, collate_classification
from ..plan import AdapterPlan
from . import checkpoints as ckpt
from . import checkpointing, compiled, fast
from . import loss as loss_fns
from . import parallel
from .batches import SequenceBank, move_together
from .order import Order, classification_sequences, data_digest, training_sequences
from .settings import NOT_COMPARED, TrainSettings, lr_factor

log = logging.getLogger(__name__)

__all__ = ["Trainer", "FinetuneRun", "finetune", "CAUSAL", "CLASSIFICATION"]

CAUSAL = "causal_lm"
"""The objective of a causal LM: −log p of the answer tokens."""
CLASSIFICATION = "classification"
"""The objective of a sequence classifier: cross-entropy of the head's logits against the class ids."""


@dataclass
class FinetuneRun:
    """What :func:`finetune` returns: the trained PeftModel, the result record, and where they went."""

    model: Any
    result: FinetuneResult
    out: Path
    adapter_dir: Path
    results_path: Path
    resumed_from: Optional[int] = None


def _adamw(params: list[Any], s: TrainSettings, device: Any) -> tuple[Any, str]:
    """AdamW over ``params`` and its implementation's name: the fused kernel on CUDA (one launch
    for all tensors), the multi-tensor (foreach) one on the CPU; the same update rule either way."""
    import torch

    if device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params):
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=True), "AdamW fused"
    if device.type in ("cpu", "cuda"):
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, foreach=True), "AdamW foreach"
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay), "AdamW"


def _mover(device: Any) -> Callable[[Any], Any]:
    """Host tensor → ``device``: through pinned memory without waiting on CUDA, a plain copy elsewhere."""
    if device.type == "cuda":
        return lambda t: t.pin_memory().to(device, non_blocking=True)
    return lambda t: t.to(device)


def _objective(model: Any, tokenizer: Any) -> tuple[str, int]:
    """The training objective ``model`` takes (:data:`CAUSAL` or :data:`CLASSIFICATION`) and the
    padding id, after checking the model and the tokenizer."""
    if is_sequence_classifier(model):
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise DataFormatError("the tokenizer has no pad_token to pad classification batches; set "
                                  "tokenizer.pad_token first")
        return CLASSIFICATION, int(pad)
    if model.get_output_embeddings() is None or not is_causal_lm(model):
        raise AdapterError(f"fine-tuning trains a causal language model on answers or a sequence classifier "
                           f"on class ids; {type(model).__name__} is neither (load a …ForCausalLM model, or an "
                           "encoder with a classification head: load_model(..., num_labels=C))")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataFormatError("the tokenizer has no eos_token; set tokenizer.eos_token first")
    return CAUSAL, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


class Trainer:
    """One fine-tune run of adapters on a causal LM or a sequence classifier (see :func:`finetune`).

    The constructor checks the model, the output folder and the data (nothing is built yet);
    :meth:`setup` builds the adapter, the optimizer and the schedule and restores the newest
    checkpoint when resuming; :meth:`step` runs one optimizer step; :meth:`checkpoint` writes the
    state; :meth:`result` is the result record so far; :meth:`finish` saves the adapter and results.
    """

    def __init__(self, model: Any, tokenizer: Any, examples: Sequence[Example],
                 adapter: Union[str, AdapterPlan], *, out: Union[str, Path], settings: TrainSettings,
                 resume: bool = False, model_name: Optional[str] = None, data_name: str = "",
                 on_step: Optional[Callable[[int, float], None]] = None,
                 build_kwargs: Optional[dict[str, Any]] = None, group: Optional[parallel.Group] = None) -> None:
        s = self.settings = settings
        self.model, self.adapter, self.out = model, adapter, Path(out)
        self.model_name, self.data_name, self.on_step = model_name, data_name, on_step
        self.build_kwargs = dict(build_kwargs or {})
        self.objective, self.pad = _objective(model, tokenizer)
        self.start_ckpt = ckpt.check_out(self.out, resume)
        self.n_examples = len(list(examples))
        if self.objective == CLASSIFICATION:
            self.seqs, self.dropped = classification_sequences(examples, tokenizer, max_length=s.max_length)
        else:
            self.seqs, self.dropped = training_sequences(examples, tokenizer, max_length=s.max_length,
                                                         template=s.template, packed=s.pack)
        self.counts = self._target_counts()
        self.bank = SequenceBank(self.seqs, self.pad) if self.objective == CAUSAL else None
        self.order = Order(len(self.seqs), s.batch_size, s.seed)
        self.total = s.max_steps or max(1, math.ceil(s.epochs * self.order.per_epoch / s.grad_accum))
        self.warmup = math.ceil(s.warmup_ratio * self.total) if s.warmup_ratio > 0 else 0
        if s.balance_coef > 0:
            method = adapter.method if isinstance(adapter, AdapterPlan) else str(adapter)
            if method == registry.AUTO or not registry.get(method).includes("hydralora"):
                raise AdapterError(f"balance_coef applies to HydraLoRA only, not to {method!r}; set it to 0")
            self.build_kwargs["balance"] = True
        self.group = group or parallel.single(next(model.parameters()).device)
        self.device = self.group.device if group is not None else next(model.parameters()).device
        self.was_training = model.training
        self.quantized = quantization_of(model)  # how the base was quantized (--quantize), or None
        self.peft_model: Any = None
        self.fast: Optional[fast.FastKernels] = None
        self._fast_patch: Optional[fast.Applied] = None
        self.compiled: Optional[compiled.CompiledBlocks] = None
        self._compiled: Optional[compiled.Compiled] = None
        self._first_compiled_step = False
        self.checkpointing: Optional[checkpointing.ActivationCheckpointing] = None
        self._uncheckpoint: Optional[Callable[[], None]] = None
        self.fused: Optional[Callable[..., Any]] = None
        self.wrapped: Any = None  # what the forward passes go through (the DDP wrapper, or the model)
        self.step_count, self.micro, self.tokens_seen, self.seconds_before = 0, 0, 0, 0.0
        self.loss_steps: list[int] = []
        self.loss_values: list[float] = []
        self.resumed_from: Optional[int] = None
        self._pending: list[tuple[int, int, Any]] = []  # (step, answer tokens, loss sum on the device)
        self._t0 = time.perf_counter()
        self._bar: Any = runtime.NullBar()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Apply the fast kernels where they apply (:mod:`.fast`, before the adapters are built, so the
        patched modules call the adapter layers), build the adapter (seeded), the optimizer and the
        schedule; restore the newest checkpoint when resuming; write OUT/plan.json when the adapter came
        from a plan. On failure the adapters and the kernels are removed again and nothing is written."""
        import torch

        torch.manual_seed(self.settings.seed)
        decision = fast.decide(self.model, enabled=self.settings.fast_kernels, device=self.device,
                               sharded=self.group.sharded,
                               compiled_blocks=self.settings.compile and not self.group.sharded)
        self.fast, self._fast_patch = fast.apply(self.model, decision)
        try:
            self.peft_model = build(self.model, self.adapter, base_name=self.model_name, **self.build_kwargs)
        except BaseException:
            self._revert_fast()
            raise
        try:
            self.spec = adapter_spec(self.peft_model)
            self.run_id = self._run_id()
            self.group.check_same(self.run_id, "the settings, the adapter and the training data")
            state = self._restore_weights(self.start_ckpt) if self.start_ckpt is not None else None
            self.checkpointing, self._uncheckpoint = checkpointing.enable(
                self.peft_model, enabled=self.settings.gradient_checkpointing)
            self.compiled, self._compiled = compiled.compile_blocks(self.peft_model, enabled=self.settings.compile,
                                                                    sharded=self.group.sharded,
                                                                    mode=self.settings.compile_mode)
            self._first_compiled_step = self._compiled is not None
            self.wrapped = self.group.wrap(self.peft_model)
            self.group.seed_dropout(self.settings.seed)
            self._setup_optimizer()
            if state is not None:
                self._restore(self.start_ckpt, state)
            self._setup_step()
            if isinstance(self.adapter, AdapterPlan):  # kept only once the plan has built an adapter
                self.adapter.save(self.out / ckpt.PLAN)
        except BaseException:
            self.abort()
            raise

    def _setup_optimizer(self) -> None:
        import torch

        self.named = [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        if not self.params:
            raise AdapterError("the adapter has no trainable parameters")
        self.optimizer, self.optimizer_name = _adamw(self.params, self.settings, self.device)
        total, warmup = self.total, self.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: lr_factor(i, total, warmup))

    def _run_id(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint: settings, adapter, data, step count."""
        run_id = {
            "settings": {k: v for k, v in self.settings.to_dict().items() if k not in NOT_COMPARED},
            "adapter": {k: v for k, v in self.spec.to_dict().items() if k not in ("versions", "base_model")},
            "config": self._method_settings(),
            "data_sha256": data_digest(self.seqs),
            "total_steps": self.total,
        }
        if self.quantized is not None:  # a 4-bit base trains other adapters than its full-precision original
            run_id["quantization"] = {k: v for k, v in self.quantized.to_dict().items() if k != "version"}
        return json.loads(json.dumps(run_id, default=str))  # compared with the JSON copy in the checkpoint

    def _method_settings(self) -> dict[str, Any]:
        """The adapter config's fields (curvature, heads, ranks, …: the method's own settings live there),
        less those that name where the model came from or whether it trains."""
        config = self.peft_model.peft_config["default"].to_dict()
        skip = ("base_model_name_or_path", "revision", "inference_mode")
        return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items() if k not in skip}

    def _restore_weights(self, folder: Path) -> dict[str, Any]:
        """Check that checkpoint ``folder`` belongs to this run and load its adapter weights (before any
        sharding); its ``trainer_state.json``."""
        state = ckpt.read_state(folder)
        saved_id = state.get("run")
        if saved_id != self.run_id:
            diff = ckpt.describe_diff(saved_id or {}, self.run_id)
            raise AdapterError(f"checkpoint {folder} belongs to a run with other settings or data ({diff}); "
                               "resume with the original settings, or choose another --out")
        ckpt.load_adapter_weights(folder, self.peft_model)
        return state

    def _restore(self, folder: Path, state: dict[str, Any]) -> None:
        """Restore the optimizer, the schedule, the RNG states and the counters of checkpoint ``folder``."""
        optimizer_state, scheduler_state, rng = ckpt.read_training_state(folder)
        self.group.load_optimizer_state(self.optimizer, self.params, optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)
        ranks = rng.get("ranks") or [rng]
        if len(ranks) == self.group.world:
            ckpt.set_rng_state(ranks[self.group.rank])
        else:
            log.info("checkpoint %s was written by %d processes, this run has %d: the dropout generators "
                     "start afresh", folder, len(ranks), self.group.world)
        self.step_count, self.micro = int(state["step"]), int(state["micro_step"])
        self.tokens_seen, self.seconds_before = int(state["tokens_seen"]), float(state["seconds"])
        self.loss_steps, self.loss_values = list(state["loss_steps"]), list(state["loss_values"])
        self.resumed_from = self.step_count
        log.info("resuming from %s (step %d of %d)", folder, self.step_count, self.total)

    def _setup_step(self) -> None:
        import torch

        cuda = self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        self.aux_loss = None
        if self.settings.balance_coef > 0:
            from ..hydralora import hydra_aux_loss
            self.aux_loss = hydra_aux_loss
        self.to_device = _mover(self.device)
        self.acc_dtype = torch.float64 if self.device.type in ("cpu", "cuda") else torch.float32
        self._setup_fused_loss()
        self.extra = {"objective": self.objective, "n_examples": self.n_examples, "n_dropped_too_long": self.dropped,
                      "n_sequences": len(self.seqs), "total_steps": self.total, "warmup_steps": self.warmup,
                      "device": str(self.device), **self.group.describe(),
                      "compute_dtype": "bfloat16 autocast" if cuda else "float32",
                      "quantization": None if self.quantized is None else self.quantized.to_dict(),
                      "optimizer": self.optimizer_name,
                      "adapter": self.spec.to_dict(), "data_sha256": self.run_id["data_sha256"],
                      "fast_kernels": self.fast.to_dict()}

    def _setup_fused_loss(self) -> None:
        """The fused linear cross-entropy of a causal LM's answer loss where it applies
        (:func:`.fast.fused_cross_entropy`), and the one log line saying what the fast path does."""
        self.fused = None
        if self.objective == CAUSAL:
            self.fast, self.fused = fast.fused_cross_entropy(self.fast, self.peft_model.get_output_embeddings())
        elif self.fast.applied:
            self.fast = dataclasses.replace(self.fast, fused_loss_reason="a classifier's loss takes its head's logits")
        if self.group.is_main:
            log.info("%s", fast.describe(self.fast))

    def _revert_fast(self) -> None:
        """Take the fast kernels, the compiled blocks and the activation checkpointing off the model again
        (the caller's model leaves as it came, plus adapters)."""
        if self._compiled is not None:
            self._compiled.revert()
            self._compiled = None
        if self._uncheckpoint is not None:
            self._uncheckpoint()
            self._uncheckpoint = None
        if self._fast_patch is not None:
            self._fast_patch.revert()
            self._fast_patch = None

    def _accumulate_first_compiled(self, work: list[tuple[Any, Any, Any, float]], n_tok: int,
                                   picks: list[list[int]]) -> Any:
        """The first step with compiled blocks: when compiling fails, one log line, the blocks eager
        again and the step redone eagerly (gradients cleared first, the micro-batches collated again
        at their own shape)."""
        self._first_compiled_step = False
        try:
            return self._accumulate(work, n_tok)
        except Exception as exc:  # the compiler's errors have no common public base class
            why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            log.warning("compiled blocks failed at the first step (%s: %s); the plain path is taken",
                        type(exc).__name__, why)
            if self._compiled is not None:
                self._compiled.revert()
                self._compiled = None
            self.compiled = compiled.CompiledBlocks(applied=False, reason=f"failed at the first step: {why}")
            self.optimizer.zero_grad(set_to_none=True)
            work, n_tok = self._micro_batches(picks)
            return self._accumulate(work, n_tok)

    # ------------------------------------------------------------------ the loop
    @property
    def done(self) -> bool:
        """Whether every step has been taken."""
        return self.step_count >= self.total

    def start(self, progress: bool = True) -> None:
        """Switch to training mode, start the clock and the progress bar."""
        self.peft_model.train()
        self._t0 = time.perf_counter()
        self._bar = runtime.progress(self.total, "fine-tune", enabled=progress and self.group.is_main, unit="step",
                                     initial=self.step_count)

    def _target_counts(self) -> list[int]:
        """Per sequence, the targets the loss sums over: answer tokens (labels[t + 1] ≠ −100, the
        positions :func:`~adapters.train.loss.answer_targets` picks) or 1 for a classified example."""
        if self.objective == CLASSIFICATION:
            return [1] * len(self.seqs)
        return [sum(1 for t in seq["labels"][1:] if t != IGNORE_INDEX) for seq in self.seqs]

    def _my_rows(self, idx: list[int]) -> tuple[list[int], float]:
        """This process's sequences of a micro-batch and their weight: its run of ``idx``
        (:meth:`parallel.Group.rows`), or, when that run is empty, the first sequence with weight 0 (so
        that every process takes part in every collective)."""
        mine = idx[self.group.rows(len(idx))]
        return (mine, 1.0) if mine else (idx[:1], 0.0)

    def _micro_batches(self, picks: list[list[int]]) -> tuple[list[tuple[Any, Any, Any, float]], int]:
        """Collated micro-batches on the device (inputs, answer index, answer tokens, weight) and the
        number of answer tokens of the whole step (every process's share); counted and indexed on the
        host (rows of :attr:`bank`), copied in one transfer without waiting. For a classifier: (inputs,
        None, class ids, weight) and the number of examples. In one process every weight is 1 and the
        micro-batches are whole."""
        work = []
        n_tok = sum(self.counts[i] for idx in picks for i in idx)
        for idx in picks:
            rows, weight = self._my_rows(idx)
            if self.objective == CLASSIFICATION:
                b = collate_classification([self.seqs[i] for i in rows], self.pad)
                work.append(({k: self.to_device(v) for k, v in b.items() if k != "labels"}, None,
                             self.to_device(b["labels"]), weight))
                continue
            if self._compiled is not None:  # one shape for every step: no recompile, one CUDA graph per block
                b = self.bank.collate(rows, full_width=True,
                                      fixed_rows=math.ceil(self.settings.batch_size / self.group.world))
            else:
                b = self.bank.collate(rows)
            index, target = loss_fns.answer_targets(b.pop("labels"))
            *moved, index, target = move_together([*b.values(), index, target], self.device)
            work.append((dict(zip(b, moved)), index, target, weight))
        if n_tok == 0:
            raise DataFormatError(f"step {self.step_count + 1} has no answer tokens to train on")
        return work, n_tok

    def _accumulate(self, work: list[tuple[Any, Any, Any, float]], n_tok: int) -> Any:
        """Forward and backward over the micro-batches; the summed answer loss of this process's
        sequences, on the device. With P processes the objective is P · (its loss sum) / N, so that
        the gradient the processes average is the one-process gradient (:mod:`.parallel`)."""
        s, loss_sum = self.settings, None
        world = self.group.world
        head = self.peft_model.get_output_embeddings() if self.objective == CAUSAL else None
        graphs = self._compiled is not None and self.compiled.mode == "reduce-overhead"
        for k, (inputs, index, target, weight) in enumerate(work):
            if graphs:  # a new forward and backward: the blocks' CUDA graphs from the last one are done
                import torch

                torch.compiler.cudagraph_mark_step_begin()
            with self.group.no_sync(self.wrapped, sync=k == len(work) - 1):
                with self.autocast:
                    if index is None:
                        part = loss_fns.class_loss_sum(self.wrapped, inputs, target)
                    else:
                        part = loss_fns.answer_loss_sum(self.wrapped, inputs, index, target, head=head,
                                                        fused=self.fused)
                    objective = part / n_tok if world == 1 else part * (weight * world / n_tok)
                    if self.aux_loss is not None:
                        objective = (objective + s.balance_coef * weight * self.aux_loss(self.peft_model)
                                     / s.grad_accum)
                # backward outside autocast, as torch.amp prescribes: each backward op runs in the dtype
                # its forward chose, and a custom node (the fused HypLoRA nodes compute in the adapter's
                # float32) is not cast under it
                objective.backward()
            if weight:
                part = part.detach().to(self.acc_dtype)
                loss_sum = part if loss_sum is None else loss_sum + part
        if loss_sum is None:  # this process had no sequence of its own in the whole step
            import torch

            loss_sum = torch.zeros((), dtype=self.acc_dtype, device=self.device)
        return loss_sum

    def step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches, then the checkpoint it is due."""
        import torch

        s = self.settings
        picks = [self.order.indices(self.micro + k) for k in range(s.grad_accum)]
        work, n_tok = self._micro_batches(picks)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = (self._accumulate_first_compiled(work, n_tok, picks) if self._first_compiled_step
                    else self._accumulate(work, n_tok))
        self.tokens_seen += sum(len(self.seqs[i]["input_ids"]) for idx in picks for i in idx)
        if s.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        self.micro += s.grad_accum
        self._pending.append((self.step_count, n_tok, loss_sum))
        due = self.step_count % s.save_every == 0 or self.step_count == self.total
        if due or self.on_step is not None or self.step_count % s.log_every == 0:
            self.read_losses()
        if due:
            self.checkpoint()
        self._bar.update(1)
        if self.on_step is not None:
            self.on_step(self.step_count, self.loss_values[-1])

    def read_losses(self) -> None:
        """Bring the pending step losses to the host (one synchronisation) and record them."""
        import torch

        if not self._pending:
            return
        sums = self.group.sum_(torch.stack([p[2] for p in self._pending])).tolist()
        done = list(self._pending)
        self._pending.clear()
        for (k, n, _), total_k in zip(done, sums):
            value = total_k / n
            if not math.isfinite(value):
                raise AdapterError(f"the training loss became {value} at step {k}; lower --lr")
            self.loss_steps.append(k)
            self.loss_values.append(value)
        self._bar.set_postfix(loss=f"{self.loss_values[-1]:.4f}")

    def elapsed(self) -> float:
        """Training seconds, those before a resumption included."""
        return self.seconds_before + time.perf_counter() - self._t0

    def checkpoint(self) -> Optional[Path]:
        """Write ``OUT/checkpoints/step-N`` and the results so far (the main process writes, every
        process takes part in gathering the state); the folder, None in the other processes."""
        elapsed = self.elapsed()
        g = self.group
        adapter_state = g.adapter_state(self.named)
        optimizer_state = g.optimizer_state(self.optimizer, self.params)
        rngs = g.gather_objects(ckpt.rng_state())
        folder = None
        if g.is_main:
            rng = dict(rngs[0], ranks=rngs) if g.distributed else rngs[0]
            folder = ckpt.write_checkpoint(self.out / ckpt.CHECKPOINTS, self.step_count, self.peft_model,
                                           optimizer_state, self.scheduler.state_dict(), rng, {
                                               "step": self.step_count, "micro_step": self.micro,
                                               "total_steps": self.total, "tokens_seen": self.tokens_seen,
                                               "seconds": elapsed, "loss_steps": self.loss_steps,
                                               "loss_values": self.loss_values, "run": self.run_id},
                                           self.settings.keep_checkpoints, adapter_state=adapter_state)
            write_json(self.out / ckpt.RESULTS, self.result(elapsed).to_dict())
        g.barrier()
        return folder

    # ------------------------------------------------------------------ results
    def result(self, seconds: Optional[float] = None) -> FinetuneResult:
        """The result record after the steps taken so far (``seconds``: training time to record)."""
        seconds = self.elapsed() if seconds is None else seconds
        s, spec = self.settings, self.spec
        return FinetuneResult(
            method=spec.method, model=self.model_name or spec.base_model, data=self.data_name,
            settings=s.to_dict() | self.extra | {"compiled_blocks": self.compiled.to_dict(),
                                                 "activation_checkpointing": self.checkpointing.to_dict(),
                                                 "resumed_from_step": self.resumed_from}, seed=s.seed,
            loss_steps=list(self.loss_steps), loss_values=list(self.loss_values),
            trainable_parameters=spec.trainable_parameters, seconds=round(seconds, 3),
            tokens_per_second=(self.tokens_seen / seconds) if seconds > 0 and self.tokens_seen else None,
            versions=runtime.versions())

    def close(self) -> None:
        """Close the progress bar."""
        self._bar.close()

    def finish(self) -> FinetuneRun:
        """Switch to evaluation mode and write OUT/adapter and OUT/results.json (the main process
        writes; every process returns the same record)."""
        self.peft_model.eval()
        elapsed = self.elapsed()
        adapter_state = self.group.adapter_state(self.named)
        adapter_dir, results_path = self.out / ckpt.ADAPTER, self.out / ckpt.RESULTS
        result = self.result(elapsed)
        if self.group.is_main:
            save(self.peft_model, adapter_dir, state_dict=adapter_state)
            write_json(results_path, result.to_dict())
        self.group.barrier()
        self._revert_fast()
        values = self.loss_values
        log.info("fine-tuned %s for %d steps: loss %.4f → %.4f; adapter in %s", self.spec.method, self.total,
                 values[0] if values else float("nan"), values[-1] if values else float("nan"), adapter_dir)
        return FinetuneRun(model=self.peft_model, result=result, out=self.out, adapter_dir=adapter_dir,
                           results_path=results_path, resumed_from=self.resumed_from)

    def abort(self) -> None:
        """Remove the adapters again, so that the caller's model is as it came in (the newest
        checkpoint keeps the progress). A model wrapped for several processes stays as it is: its
        process ends with the run."""
        if self.peft_model is not None and self.group.accelerator is None:
            unload(self.peft_model)  # a classifier's head as it came in, too
        self._revert_fast()
        self.model.train(self.was_training)


def finetune(model: Any, tokenizer: Any, examples: Sequence[Example],
             adapter: Union[str, AdapterPlan] = "lora", *, out: Union[str, Path],
             settings: Optional[TrainSettings] = None, resume: bool = False, progress: bool = True,
             model_name: Optional[str] = None, data_name: str = "",
             on_step: Optional[Callable[[int, float], None]] = None,
             on_ready: Optional[Callable[[], None]] = None, group: Optional[parallel.Group] = None,
             **build_kwargs: Any) -> FinetuneRun:
    """Fine-tune adapters on ``examples`` and write OUT/adapter, OUT/results.json, OUT/checkpoints
    (and OUT/plan.json when ``adapter`` is a plan, once it has built an adapter).

    Args:
        model: a causal LM, or a sequence-classification model (an encoder with a classification head,
            trained on the examples' class ids with its head in full); the base model, adapters are
            added in place by :func:`adapters.build`.
        tokenizer: its tokenizer (needs an EOS token for a causal LM, a pad token for a classifier).
        examples: training :class:`~adapters.data.Example` records.
        adapter: a method of :data:`adapters.build.METHODS` or an :class:`AdapterPlan`.
        out: output folder.
        settings: :class:`TrainSettings` (defaults if None).
        resume: continue from the newest checkpoint in ``out`` (same settings and data required).
        on_step: called after every optimizer step (and its checkpoint) with (step, loss); reading
            each step's loss makes the host wait for the GPU once per step.
        on_ready: called once the adapter is built (and the checkpoint restored), before the first
            step: the moment to write what belongs to a run that has started.
        group: this process's place in a run of several processes (:func:`adapters.train.parallel.join`,
            under ``accelerate launch`` or ``torchrun``): every process calls :func:`finetune` with the
            same arguments and ``model`` on its device (on the CPU for FSDP); None for one process.
        build_kwargs: passed to :func:`adapters.build` (r, alpha, target_modules, curvature, n_heads,
            layer_ranks, dropout, top_k).

    ``model`` is modified in place (PEFT injects the adapter layers) and returned inside the
    :class:`FinetuneRun` as a PeftModel; when the run is interrupted or fails, the adapters are removed
    again so that ``model`` is as it came in (the newest checkpoint keeps the progress). Resuming on
    the CPU gives the same result as an uninterrupted run, bit for bit.

    Raises:
        AdapterError: an encoder without a classification head, unusable settings, an existing run without ``resume``, or a
            checkpoint written with other settings or data.
        DataFormatError: examples without answers, or none that fits ``max_length``; for a classifier,
            examples without a label set (data that needs generation).
    """
    trainer = Trainer(model, tokenizer, examples, adapter, out=out, settings=settings or TrainSettings(),
                      resume=resume, model_name=model_name, data_name=data_name, on_step=on_step,
                      build_kwargs=build_kwargs, group=group)
    trainer.setup()
    try:
        if on_ready is not None:
            on_ready()
        trainer.start(progress)
        try:
            while not trainer.done:
                trainer.step()
        finally:
            trainer.close()
        return trainer.finish()
    except BaseException:
        trainer.abort()
        raise
