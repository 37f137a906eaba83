"""HypLoRA's PEFT layer: a LoRA ``Linear`` variant whose update is h = W x + (α/r)·Δ(dropout(x)), with
Δ the Lorentz-routed map of :mod:`adapters.hyplora.functional` (arXiv 2410.04010).

:class:`HypLoraLinear` subclasses ``peft.tuners.lora.Linear``; :class:`~adapters.hyplora.config.HypLoraConfig`
registers it for every targeted ``nn.Linear`` (and :class:`UnsupportedTarget` for every other module type).
Its options are read off the config (:func:`adapters.hyplora.options.options_of`). The update is
nonlinear in x, so it cannot be merged into W (nor into a 4-bit base): every merge entry point refuses with
:class:`~geoprobe.errors.AdapterError` and leaves the weights unchanged. In official mode (the
reference formula) the gradient of the raw curvature is clipped to ±0.01, as the reference does.

On a 4-bit base (QLoRA: a bitsandbytes ``Linear4bit``, which PEFT dispatches here as an ``nn.Linear``
subclass) the base product stays outside HypLoRA's node: ``base_layer(x) = x · dequantize_4bit(W)ᵀ`` is
computed by the bitsandbytes module and :func:`~adapters.hyplora.kernels.hyplora_linear_fused` adds
(α/r)·Δ(x) to it; the one-node path that forms W x itself serves only a frozen plain ``nn.Linear``
(:func:`~adapters.kernels.frozen_linear.frozen_plain_linear`, False for a 4-bit base).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import check_adapters_to_merge

from geoprobe.errors import AdapterError
from ..kernels._internals import compiling

from .functional import REF_K_GRAD_CLIP, bottleneck, initial_scale, inverse_positive, positive
from .kernels import (autocast_off, hyplora_bottleneck_fused, hyplora_layer_native, hyplora_linear_fused,
                      linear_fast_path)
from .options import check_lora_settings, options_of

logger = logging.getLogger(__name__)

__all__ = ["NOT_MERGEABLE", "HypLoraLinear", "UnsupportedTarget"]

NOT_MERGEABLE = "HypLoRA is not mergeable: its update is nonlinear in x"


# --------------------------------------------------------------------------- the PEFT layer
class _ClipGrad(torch.autograd.Function):
    """Identity whose backward clamps the incoming gradient to [−c, c] (the reference's hook on the
    raw curvature, written without tensor hooks so the module stays copyable)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.bound = bound
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(-ctx.bound, ctx.bound), None


def _not_mergeable(names: Sequence[str]) -> AdapterError:
    return AdapterError(
        f"{NOT_MERGEABLE} (adapter {', '.join(map(repr, names))}): Δ = √K·asinh(‖BAx_s‖/√K)·BAx_s/‖BAx_s‖ "
        "changes length with every token, so no weight matrix W + ΔW reproduces it. Keep the adapter "
        "unmerged (run the PeftModel), or train plain LoRA if a merged checkpoint is required.")


class _HypLoraVariant(LoraVariant):
    """Hooks HypLoRA into PEFT's per-adapter dispatch (regular and mixed-batch forward, merge)."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module, adapter_name: str, **kwargs: Any) -> None:
        return None

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise _not_mergeable([active_adapter])

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        raise _not_mergeable([active_adapter])

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise _not_mergeable([active_adapter])

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return result + module.hyp_delta(active_adapter, x).to(result.dtype)


class HypLoraLinear(LoraLinear):
    """PEFT LoRA ``Linear`` whose update is HypLoRA's: h = W x + (α/r)·Δ(dropout(x)).

    Per adapter, besides ``lora_A``/``lora_B``: ``lora_hyp_k`` (raw curvature, K = softplus(raw) + 1e-6,
    initialised to the configured K) and ``lora_hyp_s`` (raw scale, s = softplus(raw) + 1e-6,
    initialised to √d_in). Δ is computed by :func:`hyplora_delta_bottleneck` in float32 under any
    autocast/bf16 setting and cast back (:mod:`adapters.hyplora.kernels` where they apply). Adapters added to the same layer with a config that does not
    register HypLoRA stay plain LoRA. Merging a HypLoRA adapter raises :class:`AdapterError`.
    """

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_hyp_k", "lora_hyp_s")
    other_param_names = LoraLinear.other_param_names + ("hyp_official",)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        if not hasattr(self, "lora_hyp_k"):
            self.lora_hyp_k = nn.ParameterDict({})
            self.lora_hyp_s = nn.ParameterDict({})
            self.hyp_official: dict[str, bool] = {}
        options = options_of(config)
        if options is None:  # a plain LoRA adapter added next to a HypLoRA one
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            return
        check_lora_settings(config)
        if self.resolve_lora_variant(config=config) is not None:
            raise AdapterError("HypLoRA cannot be combined with another LoRA variant requested by the LoraConfig "
                               f"({type(self.resolve_lora_variant(config=config)).__name__}); remove that option.")
        if self.in_features is None or self.out_features is None:
            raise AdapterError(f"HypLoRA needs a layer with in_features/out_features, got {type(self.base_layer)}")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        curvature = options.curvature_for(kwargs.get("target_name", "") or "")
        # shape (1,), not a 0-dim tensor: FSDP refuses scalar parameters; the dtype is lora_A's after PEFT
        # moved it to the base layer (PEFT's autocast_adapter_dtype then upcasts both to float32 or not)
        like = self.lora_A[adapter_name].weight
        self.lora_hyp_k[adapter_name] = nn.Parameter(
            torch.tensor([inverse_positive(curvature)], dtype=like.dtype, device=like.device))
        self.lora_hyp_s[adapter_name] = nn.Parameter(
            torch.tensor([inverse_positive(initial_scale(self.in_features))], dtype=like.dtype, device=like.device))
        self.hyp_official[adapter_name] = options.official
        self.lora_variant[adapter_name] = _HypLoraVariant()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        logger.debug("HypLoRA adapter %r on %s: r=%d, K0=%.4g, s0=%.4g, official=%s", adapter_name,
                     kwargs.get("target_name", "?"), r, curvature, initial_scale(self.in_features), options.official)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W x + (α/r)·Δ(dropout(x)). With one active, unmerged, consistent-map HypLoRA adapter and the
        fused kernels available, the update and the addition are one autograd node
        (:func:`adapters.hyplora.kernels.hyplora_linear_fused`); everything else (several
        adapters, mixed batches, the official map, CPU, a block being compiled) goes through PEFT's dispatch."""
        name = self._hyp_fast_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        raw_k, raw_s = self._raw_k(name), self._raw_s(name)
        dropout = self.lora_dropout[name]
        identity = type(dropout) is nn.Identity or not dropout.training
        if identity:  # base product inside the node where the native layer serves the base layer
            out = hyplora_layer_native(x, self.base_layer, A, B, raw_k, raw_s, self.scaling[name])
            if out is not None:
                return out
        result = self.base_layer(x)
        xd = x if identity else dropout(x)
        return hyplora_linear_fused(xd, result, A, B, raw_k, raw_s, self.scaling[name])

    def _hyp_fast_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[str]:
        if args or kwargs or self.disable_adapters or self.merged or compiling():
            return None  # under torch.compile: PEFT's dispatch and the plain formulas, which Inductor fuses
        active = self.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        if name not in self.lora_hyp_k or self.hyp_official.get(name, False):
            return None
        if not linear_fast_path(x, self.lora_A[name].weight, self.lora_B[name].weight):
            return None
        return name

    # -- parameters -------------------------------------------------------------------------------
    def is_hyplora(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_hyp_k

    def _raw_k(self, adapter_name: str) -> torch.Tensor:
        """The raw curvature parameter as the 0-dim tensor the formulas and kernels take (a view)."""
        return self.lora_hyp_k[adapter_name].view(())

    def _raw_s(self, adapter_name: str) -> torch.Tensor:
        """The raw scale parameter as the 0-dim tensor the formulas and kernels take (a view)."""
        return self.lora_hyp_s[adapter_name].view(())

    def hyp_curvature(self, adapter_name: str) -> torch.Tensor:
        """Current K of ``adapter_name`` (float32 scalar tensor, differentiable)."""
        return positive(self._raw_k(adapter_name).float())

    def hyp_scale(self, adapter_name: str) -> torch.Tensor:
        """Current s of ``adapter_name`` (float32 scalar tensor, differentiable)."""
        return positive(self._raw_s(adapter_name).float())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Folders saved when K and s were 0-dim tensors load into today's shape-(1,) parameters."""
        for table in ("lora_hyp_k", "lora_hyp_s"):
            for name in getattr(self, table, {}):
                key = f"{prefix}{table}.{name}"
                if key in state_dict and state_dict[key].dim() == 0:
                    state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def hyp_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """(α/r)·Δ(dropout(x)) for one adapter, in float32."""
        x = self.lora_dropout[adapter_name](x)
        official = self.hyp_official.get(adapter_name, False)
        if not official:  # fused CUDA kernels, float32 under any autocast; the reference path elsewhere
            return hyplora_bottleneck_fused(
                x.float(), self.lora_A[adapter_name].weight.float(), self.lora_B[adapter_name].weight.float(),
                self._raw_k(adapter_name).float(), self._raw_s(adapter_name).float(), self.scaling[adapter_name])
        with autocast_off(x.device.type):
            raw_k = _ClipGrad.apply(self._raw_k(adapter_name).float(), REF_K_GRAD_CLIP)
            return bottleneck(x.float(), self.lora_A[adapter_name].weight.float(),
                               self.lora_B[adapter_name].weight.float(), positive(raw_k),
                               self.hyp_scale(adapter_name), official=official,
                               out_scale=self.scaling[adapter_name])

    # -- merging is refused -----------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = check_adapters_to_merge(self, adapter_names)
        hyp = [n for n in names if self.is_hyplora(n)]
        if hyp:
            raise _not_mergeable(hyp)
        super().merge(safe_merge=safe_merge, adapter_names=names)

    def unmerge(self) -> None:
        """As LoRA: warns when nothing is merged (a HypLoRA adapter never is); unmerges merged plain
        LoRA adapters beside it."""
        super().unmerge()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if self.is_hyplora(adapter):
            raise _not_mergeable([adapter])
        return super().get_delta_weight(adapter)

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)


class UnsupportedTarget(nn.Module):
    """Registered for every module type other than nn.Linear: refuses instead of letting PEFT fall back
    to plain LoRA silently."""

    def __new__(cls, target: nn.Module, adapter_name: str, **kwargs: Any):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        raise AdapterError(
            f"HypLoRA supports nn.Linear targets only; {kwargs.get('target_name', adapter_name)!r} is a "
            f"{type(base).__name__}. Remove it from target_modules.")
