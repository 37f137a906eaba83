"""Fine-tuning: a plain PyTorch loop over answer-masked, packed examples, with exact resumption.

Objective. For one optimizer step over micro-batches b = 1…G (gradient accumulation G),

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

Optimisation. AdamW over the adapter parameters only (the base model stays frozen); learning rate
lr·f(s) for the s-th step (s = 0…T−1) with linear warm-up over W steps and linear decay,

    f(s) = (s + 1)/W for s < W,   f(s) = (T − s)/(T − W) otherwise,

which never gives a zero step. bf16 autocast on CUDA, float32 on the CPU; gradient clipping at
``max_grad_norm``. AdamW runs as PyTorch's fused kernel on CUDA and as the multi-tensor (foreach)
implementation on the CPU.

Throughput. Only the answer positions reach the output layer: a forward pre-hook hands it the
hidden states at those positions alone, so logits, softmax and their gradients cover the answer
tokens and not the prompt or the padding (for a 135M model with a 49k vocabulary the output layer is
a fifth of the matrix FLOPs, and its float32 logits a large share of the activation memory). The loop
itself never waits on the GPU within a step (transformers' mask preparation still reads one value per
forward): the answer positions and the token count are computed on the host from the collated labels,
batches go to the GPU through pinned memory without blocking, and the per-step losses stay on the
device until they are read every ``log_every`` steps, at a checkpoint, at the end, or every step
when ``on_step`` is given.

Order and resumption. Epoch e visits the packed sequences in the order of a permutation drawn from
``numpy.random.default_rng([seed, e])``; micro-batch m is the slice (m mod M)·B … of epoch ⌊m/M⌋'s
order (M micro-batches per epoch, B the batch size), so the data position is the micro-batch count
alone. Every ``save_every`` steps (and at the last step) a checkpoint ``OUT/checkpoints/step-N`` holds
the adapter (PEFT files + sidecar), the optimizer and scheduler states, the torch RNG states (dropout),
the step, the micro-batch count and the loss history; it is written to a temporary folder and renamed
into place, and only the newest ``keep_checkpoints`` are kept. ``resume=True`` rebuilds the adapter
with the same seed, restores all of that from the newest checkpoint and continues; on the CPU the
result equals an uninterrupted run bit for bit.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from geoprobe.errors import AdapterError, DataFormatError, OutputError, PlanError
from geoprobe import runtime
from geoprobe.records import write_json
from geoprobe.profile import FinetuneResult, GeometryProfile, Record

from .build import build
from .io import adapter_spec, check_adapter_state, save, write_adapter
from .data import IGNORE_INDEX, Example, collate, format_prompt, pack, tokenize_for_training
from .plan import AdapterPlan

log = logging.getLogger(__name__)

__all__ = [
    "TrainSettings",
    "FinetuneRun",
    "finetune",
    "lr_factor",
    "batch_loss",
    "latest_checkpoint",
    "list_checkpoints",
    "plan_for_training",
    "check_out",
    "quick_probe_settings",
    "CHECKPOINTS",
    "ADAPTER",
    "RESULTS",
]

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
RESULTS = "results.json"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_NOT_COMPARED = ("save_every", "keep_checkpoints", "log_every")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrainSettings(Record):
    """Hyperparameters of one fine-tune run (all recorded in the results).

    ``epochs`` may be fractional; ``max_steps`` (optimizer steps) overrides it. ``warmup_ratio`` is
    the fraction of the steps spent warming up (W = ⌈ratio·T⌉). ``balance_coef`` > 0 switches on
    HydraLoRA's load-balancing loss with that weight. ``log_every``: the losses stay on the device and
    are read every ``log_every`` steps (and at every checkpoint and the last step); every step's loss
    is recorded all the same, so it changes when a non-finite loss is noticed, not the results.
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

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> AdapterError:
            return AdapterError(f"training setting {name} = {getattr(self, name)!r}; it must be {want}")

        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise bad(name, f"an integer ≥ {minimum}")

        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a positive number")
        if not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs > 0):
            raise bad("epochs", "a positive number")
        for name in ("batch_size", "grad_accum", "save_every", "keep_checkpoints", "log_every"):
            pos_int(name)
        pos_int("max_length", 2)
        if self.max_steps is not None:
            pos_int("max_steps")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise bad("warmup_ratio", "in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "≥ 0")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise bad("max_grad_norm", "a positive number or None")
        if not (math.isfinite(self.balance_coef) and self.balance_coef >= 0):
            raise bad("balance_coef", "≥ 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "a non-negative integer")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate for the step with index ``step`` (0-based) of ``total``:
    (step + 1)/warmup during warm-up, then (total − step)/(total − warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / max(total - warmup, 1)


# --------------------------------------------------------------------------- the result
@dataclass
class FinetuneRun:
    """What :func:`finetune` returns: the trained PeftModel, the result record, and where they went."""

    model: Any
    result: FinetuneResult
    out: Path
    adapter_dir: Path
    results_path: Path
    resumed_from: Optional[int] = None


# --------------------------------------------------------------------------- data
def _tokenize(examples: Sequence[Example], tokenizer: Any, max_length: int,
              template: str) -> tuple[list[dict[str, list[int]]], int]:
    """Answer-masked token ids; examples whose answer (with EOS and the prompt's leading special
    tokens, as :func:`~adapters.data.tokenize_for_training` keeps them) leaves no room for a prompt
    token within ``max_length`` are dropped — counted, logged and recorded in the results."""
    examples = list(examples)
    if not examples:
        raise DataFormatError("no training examples; check --data and --limit")
    for i, ex in enumerate(examples):
        if not ex.answer:
            raise DataFormatError(f"training example {i} ({ex.task}) has no answer text to train on "
                                  "(an unlabelled split?); train on a labelled split")
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    prompts = tokenizer([format_prompt(ex, template) for ex in examples], add_special_tokens=True)["input_ids"]
    answers = tokenizer([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
    keep = []
    for ex, p, a in zip(examples, prompts, answers):
        lead = next((k for k, t in enumerate(p) if t not in special), len(p))
        if len(p) + len(a) + 1 <= max_length or max_length - (len(a) + 1) - lead >= 1:
            keep.append(ex)
    dropped = len(examples) - len(keep)
    if not keep:
        raise DataFormatError(f"every training example has an answer longer than max_length={max_length} "
                              "tokens; raise --max-length")
    if dropped:
        log.warning("dropped %d of %d training examples whose answer does not fit max_length=%d",
                    dropped, len(examples), max_length)
    return tokenize_for_training(keep, tokenizer, max_length=max_length, template=template), dropped


def _data_digest(seqs: Sequence[dict[str, list[int]]]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        for key in ("input_ids", "labels", "position_ids"):
            if key in s:
                h.update(np.asarray(s[key], dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class _Order:
    """Micro-batch m → indices of the packed sequences (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._cache: dict[int, np.ndarray] = {}

    def indices(self, micro: int) -> list[int]:
        epoch, j = divmod(micro, self.per_epoch)
        perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._cache = {epoch: perm}
        return [int(i) for i in perm[j * self.bs:(j + 1) * self.bs]]


# --------------------------------------------------------------------------- the loss
def _answer_targets(labels: Any) -> tuple[Any, Any]:
    """Where the loss is taken in a (B, T) label tensor: the flat indices b·T + t of the positions
    whose logits predict an answer token (``labels[b, t + 1] != -100``) and those tokens, in
    row-major order. Computed wherever ``labels`` lives; on the host it costs no device round trip."""
    import torch

    width = labels.shape[1]
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    return rows * width + cols, labels[rows, cols + 1]


def _answer_loss_sum(model: Any, inputs: dict[str, Any], index: Any, target: Any) -> Any:
    """Σ_k −log p(target_k | position index_k) for the model called on ``inputs`` (no labels).

    ``index`` / ``target`` come from :func:`_answer_targets` (on the model's device). The output layer
    is fed only the hidden states at ``index`` (a forward pre-hook on ``get_output_embeddings()``),
    so the vocabulary projection, the logits and the softmax cover the answer positions alone: the
    same rows of logits as ``logits.flatten(0, 1)[index]``, without computing the rest. When the
    model's output layer is not called on the full (B, T, H) hidden states (the hook does not apply),
    the full logits are computed and the rows gathered. No host synchronisation. The sum is taken in
    float32 for half-precision logits (float64 logits stay float64).
    """
    import torch
    import torch.nn.functional as F

    ids = inputs.get("input_ids")
    shape = tuple(ids.shape) if ids is not None else tuple(inputs["inputs_embeds"].shape[:2])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fed: list[bool] = []

    def pick(module: Any, args: tuple) -> Optional[tuple]:
        if fed or not args or not torch.is_tensor(args[0]) or args[0].dim() != 3 or tuple(args[0].shape[:2]) != shape:
            return None
        fed.append(True)
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), *args[1:])

    handle = head.register_forward_pre_hook(pick) if isinstance(head, torch.nn.Module) else None
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
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
    computed at the answer positions only (:func:`_answer_loss_sum`). Labels on a GPU cost one
    synchronisation here (to count the tokens); the training loop counts on the host instead.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    index, target = _answer_targets(labels)
    return _answer_loss_sum(model, inputs, index, target), int(index.numel())


# --------------------------------------------------------------------------- checkpoints
def list_checkpoints(out: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out/checkpoints`` as (step, folder), oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Union[str, os.PathLike]) -> Optional[Path]:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def _clean_partial(root: Path) -> None:
    """Remove temporary folders left by a run killed while writing or deleting a checkpoint."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_checkpoint(root: Path, step: int, peft_model: Any, optimizer: Any, scheduler: Any,
                      state: dict[str, Any], keep: int) -> Path:
    import torch

    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", suffix=".tmp", dir=root))
    except OSError as exc:
        raise OutputError(f"cannot write checkpoints under {root}: {exc.strerror or exc}") from None
    target = root / f"step-{step}"
    try:
        write_adapter(peft_model, tmp / ADAPTER)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        write_json(tmp / STATE, state)  # last: a folder with trainer_state.json is complete
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-step-{step}.", dir=root))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root.parent)[:-keep]:
        trash = Path(tempfile.mkdtemp(prefix=f".del-{old.name}.", dir=root))
        os.replace(old, trash / old.name)  # gone from the step-N names before any file is deleted
        shutil.rmtree(trash, ignore_errors=True)
    log.info("checkpoint %s written", target)
    return target


def _load_checkpoint(folder: Path, peft_model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    import torch
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    weights = folder / ADAPTER / "adapter_model.safetensors"
    try:
        tensors = load_file(str(weights))
        opt_state = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
        sched_state = torch.load(folder / "scheduler.pt", weights_only=True, map_location="cpu")
        rng = torch.load(folder / "rng.pt", weights_only=True, map_location="cpu")
    except Exception as exc:
        raise AdapterError(f"checkpoint {folder} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                           "resume from the one before") from None
    check_adapter_state(peft_model, list(tensors), folder / ADAPTER)
    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in tensors.items()})
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    _set_rng_state(rng)
    return state


# --------------------------------------------------------------------------- planning for auto
def quick_probe_settings(n_prompts: int, seed: int = 0):
    """Small :class:`geoprobe.pipeline.ProbeSettings` for planning from training prompts (seconds on
    a CPU for a 135M model): ≤ 100 prompts for δ, 1,500 hidden-state positions per layer."""
    from geoprobe.pipeline import ProbeSettings

    return ProbeSettings(seed=seed, n_prompts=max(1, min(100, n_prompts)), token_sample=500,
                         token_repeats=2, null_repeats=2, layer_positions=1500, layer_delta_points=200,
                         max_length=128, batch_size=8)


def plan_for_training(lm: Any, examples: Sequence[Example], *, method: str = "auto", r: int = 32,
                      alpha: Optional[float] = None, target_modules: Optional[Sequence[str]] = None,
                      profile: Optional[GeometryProfile] = None, seed: int = 0, data_name: str = "training prompts",
                      progress: bool = False, device: Optional[str] = None, command: str = "",
                      max_embedded: int = 500) -> tuple[AdapterPlan, GeometryProfile]:
    """Plan adapters for fine-tuning ``lm`` (a :class:`geoprobe.models.LoadedModel`) on ``examples``.

    Without ``profile``, the model is probed quickly (:func:`quick_probe_settings`) on the training
    prompts; HydraLoRA's number of heads comes from k-means on the mean-pooled last hidden states of
    up to ``max_embedded`` training prompts (:func:`adapters.plan.example_embeddings`); GeLoRA's budget
    uses the model's parameters per rank. Returns the plan and the profile it was made from.

    Raises:
        PlanError: a profile measured on another model, or one without the model's layers.
    """
    from geoprobe.corpus import Corpus
    from geoprobe.pipeline import probe

    from .build import _resolve_targets
    from .gelora import params_per_rank
    from .plan import example_embeddings, plan_adapters

    prompts = [ex.prompt + (("\n" + ex.input) if ex.input else "") for ex in examples]
    if not prompts:
        raise DataFormatError("no training examples to plan from")
    info = lm.info
    if profile is None:
        corpus = Corpus.from_texts(prompts, name=data_name)
        profile = probe(lm, corpus, settings=quick_probe_settings(len(prompts), seed), progress=progress,
                        device=device, command=command, layers=True)
    else:
        pm = profile.model
        if (pm.hidden_size, pm.n_layers, pm.vocab_size) != (info.hidden_size, info.n_layers, info.vocab_size):
            raise PlanError(
                f"the profile was measured on {pm.name} (hidden {pm.hidden_size}, {pm.n_layers} layers, "
                f"vocabulary {pm.vocab_size}), not on this model ({info.name}: hidden {info.hidden_size}, "
                f"{info.n_layers} layers, vocabulary {info.vocab_size}); probe this model")
    targets = _resolve_targets(lm.model, target_modules)
    try:
        costs = params_per_rank(lm.model, targets)
    except AdapterError:
        costs = None
    emb = None
    if method in ("auto", "hydralora", "hydralora+gelora"):
        emb = example_embeddings(lm.model, lm.tokenizer, prompts, max_examples=max_embedded, seed=seed)
    plan = plan_adapters(profile, method=method, train_embeddings=emb, r=r, alpha=alpha,
                         target_modules=tuple(targets), params_per_rank=costs, seed=seed)
    log.info("adapter plan: %s (%s)", plan.method, plan.reasons.get("method", ""))
    return plan, profile


# --------------------------------------------------------------------------- the loop
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


def check_out(out: Union[str, os.PathLike], resume: bool) -> Optional[Path]:
    """The checkpoint to resume from (None for a fresh start) after checking that ``out`` may be used:
    without ``resume`` it must not hold an earlier run. Removes temporary folders of a killed run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    _clean_partial(out / CHECKPOINTS)
    latest = latest_checkpoint(out)
    if not resume and (latest is not None or (out / ADAPTER).exists() or (out / RESULTS).exists()):
        raise AdapterError(f"{out} already holds a fine-tune run (checkpoints, adapter or results); pass "
                           "--resume to continue it, or choose another --out")
    if resume and latest is None:
        log.warning("no checkpoint under %s: starting from the beginning", out / CHECKPOINTS)
    return latest if resume else None


def finetune(model: Any, tokenizer: Any, examples: Sequence[Example],
             adapter: Union[str, AdapterPlan] = "lora", *, out: Union[str, os.PathLike],
             settings: Optional[TrainSettings] = None, resume: bool = False, progress: bool = True,
             model_name: Optional[str] = None, data_name: str = "",
             on_step: Optional[Callable[[int, float], None]] = None, **build_kwargs: Any) -> FinetuneRun:
    """Fine-tune adapters on ``examples`` and write OUT/adapter, OUT/results.json, OUT/checkpoints.

    Args:
        model: a causal LM (the base model; adapters are added in place by :func:`adapters.build`).
        tokenizer: its tokenizer (needs an EOS token).
        examples: training :class:`~adapters.data.Example` records.
        adapter: a method of :data:`adapters.build.METHODS` or an :class:`AdapterPlan`.
        out: output folder.
        settings: :class:`TrainSettings` (defaults if None).
        resume: continue from the newest checkpoint in ``out`` (same settings and data required).
        on_step: called after every optimizer step (and its checkpoint) with (step, loss); reading
            each step's loss makes the host wait for the GPU once per step.

    ``model`` is modified in place (PEFT injects the adapter layers) and returned inside the
    :class:`FinetuneRun` as a PeftModel; when the run is interrupted or fails, the adapters are removed
    again so that ``model`` is as it came in (the newest checkpoint keeps the progress).
        build_kwargs: passed to :func:`adapters.build` (r, alpha, target_modules, curvature, n_heads,
            layer_ranks, dropout, top_k).

    Raises:
        AdapterError: an encoder model, unusable settings, an existing run without ``resume``, or a
            checkpoint written with other settings or data.
        DataFormatError: examples without answers, or none that fits ``max_length``.
    """
    import torch

    s = settings or TrainSettings()
    out = Path(out)
    if model.get_output_embeddings() is None or not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise AdapterError(f"fine-tuning trains a causal language model on answers; {type(model).__name__} "
                           "is not one (use a …ForCausalLM model)")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataFormatError("the tokenizer has no eos_token; set tokenizer.eos_token first")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    start_ckpt = check_out(out, resume)

    rows, dropped = _tokenize(examples, tokenizer, s.max_length, s.template)
    seqs = pack(rows, s.max_length) if s.pack else rows
    order = _Order(len(seqs), s.batch_size, s.seed)
    total = s.max_steps or max(1, math.ceil(s.epochs * order.per_epoch / s.grad_accum))
    warmup = math.ceil(s.warmup_ratio * total) if s.warmup_ratio > 0 else 0

    if s.balance_coef > 0:
        method = adapter.method if isinstance(adapter, AdapterPlan) else str(adapter)
        if "hydralora" not in method:
            raise AdapterError(f"balance_coef applies to HydraLoRA only, not to {method!r}; set it to 0")
        build_kwargs["balance"] = True
    device = next(model.parameters()).device
    was_training = model.training
    torch.manual_seed(s.seed)
    peft_model = build(model, adapter, base_name=model_name, **build_kwargs)
    try:
        spec = adapter_spec(peft_model)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        if not params:
            raise AdapterError("the adapter has no trainable parameters")
        optimizer, optimizer_name = _adamw(params, s, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, total, warmup))

        run_id = {
            "settings": {k: v for k, v in s.to_dict().items() if k not in _NOT_COMPARED},
            "adapter": {k: v for k, v in spec.to_dict().items() if k not in ("versions", "base_model")},
            "data_sha256": _data_digest(seqs),
            "total_steps": total,
        }
        run_id = json.loads(json.dumps(run_id))  # compared with the JSON copy in the checkpoint
        step, micro, tokens_seen, seconds_before = 0, 0, 0, 0.0
        loss_steps: list[int] = []
        loss_values: list[float] = []
        resumed_from = None
        if start_ckpt is not None:
            saved_id = json.loads((start_ckpt / STATE).read_text(encoding="utf-8")).get("run")
            if saved_id != run_id:
                diff = _describe_diff(saved_id or {}, run_id)
                raise AdapterError(f"checkpoint {start_ckpt} belongs to a run with other settings or data ({diff}); "
                                   "resume with the original settings, or choose another --out")
            state = _load_checkpoint(start_ckpt, peft_model, optimizer, scheduler)
            step, micro = int(state["step"]), int(state["micro_step"])
            tokens_seen, seconds_before = int(state["tokens_seen"]), float(state["seconds"])
            loss_steps, loss_values = list(state["loss_steps"]), list(state["loss_values"])
            resumed_from = step
            log.info("resuming from %s (step %d of %d)", start_ckpt, step, total)

        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        aux_loss = None
        if s.balance_coef > 0:
            from .hydralora import hydra_aux_loss as aux_loss
        extra = {"n_examples": len(list(examples)), "n_dropped_too_long": dropped, "n_sequences": len(seqs),
                 "total_steps": total, "warmup_steps": warmup, "device": str(device),
                 "compute_dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
                 "optimizer": optimizer_name,
                 "adapter": spec.to_dict(), "data_sha256": run_id["data_sha256"]}

        def result_record(seconds: float) -> FinetuneResult:
            return FinetuneResult(
                method=spec.method, model=model_name or spec.base_model, data=data_name,
                settings=s.to_dict() | extra | {"resumed_from_step": resumed_from}, seed=s.seed,
                loss_steps=list(loss_steps), loss_values=list(loss_values),
                trainable_parameters=spec.trainable_parameters, seconds=round(seconds, 3),
                tokens_per_second=(tokens_seen / seconds) if seconds > 0 and tokens_seen else None,
                versions=runtime.versions())

        to_device = _mover(device)
        acc_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        pending: list[tuple[int, int, Any]] = []  # (step, answer tokens, loss sum on the device)

        def read_losses() -> None:
            """Bring the pending step losses to the host (one synchronisation) and record them."""
            if not pending:
                return
            sums = torch.stack([p[2] for p in pending]).tolist()
            done = list(pending)
            pending.clear()
            for (k, n, _), total_k in zip(done, sums):
                value = total_k / n
                if not math.isfinite(value):
                    raise AdapterError(f"the training loss became {value} at step {k}; lower --lr")
                loss_steps.append(k)
                loss_values.append(value)
            bar.set_postfix(loss=f"{loss_values[-1]:.4f}")

        peft_model.train()
        t0 = time.perf_counter()
        bar = runtime.progress(total, "fine-tune", enabled=progress, unit="step", initial=step)
        try:
            while step < total:
                picks = [order.indices(micro + k) for k in range(s.grad_accum)]
                work = []
                n_tok = 0
                for idx in picks:  # counted and indexed on the host, copied without waiting
                    b = collate([seqs[i] for i in idx], pad)
                    index, target = _answer_targets(b["labels"])
                    n_tok += int(index.numel())
                    work.append(({k: to_device(v) for k, v in b.items() if k != "labels"},
                                 to_device(index), to_device(target)))
                if n_tok == 0:
                    raise DataFormatError(f"step {step + 1} has no answer tokens to train on")
                optimizer.zero_grad(set_to_none=True)
                loss_sum = None
                for inputs, index, target in work:
                    with autocast:
                        part = _answer_loss_sum(peft_model, inputs, index, target)
                        objective = part / n_tok
                        if aux_loss is not None:
                            objective = objective + s.balance_coef * aux_loss(peft_model) / s.grad_accum
                    objective.backward()
                    part = part.detach().to(acc_dtype)
                    loss_sum = part if loss_sum is None else loss_sum + part
                tokens_seen += sum(len(seqs[i]["input_ids"]) for idx in picks for i in idx)
                if s.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                micro += s.grad_accum
                pending.append((step, n_tok, loss_sum))
                checkpoint = step % s.save_every == 0 or step == total
                if checkpoint or on_step is not None or step % s.log_every == 0:
                    read_losses()
                if checkpoint:
                    elapsed = seconds_before + time.perf_counter() - t0
                    _write_checkpoint(out / CHECKPOINTS, step, peft_model, optimizer, scheduler, {
                        "step": step, "micro_step": micro, "total_steps": total, "tokens_seen": tokens_seen,
                        "seconds": elapsed, "loss_steps": loss_steps, "loss_values": loss_values,
                        "run": run_id}, s.keep_checkpoints)
                    write_json(out / RESULTS, result_record(elapsed).to_dict())
                bar.update(1)
                if on_step is not None:
                    on_step(step, loss_values[-1])
        finally:
            bar.close()
        peft_model.eval()
        elapsed = seconds_before + time.perf_counter() - t0
        adapter_dir = save(peft_model, out / ADAPTER)
        result = result_record(elapsed)
        results_path = write_json(out / RESULTS, result.to_dict())
        log.info("fine-tuned %s for %d steps: loss %.4f → %.4f; adapter in %s", spec.method, total,
                 loss_values[0] if loss_values else float("nan"), loss_values[-1] if loss_values else float("nan"),
                 adapter_dir)
        return FinetuneRun(model=peft_model, result=result, out=out, adapter_dir=adapter_dir,
                           results_path=results_path, resumed_from=resumed_from)
    except BaseException:
        # interrupted or failed: the newest checkpoint holds the state; hand the caller's model
        # back without adapters, as it came in
        peft_model.unload()
        model.train(was_training)
        raise


def _describe_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs.append(_describe_diff(va, vb, f"{prefix}{key}."))
        else:
            sa, sb = json.dumps(va)[:40], json.dumps(vb)[:40]
            diffs.append(f"{prefix}{key}: {sa} then, {sb} now")
    return "; ".join(d for d in diffs if d)[:600]
