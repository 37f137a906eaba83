"""Which dtype a model is computed in, and whether the device can compute in it.

The rule (:func:`resolve_dtype`):

* ``--dtype NAME`` (float32, bfloat16, float16, float64) is used as given; ``auto`` is the
  checkpoint's own dtype;
* by default, on a CUDA device the checkpoint's dtype when it is bfloat16, float16 or float32 (an
  8B checkpoint in bfloat16 takes 16 GB, not the 32 GB of float32); a bfloat16 checkpoint on a GPU
  without native bfloat16 (before Ampere) is computed in float32 rather than float16, whose range
  (±65,504) bfloat16 activations can exceed;
* by default on the CPU (and any other device), float32: CPU kernels for bfloat16/float16 are slower
  than float32 on most processors and the probes then need no cast; a checkpoint too large for the
  memory in float32 is streamed layer by layer (:mod:`geoprobe.models.streamed`).

The probes never upcast a model: hidden states are cast to float32 after the sampled positions are
picked, and input embeddings enter float64 arithmetic a set of rows at a time.

The checkpoint's dtype is the config's ``dtype`` (``torch_dtype`` before transformers 5) when set,
else the floating dtype holding most bytes of its safetensors. :func:`check_compute_dtype` refuses,
before anything is loaded, a device that does not exist and a dtype the device cannot compute in
(bfloat16 on a GPU without native support, float64 on Apple's MPS, or any dtype a one-matrix trial
on the device fails in).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from ..errors import DeviceError
from .common import DtypeLike, torch_dtype

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("float32", "bfloat16", "float16", "float64", "auto")
"""The values ``--dtype`` accepts."""

GPU_DTYPES = ("bfloat16", "float16", "float32")
"""Checkpoint dtypes a CUDA device computes in by default."""


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` → "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def config_dtype(config: Any) -> Optional[str]:
    """The dtype a config (a dict from config.json or a transformers config) names: ``dtype``, else
    ``torch_dtype``, looked up in a nested text config first; None when unset."""
    if not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else {}
    sources = [config[k] for k in ("text_config", "language_config", "llm_config")
               if isinstance(config.get(k), dict)] + [config]
    for src in sources:
        for key in ("dtype", "torch_dtype"):
            value = src.get(key)
            if isinstance(value, str) and value not in ("", "auto"):
                return dtype_name(value)
            if value is not None and not isinstance(value, str):
                return dtype_name(value)
    return None


def checkpoint_dtype(config: Any, weights_dtype: Optional[str] = None) -> Optional[str]:
    """The checkpoint's dtype: the config's (:func:`config_dtype`), else ``weights_dtype`` (the dtype
    of most of its safetensors bytes)."""
    return config_dtype(config) or weights_dtype


def _device(device: Any) -> "torch.device":
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"--device {device!r} is not a device: {exc}") from None


def check_device(device: Any) -> "torch.device":
    """The torch device named by ``device``; :class:`DeviceError` when it is not there (CUDA absent, or
    an index past the last GPU)."""
    import torch

    dev = _device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: no CUDA device is visible (torch {torch.__version__}"
                              f"{' was built without CUDA' if torch.version.cuda is None else ''}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {device}: this machine has {count} CUDA device(s), "
                              f"cuda:0 … cuda:{count - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {device}: Apple's MPS backend is not available here; use --device cpu")
    return dev


def native_bf16(device: "torch.device") -> bool:
    """Whether CUDA ``device`` computes bfloat16 natively (compute capability 8.0 and later)."""
    import torch

    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def check_compute_dtype(device: Any, dtype: Any, *, flag: str = "--dtype") -> None:
    """Refuse ``dtype`` on ``device`` when the device cannot compute in it: bfloat16 on a GPU without
    native support, float64 on MPS, or a failing trial (a 4×4 matrix product and softmax in that dtype
    on the device). Raises :class:`DeviceError` naming ``flag``."""
    import torch

    dev = check_device(device)
    dt = torch_dtype(dtype)
    name = dtype_name(dt)
    where = f"{dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    if dev.type == "cuda" and dt == torch.bfloat16 and not native_bf16(dev):
        raise DeviceError(f"{flag} bfloat16: {where} has no native bfloat16 arithmetic (it needs compute "
                          "capability 8.0, Ampere or later); use --dtype float16 or --dtype float32")
    if dev.type == "mps" and dt == torch.float64:
        raise DeviceError(f"{flag} float64: {where} cannot compute in float64; use --dtype float32")
    try:
        x = torch.ones((4, 4), dtype=dt, device=dev)
        float((x @ x).softmax(-1).sum().item())
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DeviceError(f"{flag} {name}: {where} cannot compute in {name} ({first}); use --dtype "
                          "float32") from None


def resolve_dtype(requested: DtypeLike, device: Any, checkpoint: Optional[str]) -> "torch.dtype":
    """The dtype to compute in on ``device`` for ``requested`` (None: the default of the module
    docstring; "auto": ``checkpoint``'s dtype; a name or ``torch.dtype``: itself), checked with
    :func:`check_compute_dtype`. ``checkpoint`` is the checkpoint's dtype name, or None when unknown."""
    import torch

    dev = check_device(device)
    ckpt = torch_dtype(checkpoint) if checkpoint in ("float32", "bfloat16", "float16", "float64") else None
    if requested is not None and not (isinstance(requested, str) and requested.lower() == "auto"):
        chosen = torch_dtype(requested)
        check_compute_dtype(dev, chosen)
        return chosen
    if requested is not None:  # auto
        chosen = ckpt or torch.float32
        check_compute_dtype(dev, chosen)
        return chosen
    if dev.type != "cuda" or ckpt is None or dtype_name(ckpt) not in GPU_DTYPES:
        return torch.float32
    if ckpt == torch.bfloat16 and not native_bf16(dev):
        logger.info("%s has no native bfloat16: computing the bfloat16 checkpoint in float32", dev)
        return torch.float32
    return ckpt
