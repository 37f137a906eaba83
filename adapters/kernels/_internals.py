"""Every private torch and Triton internal the adapter layers use, in one place, each beside its
public-API fallback.

The fast paths of the adapter layers save host time per call (on a training step most adapter layers
are bound by the host's launch rate, not by the GPU) through a few private entry points:

- ``super(torch.autograd.Function, cls).apply``: applies a custom autograd function without the
  functorch wrapper that the public ``cls.apply`` adds (same graph, one Python frame less);
- ``torch._C._are_functorch_transforms_active``: whether vmap/grad transforms are active (then the
  public ``cls.apply`` must be used);
- ``torch.ops.aten._unsafe_view``: a reshape whose result autograd does not treat as a view, so an
  output of a custom function may be modified in place afterwards;
- the private hook dictionaries of ``nn.Module`` (instance and global), to prove that ``base(x)`` is
  exactly ``F.linear(x, W, b)``;
- ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``, so that compiled transformer
  blocks hold their activation checkpoint in the graph (:mod:`adapters.train.compiled`);
- Triton's compiled-kernel launcher (``kernel.run`` with ``packed_metadata``) and
  ``torch._C._cuda_getCurrentRawStream``, to launch a kernel already compiled for the same argument
  specialisation without Triton's per-call argument binding.

At import each is checked: the torch version is one these uses were written against (2.4 … 2.x) and
every attribute exists. ``GEOPROBE_PRIVATE_APIS=0`` (the one switch) turns them all off; when a check
fails they are off too, with one log line saying which. Off, every helper here takes its public
fallback: ``cls.apply``, "transforms may be active", ``reshape(...).clone()``, "cannot prove the base
is plain", ``kernel[grid](...)``. The fallbacks give the same values and gradients (tested).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from geoprobe.runtime import env_flag

__all__ = ["PRIVATE_APIS", "set_private_apis", "function_apply", "transforms_active", "compiling",
           "checkpoint_side_effects_skipped",
           "unsafe_view", "unhooked_plain_linear", "DirectLauncher"]

logger = logging.getLogger(__name__)

SWITCH = "GEOPROBE_PRIVATE_APIS"
_TESTED_MAJOR = 2


def _check() -> Optional[str]:
    """None when every private entry point used here exists in this torch; else why not."""
    try:
        major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return f"unrecognised torch version {torch.__version__}"
    if major != _TESTED_MAJOR or minor < 4:
        return f"torch {torch.__version__} is outside the tested range 2.4 … 2.x"
    from torch.nn.modules import module as nn_module

    needs = [(torch._C, "_are_functorch_transforms_active"), (torch.ops.aten, "_unsafe_view")]
    needs += [(nn_module, f"_global_{kind}_hooks") for kind in ("forward", "forward_pre", "backward",
                                                               "backward_pre")]
    missing = [name for owner, name in needs if not hasattr(owner, name)]
    if missing:
        return f"torch {torch.__version__} lacks {', '.join(missing)}"
    return None


def _initial() -> bool:
    if not env_flag(SWITCH, default=True):
        return False
    reason = _check()
    if reason is not None:
        logger.info("adapter fast paths use public APIs only: %s", reason)
    return reason is None


PRIVATE_APIS = _initial()


def set_private_apis(enabled: bool) -> bool:
    """Turn the private entry points on or off for this process (on only where the import check passed);
    returns the previous setting. Tests use it to run the public fallbacks."""
    global PRIVATE_APIS
    previous = PRIVATE_APIS
    PRIVATE_APIS = bool(enabled) and _check() is None
    return previous


# --------------------------------------------------------------------------- autograd
def function_apply(fn: type[torch.autograd.Function]) -> Callable[..., Any]:
    """A callable applying custom autograd function ``fn``: the private direct apply (no functorch
    wrapper) while transforms are inactive and private entry points are on, ``fn.apply`` otherwise."""
    public = fn.apply
    direct = super(torch.autograd.Function, fn).apply  # type: ignore[misc]

    def apply(*args: Any) -> Any:
        if PRIVATE_APIS and not torch._C._are_functorch_transforms_active():
            return direct(*args)
        return public(*args)

    return apply


def transforms_active() -> bool:
    """True when functorch transforms (vmap, grad) may be active: always True with private entry points
    off, so callers take their general path."""
    return not PRIVATE_APIS or bool(torch._C._are_functorch_transforms_active())


def compiling() -> bool:
    """True while ``torch.compile`` traces the caller (``torch.compiler.is_compiling``). The C++ nodes
    and direct Triton launches are opaque to the compiler, each one a graph break that splits a compiled
    block (and its CUDA graph) in two; the adapter layers then take their plain torch formulas, which
    Inductor fuses into the block's own kernels."""
    return torch.compiler.is_compiling()


def checkpoint_side_effects_skipped() -> Any:
    """A context in which ``torch.compile`` traces activation checkpointing over a forward with side effects
    (HydraLoRA's stored balance loss, a context variable set by transformers' hub-kernel layers) by not
    replaying them in the backward's recompute (``torch._dynamo.config``'s
    ``skip_fwd_side_effects_in_bwd_under_checkpoint``); without it the checkpoint is a graph break. A no-op
    context where that setting does not exist or private entry points are off."""
    import contextlib

    import torch._dynamo

    config = torch._dynamo.config
    if PRIVATE_APIS and hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    return contextlib.nullcontext()


def unsafe_view(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` reshaped to ``shape`` as a tensor autograd does not treat as a view of ``t`` (so it may be
    returned from a custom function and modified in place): ``aten._unsafe_view`` (no copy), or a
    reshaped copy with private entry points off."""
    if PRIVATE_APIS:
        return torch.ops.aten._unsafe_view.default(t, shape)
    return t.reshape(shape).clone()


# --------------------------------------------------------------------------- modules
def unhooked_plain_linear(module: nn.Module) -> bool:
    """True when calling ``module`` is exactly ``F.linear(x, W, b)``: a plain ``nn.Linear`` (not a
    subclass, no instance ``forward``) with no module or global hooks. False whenever that cannot be
    proved (private entry points off)."""
    if not PRIVATE_APIS or type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    from torch.nn.modules import module as nn_module

    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
                or nn_module._global_backward_pre_hooks)


# --------------------------------------------------------------------------- Triton launches
def _spec_key(args: tuple) -> tuple:
    """What Triton's argument binder specialises a launch on: each tensor's dtype and 16-byte
    alignment, each integer's ``== 1``, divisibility by 16 and 32-bit range, any other value's type
    (and a bool's value)."""
    tensor = torch.Tensor
    return tuple([(v.dtype, v.data_ptr() & 15 == 0) if type(v) is tensor or isinstance(v, tensor)
                  else (v == 1, v & 15 == 0, -0x80000000 <= v <= 0x7FFFFFFF) if type(v) is int
                  else (bool, v) if type(v) is bool else type(v) for v in args])


def _launch_hooks() -> bool:
    """True when a Triton launch hook is installed (a profiler): Triton must then build launch metadata.
    The hook is a function or None in older Triton, a chain of functions (empty by default) in newer."""
    import triton

    knobs = getattr(triton, "knobs", None)
    hook = knobs.runtime.launch_enter_hook if knobs is not None else None
    return hook is not None and bool(getattr(hook, "calls", True))


class DirectLauncher:
    """``fn[(grid0,)](*args, **meta)`` with Triton's per-call argument binding done once per
    specialisation.

    The first launch with a given :func:`_spec_key` (plus the meta-parameters) goes through Triton's
    own ``JITFunction.run``, which compiles, binds and launches, and returns the compiled kernel; later
    launches with the same key call that kernel's C launcher directly with the arguments in signature
    order, as ``JITFunction.run`` itself does after binding. Launch hooks (profilers), the interpreter
    (``interpreting=True``) and private entry points off always take Triton's public path."""

    def __init__(self, fn: Any, *, interpreting: bool = False):
        self.fn = fn
        self.interpreting = interpreting
        self.cache: dict[tuple, Any] = {}

    def __call__(self, grid0: int, args: tuple, **meta: Any) -> None:
        if not PRIVATE_APIS or self.interpreting or _launch_hooks():
            self.fn[(grid0,)](*args, **meta)
            return
        key = (_spec_key(args), tuple(meta.items()))
        entry = self.cache.get(key)
        if entry is None:
            kernel = self.fn[(grid0,)](*args, **meta)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            names = self.fn.arg_names[len(args):]
            self.cache[key] = (kernel, tuple(meta[n] for n in names))
            return
        kernel, tail = entry
        stream = torch._C._cuda_getCurrentRawStream(args[0].device.index)
        kernel.run(grid0, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
