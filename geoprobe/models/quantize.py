"""4-bit bases for fine-tuning (QLoRA, Dettmers et al. 2023, arXiv 2305.14314): every linear layer of a
loaded model but its output and task heads becomes a bitsandbytes ``Linear4bit`` holding NF4 codes.

The recipe is QLoRA's: NormalFloat-4 codes in blocks of 64 weights, each block's absmax itself quantized
to 8 bits in blocks of 256 (double quantization), products computed in bfloat16:
``Linear4bit(x) = x · dequantize_4bit(W)ᵀ (+ b)`` with the dequantized weight formed in the compute dtype.
Embeddings, norms and the output head stay in the model's dtype (bfloat16 by default with
``quantize="4bit"``), as ``transformers``' ``BitsAndBytesConfig(load_in_4bit=True)`` leaves them.

Why the loaded model is quantized layer by layer here rather than through ``from_pretrained``'s
``quantization_config``: the loader reads four sources (a hub id, a folder, a ``.gguf`` file through its
cached safetensors copy, the embedded default), and a GGUF checkpoint is dequantized by transformers'
own GGUF path, which takes no second quantizer. One routine after the load serves every source the same
way, gives the same NF4 codes whatever the source (``bitsandbytes.functional.quantize_4bit`` of the
same weights), and needs no transformers-version-specific quantizer. The model is read into host memory
(its full-precision weights never reach the GPU) and each ``nn.Linear`` is quantized as it is moved to
the device (:func:`quantize_model`), so the GPU holds only the 4-bit model plus one layer's weights.

:func:`check_quantization` refuses, before anything is loaded, an unknown value, a missing
bitsandbytes and a device without CUDA (the product's option needs a GPU; :func:`quantize_model` itself
is device-agnostic, so tests exercise the layers on the CPU, where bitsandbytes computes NF4 as well).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional

from ..errors import DeviceError, MissingDependencyError, ModelLoadError
from ..records import Record

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("4bit",)
"""The values ``--quantize`` accepts."""

INSTALL_HINT = "pip install bitsandbytes (or pip install 'geoprobe[qlora]')"
BLOCKSIZE = 64
"""Weights per NF4 block (QLoRA's, and bitsandbytes' default)."""
QUANT_TYPE = "nf4"
COMPUTE_DTYPE = "bfloat16"
DEFAULT_DTYPE = "bfloat16"
"""The dtype of what stays unquantized (embeddings, norms, heads) when no dtype is asked for."""

__all__ = ["QUANTIZE_CHOICES", "INSTALL_HINT", "Quantization", "check_quantize_value", "require_bitsandbytes",
           "check_quantization", "quantize_model", "linear_4bit", "quantization_of",
           "dequantized_weight"]


@dataclass(frozen=True)
class Quantization(Record):
    """How a base model was quantized: ``method`` (bitsandbytes), ``bits``, ``quant_type`` (nf4),
    ``double_quant`` (the absmax statistics quantized again), ``blocksize``, ``compute_dtype`` of the
    products, ``n_layers`` linear layers quantized, ``kept`` (linear layers left in full precision: the
    output and task heads) and the bitsandbytes ``version``."""

    method: str
    bits: int
    quant_type: str
    double_quant: bool
    blocksize: int
    compute_dtype: str
    n_layers: int
    kept: list[str] = field(default_factory=list)
    version: str = ""


def check_quantize_value(quantize: Optional[str], *, flag: str = "--quantize") -> Optional[str]:
    """``quantize`` normalised ("4bit"), or None for no quantization (None, "" or "none").

    Raises:
        ModelLoadError: a value that is not one of :data:`QUANTIZE_CHOICES`; the message lists them.
    """
    if quantize is None:
        return None
    key = str(quantize).strip().lower()
    if key in ("", "none"):
        return None
    if key not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"{flag} {quantize}: unknown quantization; choose one of: "
                             f"{', '.join(QUANTIZE_CHOICES)} (bitsandbytes NF4 with double quantization)")
    return key


def require_bitsandbytes(flag: str = "--quantize 4bit") -> Any:
    """The ``bitsandbytes`` module; :class:`MissingDependencyError` naming the install command when it is
    not installed (or cannot be imported)."""
    try:
        import bitsandbytes
    except ImportError:
        raise MissingDependencyError(f"{flag} needs the bitsandbytes package: {INSTALL_HINT}") from None
    except Exception as exc:  # a broken install (missing native library) raises other errors on import
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MissingDependencyError(f"{flag}: bitsandbytes is installed but cannot be imported ({first}); "
                                     f"reinstall it: {INSTALL_HINT}") from None
    if not hasattr(getattr(bitsandbytes, "nn", None), "Linear4bit"):
        raise MissingDependencyError(f"{flag}: this bitsandbytes {getattr(bitsandbytes, '__version__', '')} has "
                                     f"no 4-bit layers; upgrade it: pip install -U 'bitsandbytes>=0.46'")
    return bitsandbytes


def check_quantization(quantize: Optional[str], device: Any, *, flag: str = "--quantize") -> Optional[str]:
    """The checks of the user-facing option, cheap and before any load, in this order: the value
    (:func:`check_quantize_value`), the package (:func:`require_bitsandbytes`), the device (a CUDA GPU).
    Returns the normalised value, or None for no quantization.

    Raises:
        ModelLoadError: an unknown value. MissingDependencyError: bitsandbytes missing.
        DeviceError: a device other than CUDA.
    """
    value = check_quantize_value(quantize, flag=flag)
    if value is None:
        return None
    require_bitsandbytes(f"{flag} {value}")
    kind = str(device).split(":", 1)[0]
    if kind != "cuda":
        raise DeviceError(f"{flag} {value} needs a CUDA GPU (bitsandbytes' NF4 kernels for training); "
                          f"--device {device} has none. Leave out {flag} on this machine, or run on a GPU")
    return value


def _torch_dtype(name: Any) -> "torch.dtype":
    import torch

    return name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."))


def linear_4bit(linear: "nn.Linear", *, device: Any = None, compute_dtype: Any = COMPUTE_DTYPE) -> "nn.Module":
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight as NF4 codes (double-quantized absmax,
    blocks of :data:`BLOCKSIZE`), quantized on ``device`` (default: the weight's device); the bias is
    kept, frozen, in its dtype. ``linear`` is left as it was."""
    import torch

    bnb = require_bitsandbytes()
    weight = linear.weight.detach()
    target = torch.device(device) if device is not None else weight.device
    module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=_torch_dtype(compute_dtype), compress_statistics=True,
                               quant_type=QUANT_TYPE, device="meta")
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                      quant_type=QUANT_TYPE, blocksize=BLOCKSIZE, module=module).to(target)
    if linear.bias is not None:
        module.bias = torch.nn.Parameter(linear.bias.detach().to(target), requires_grad=False)
    module.train(linear.training)
    return module


def dequantized_weight(module: Any) -> "torch.Tensor":
    """The weight a ``Linear4bit`` computes with: ``bitsandbytes.functional.dequantize_4bit`` of its codes
    (the weight's dtype before quantization), shape (out, in)."""
    bnb = require_bitsandbytes()
    weight = module.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def _kept_linears(model: Any) -> set[str]:
    """Names of the linear layers left in full precision: the output embedding (an LM head) and the task
    heads (a classifier's ``score``/``classifier``), which are small next to the blocks and which a
    fine-tune may train in full."""
    from .common import head_module_names

    kept: set[str] = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = tuple(head_module_names(model))
    for name, module in model.named_modules():
        if out is not None and module is out:
            kept.add(name)
        elif heads and name.split(".", 1)[0] in heads:
            kept.add(name)
    return kept


def _plain_linears(model: Any, kept: Iterable[str]) -> list[str]:
    import torch.nn as nn

    skip = set(kept)
    return [name for name, m in model.named_modules() if name and type(m) is nn.Linear and name not in skip]


def quantize_model(model: Any, *, device: Any = None, compute_dtype: Any = COMPUTE_DTYPE) -> Quantization:
    """Replace, in place and one layer at a time, every plain ``nn.Linear`` of ``model`` except the output
    and task heads by :func:`linear_4bit` quantized on ``device`` (default: where each weight is), then move
    the rest of the model to ``device``. Marks the model as PEFT and transformers recognise a 4-bit base
    (``is_loaded_in_4bit``) and records the :class:`Quantization` on it (:func:`quantization_of`).

    Works on any device bitsandbytes supports (the CPU included); the user-facing checks are
    :func:`check_quantization`'s."""
    import torch

    bnb = require_bitsandbytes()
    kept = _kept_linears(model)
    names = _plain_linears(model, kept)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear_4bit(getattr(parent, child), device=device, compute_dtype=compute_dtype))
    if device is not None:
        model.to(torch.device(device))
    record = Quantization(method="bitsandbytes", bits=4, quant_type=QUANT_TYPE, double_quant=True,
                          blocksize=BLOCKSIZE, compute_dtype=str(_torch_dtype(compute_dtype)).removeprefix("torch."),
                          n_layers=len(names), kept=sorted(kept), version=str(getattr(bnb, "__version__", "")))
    model.is_loaded_in_4bit = True
    model.geoprobe_quantization = record
    logger.info("quantized %d linear layers to 4-bit NF4 (kept in full precision: %s)", len(names),
                ", ".join(sorted(kept)) or "none")
    return record


def quantization_of(model: Any) -> Optional[Quantization]:
    """The :class:`Quantization` of a model quantized by :func:`quantize_model` (a PEFT model is judged by
    its base model), or None."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        model = model.get_base_model()
    return getattr(model, "__dict__", {}).get("geoprobe_quantization")
