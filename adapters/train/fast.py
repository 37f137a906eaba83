"""Liger-Kernel's fused kernels for fine-tuning on CUDA: whether they apply, applying them to one model
instance, taking them off again, and the fused linear cross-entropy of the answer loss.

What is applied (Liger-Kernel ≥ 0.6, ``pip install 'geoprobe[fast]'``; https://github.com/linkedin/Liger-Kernel).
Liger's per-architecture function (``liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN``
keyed by ``config.model_type``, e.g. ``apply_liger_kernel_to_llama``) is called with ``model=`` the
instance, before the adapters are built. For a Llama it

- binds ``LigerRMSNorm.forward`` to every RMSNorm instance (the final norm and both norms of each decoder
  layer): y = w ⊙ x / √(mean(x²) + ε), one Triton kernel forward and one backward;
- binds ``LigerSwiGLUMLP.forward`` to every MLP instance: ``down_proj(silu(gate_proj(x)) ⊙ up_proj(x))``
  with the SiLU-and-product fused (its backward recomputes silu). The projections are still called as
  submodules, so the adapter layers PEFT puts in place of ``up_proj`` / ``down_proj`` afterwards run
  as they do without Liger;
- replaces the modeling module's ``apply_rotary_pos_emb`` by ``liger_rotary_pos_emb`` (q·cos + rot(q)·sin
  for q and k in one kernel). That function is looked up by every attention layer of the architecture,
  so it is process-wide: here it is wrapped so that tensors off CUDA still take the original function.

Liger also replaces the architecture's classes in the modeling module (``LlamaRMSNorm = LigerRMSNorm``,
``LlamaMLP = LigerSwiGLUMLP``), which would change every model built later in the process; those are put
back at once (the instance is already patched). Liger's cross-entropy patches (which replace
``torch.nn.functional.cross_entropy`` for all of transformers' losses, or the model's ``forward``) are
never requested: the fused loss here is :func:`fused_cross_entropy`, called by
:func:`adapters.train.loss.answer_loss_sum`. :meth:`Applied.revert` restores the instance and the
modeling module as they were (the trainer does so when the run ends or fails).

The decision (:func:`decide`) is a :class:`FastKernels` record, written into the run's results: applied,
or why not — switched off (``--no-fast-kernels``), the model not on CUDA, liger-kernel not installed or
not importable (Triton missing: its message), an architecture Liger does not cover, FSDP shards. No
private name of Liger or torch is used: only the public per-architecture functions and loss module.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from geoprobe.profile import Record

__all__ = ["FastKernels", "Applied", "PACKAGE", "INSTALL", "MIN_VERSION", "FUSED_LOSS_MODEL_TYPES", "decide",
           "apply", "fused_cross_entropy", "describe"]

log = logging.getLogger(__name__)

PACKAGE = "liger-kernel"
INSTALL = "pip install 'geoprobe[fast]'"
MIN_VERSION = (0, 6)
FUSED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "smollm3")
"""Architectures whose causal-LM ``forward`` returns the output layer's result unchanged (no logit
soft-capping or scaling), so that fusing the output layer with the cross-entropy gives the same loss."""
_WANTED = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
           "fused_linear_cross_entropy": False}
_NOT_PATCHES = ("model", "cross_entropy", "fused_linear_cross_entropy")


@dataclass(frozen=True)
class FastKernels(Record):
    """Whether Liger-Kernel's kernels serve a run, and why not.

    ``applied``: the per-architecture patches were applied to the model instance; ``reason`` says why not
    ("" when applied). ``patches``: the kernels switched on (``rope``, ``rms_norm``, ``swiglu`` …);
    ``patched_modules``: the module instances whose forward Liger rebound. ``fused_loss``: the answer loss
    fuses the output layer with the cross-entropy (:func:`fused_cross_entropy`); ``fused_loss_reason``
    why not. ``blocks_compiled``: the blocks are compiled (``--compile``), so no module is patched and
    only the fused loss serves.
    """

    applied: bool
    reason: str = ""
    package: str = PACKAGE
    version: Optional[str] = None
    model_type: Optional[str] = None
    patches: tuple[str, ...] = ()
    patched_modules: int = 0
    fused_loss: bool = False
    fused_loss_reason: str = ""
    blocks_compiled: bool = False


def describe(record: FastKernels) -> str:
    """The record in one line, for the log."""
    if not record.applied:
        return f"fast kernels off: {record.reason}"
    loss = "fused linear cross-entropy" if record.fused_loss else f"plain loss ({record.fused_loss_reason})"
    kernels = ("no module patched: the blocks are compiled" if record.blocks_compiled
               else f"{', '.join(record.patches)}; {record.patched_modules} modules")
    return f"fast kernels on: {record.package} {record.version} on {record.model_type} ({kernels}), {loss}"


def _off(reason: str, **fields: Any) -> FastKernels:
    return FastKernels(applied=False, reason=reason, fused_loss_reason="fast kernels off", **fields)


def _version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _too_old(version: Optional[str]) -> bool:
    try:
        parts = tuple(int(p) for p in (version or "").split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts < MIN_VERSION


LIGER_BACKEND_LOGGER = "liger_kernel.backends.registry"
"""The logger through which Liger reports, at each kernel's first call, every optional backend of that
kernel it could not import (CuTe DSL, Ascend): one warning per backend and kernel, while the Triton
kernel it then runs is there."""


class _QuietOptionalBackends(logging.Filter):
    """Drops Liger's "Backend impl … could not be imported" warnings (optional backends that need
    packages or hardware the run does not use); every other record of that logger passes. The run's own
    one log line (:func:`describe`) says what serves it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Backend impl ")


def quiet_optional_backends() -> None:
    """Install :class:`_QuietOptionalBackends` on Liger's backend logger, once."""
    logger = logging.getLogger(LIGER_BACKEND_LOGGER)
    if not any(isinstance(f, _QuietOptionalBackends) for f in logger.filters):
        logger.addFilter(_QuietOptionalBackends())


def _apply_functions() -> dict[str, Callable[..., None]]:
    """Liger's table model_type → apply function (importing Liger, and with it Triton)."""
    quiet_optional_backends()
    return importlib.import_module("liger_kernel.transformers.monkey_patch").MODEL_TYPE_TO_APPLY_LIGER_FN


def decide(model: Any, *, enabled: bool = True, device: Any = None, sharded: bool = False,
           compiled_blocks: bool = False) -> FastKernels:
    """Whether Liger's kernels apply to ``model`` (nothing is changed): switched on (``enabled``),
    ``device`` (default: the device of the model's first parameter) is CUDA, the parameters are not FSDP
    shards (``sharded``), liger-kernel ≥ 0.6 imports, and it covers ``model.config.model_type``.

    With ``compiled_blocks`` no module is patched (every per-architecture patch acts inside the
    transformer blocks) and only the fused loss, outside the blocks, remains: Inductor generates fused
    kernels for the norms, the rotary embedding and SwiGLU itself, and Liger's Triton kernels inside a
    compiled graph fail to compile with torch 2.11 (``'float' object has no attribute 'to'`` in the
    kernel wrapper, then the eager fallback at every call)."""
    if not enabled:
        return _off("switched off (--no-fast-kernels)")
    if device is None:
        device = next(model.parameters()).device
    kind = getattr(device, "type", str(device))
    if kind != "cuda":
        return _off(f"the model is on {kind}, and Liger-Kernel's Triton kernels run on CUDA")
    if sharded:
        return _off("the parameters are FSDP shards, which the instance patches do not cover")
    try:
        table = _apply_functions()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "liger_kernel":
            return _off(f"{PACKAGE} is not installed ({INSTALL})")
        return _off(f"{PACKAGE} cannot be imported: {exc}")
    except Exception as exc:  # Triton fails to import or finds no driver: recorded, the run goes on without
        return _off(f"{PACKAGE} cannot be imported: {type(exc).__name__}: {exc}")
    version = _version()
    if _too_old(version):
        return _off(f"{PACKAGE} {version} is older than {'.'.join(map(str, MIN_VERSION))} ({INSTALL})",
                    version=version)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        return _off(f"{PACKAGE} has no kernels for model type {model_type!r}", version=version,
                    model_type=model_type)
    params = inspect.signature(table[model_type]).parameters
    patches = () if compiled_blocks else tuple(name for name, p in params.items() if name not in _NOT_PATCHES
                                               and _WANTED.get(name, p.default) is True)
    return FastKernels(applied=True, version=version, model_type=model_type, patches=patches,
                       fused_loss_reason="not decided yet", blocks_compiled=compiled_blocks)


# --------------------------------------------------------------------------- applying and reverting
_MISSING = object()


class Applied:
    """Liger's patches on one model instance, with what they replaced: :meth:`revert` puts back the
    attributes Liger set on module instances and the names it swapped in the modeling module (nothing
    else: adapters built afterwards stay)."""

    def __init__(self, changes: list[tuple[Any, dict[str, Any]]], module: Any,
                 globals_before: dict[str, Any]) -> None:
        self._changes, self._module, self._globals = changes, module, globals_before
        self.patched_modules = sum(1 for _, old in changes if "forward" in old)

    def revert(self) -> None:
        """Undo the patches. Idempotent."""
        for m, old in self._changes:
            now = vars(m)
            for key, value in old.items():
                if value is _MISSING:
                    now.pop(key, None)
                else:
                    now[key] = value
        for name, value in self._globals.items():
            if value is _MISSING:
                vars(self._module).pop(name, None)
            else:
                setattr(self._module, name, value)
        self._changes, self._globals = [], {}


def _instance_changes(model: Any, before: dict[int, dict[str, Any]]) -> list[tuple[Any, dict[str, Any]]]:
    """(module, {attribute: its value before, or _MISSING}) for every module instance whose own
    attributes changed since ``before``."""
    out = []
    for m in model.modules():
        old = before.get(id(m), {})
        diff = {k: old.get(k, _MISSING) for k, v in vars(m).items() if old.get(k, _MISSING) is not v}
        if diff:
            out.append((m, diff))
    return out


def _on_cuda_only(liger_fn: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """A function (the rotary embedding, q first) that runs Liger's version when its first argument is a
    CUDA tensor and ``original`` otherwise."""

    def on_cuda_only(*args: Any, **kwargs: Any) -> Any:
        fn = liger_fn if args and getattr(args[0], "is_cuda", False) else original
        return fn(*args, **kwargs)

    on_cuda_only.__name__ = getattr(original, "__name__", "on_cuda_only")
    on_cuda_only.__wrapped__ = original  # type: ignore[attr-defined]
    on_cuda_only.liger = liger_fn  # type: ignore[attr-defined]
    return on_cuda_only


def apply(model: Any, decision: FastKernels) -> tuple[FastKernels, Optional[Applied]]:
    """Apply Liger's kernels to ``model`` where ``decision`` says they apply; (the record with the count of
    patched modules, the handle to revert them) or (``decision``, None). Classes that Liger swaps in the
    modeling module are put back at once; a function it swaps (the rotary embedding) stays swapped,
    wrapped to serve CUDA tensors only, until :meth:`Applied.revert`."""
    if not decision.applied:
        return decision, None
    module = sys.modules[type(model).__module__]
    if decision.blocks_compiled:  # the fused loss only, nothing to patch
        return decision, Applied([], module, {})
    fn = _apply_functions()[decision.model_type]
    globals_before = dict(vars(module))
    before = {id(m): dict(vars(m)) for m in model.modules()}
    params = inspect.signature(fn).parameters
    failure: Optional[Exception] = None
    try:
        fn(model=model, **{k: k in decision.patches for k, p in params.items()
                           if k != "model" and (k in _WANTED or isinstance(p.default, bool))})
    except Exception as exc:  # a module layout Liger did not expect: nothing stays patched, the run goes on
        failure = exc
    changed = {name: globals_before.get(name, _MISSING) for name, value in vars(module).items()
               if globals_before.get(name, _MISSING) is not value}  # name → its value before, or _MISSING
    if failure is not None:
        Applied(_instance_changes(model, before), module, changed).revert()
        return dataclasses.replace(_off(f"{PACKAGE} could not patch this {decision.model_type} model: "
                                        f"{type(failure).__name__}: {failure}"), version=decision.version,
                                   model_type=decision.model_type), None
    for name, old in changed.items():
        value = vars(module)[name]
        if inspect.isclass(value) or old is _MISSING or not callable(old):
            if old is _MISSING:
                delattr(module, name)
            else:
                setattr(module, name, old)  # a class swap would reach every model built later
        else:
            setattr(module, name, _on_cuda_only(value, getattr(old, "__wrapped__", old)))
    handle = Applied(_instance_changes(model, before), module, changed)
    return dataclasses.replace(decision, patched_modules=handle.patched_modules), handle


# --------------------------------------------------------------------------- the fused loss
def fused_cross_entropy(decision: FastKernels, head: Any) -> tuple[FastKernels, Optional[Callable[..., Any]]]:
    """The fused linear cross-entropy for output layer ``head`` where it gives the plain loss:
    (record, ``loss(weight, rows, target, bias)``) returning Σ_k −log softmax(rows_k Wᵀ + b)_{target_k}
    (Liger's ``LigerFusedLinearCrossEntropyLoss(reduction="sum")``: the logits are computed chunk by
    chunk and never held whole; the input gradient is computed in the forward pass), or (record, None)
    with the reason. It needs the fast kernels applied, an architecture whose logits are the output
    layer's result unchanged (:data:`FUSED_LOSS_MODEL_TYPES`), and a plain ``nn.Linear`` head whose weight
    is an ordinary tensor (tied to the input embeddings or not; a bias is passed on) — not an adapter
    layer or a wrapper on the head, not an FSDP shard."""
    import torch

    if not decision.applied:
        return decision, None
    why = None
    if decision.model_type not in FUSED_LOSS_MODEL_TYPES:
        why = f"model type {decision.model_type!r} may transform the logits after the output layer"
    elif type(head) is not torch.nn.Linear or "forward" in vars(head):
        why = f"the output layer is a {type(head).__name__}, not a plain Linear layer"
    elif type(head.weight) not in (torch.nn.Parameter, torch.Tensor):
        why = f"the output layer's weight is a {type(head.weight).__name__}, not a plain tensor"
    elif head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        why = f"the output layer's weight is {head.weight.dtype}; the fused kernel takes float32, bf16, fp16"
    if why is not None:
        return dataclasses.replace(decision, fused_loss=False, fused_loss_reason=why), None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return (dataclasses.replace(decision, fused_loss=True, fused_loss_reason=""),
            LigerFusedLinearCrossEntropyLoss(reduction="sum"))
