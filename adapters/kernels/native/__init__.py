"""The adapter layers' training nodes as a C++ extension, built on first use and cached.

A training step with a few thousand tokens is bound, for many adapter layers, by how fast the host issues
work rather than by the GPU. A Python ``torch.autograd.Function`` pays the interpreter for its backward and
for each op issued from it; PEFT LoRA's layer is a chain of C++ autograd nodes. ``layers.cpp`` holds the
HypLoRA and HydraLoRA layer nodes as C++ autograd functions (``hyplora_linear``, ``hydra_linear``), with the
per-token HypLoRA work as a CUDA kernel (``hyplora_tokens.cu``) and a CPU loop (``hyplora_tokens_cpu.cpp``),
and HydraLoRA's router gates (softmax, outer product and their backward) likewise (``hydra_gates.*``).

The extension is compiled with :func:`torch.utils.cpp_extension.load` the first time a layer needs it (about
a minute; a C++ compiler is needed, and nvcc for the CUDA build) and cached under ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``) under a name that carries a hash of the sources. Where it cannot be
built the layers keep their Python nodes (the reason is logged once).

``GEOPROBE_NATIVE`` selects where it is used: ``auto`` (default; also ``1``/``on``/``true``/``yes``/``cuda``)
CUDA tensors only, ``all`` (or ``cpu``) CPU tensors as well, ``0``/``off``/``false``/``no`` never; any
other value is refused with a clear error. :func:`set_native_mode` changes it for the process.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from geoprobe.runtime import NATIVE_SPELLINGS, env_switch

logger = logging.getLogger(__name__)

__all__ = ["native_mode", "native_module", "native_unavailable_reason", "set_native_mode"]

HERE = Path(__file__).resolve().parent
_CPU_SOURCES = ("layers.cpp", "hyplora_tokens_cpu.cpp", "hydra_gates_cpu.cpp")
_CUDA_SOURCES = ("hyplora_tokens.cu", "hydra_gates.cu")
_HEADERS = ("dtype_codes.h", "hyplora_scalars.h", "hyplora_tokens.h", "hydra_gates.h", "warp.cuh")
_MODES = ("auto", "all", "off")


_SPELLINGS = NATIVE_SPELLINGS
"""Accepted values of GEOPROBE_NATIVE (lower case) and the mode each selects; any other value is refused."""


def _mode_from_env() -> str:
    return env_switch("GEOPROBE_NATIVE", _SPELLINGS, "auto")


_MODE = _mode_from_env()
_MODULES: dict[bool, Any] = {}  # cuda build? → module, or None after a failed build
_FAILURES: dict[bool, str] = {}


def native_mode() -> str:
    """Where the native nodes are used: ``auto`` (CUDA tensors), ``all`` (CUDA and CPU) or ``off``."""
    return _MODE


def set_native_mode(mode: str) -> str:
    """Set where the native nodes are used (``auto``, ``all`` or ``off``); returns the previous mode."""
    global _MODE
    if mode not in _MODES:
        raise ValueError(f"native mode must be one of {_MODES}, got {mode!r}")
    previous, _MODE = _MODE, mode
    return previous


def _digest(cuda: bool) -> str:
    h = hashlib.sha256()
    for name in _CPU_SOURCES + _HEADERS + (_CUDA_SOURCES if cuda else ()):
        h.update(name.encode())
        h.update((HERE / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    return h.hexdigest()[:12]


def _build(cuda: bool) -> Any:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        raise RuntimeError("no C++ compiler on PATH")
    sources = [str(HERE / n) for n in _CPU_SOURCES + (_CUDA_SOURCES if cuda else ())]
    name = f"geoprobe_layers_{'cuda' if cuda else 'cpu'}_{_digest(cuda)}"
    flags = ["-O3", "-DGEOPROBE_CUDA"] if cuda else ["-O3"]
    logger.warning("building the native adapter layers %s (once, about a minute; then cached)", name)
    return cpp_extension.load(name=name, sources=sources, extra_cflags=flags,
                              extra_cuda_cflags=["-O3"], extra_include_paths=[str(HERE)],
                              with_cuda=cuda, verbose=False)


def _first_error(exc: Exception) -> str:
    """The compiler's first error line where there is one, else the exception's last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error" in ln or ": fatal error" in ln]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0 if errors else -1][:300]}"


def _load(cuda: bool) -> Any:
    if cuda in _MODULES:
        return _MODULES[cuda]
    try:
        module = _build(cuda)
    except Exception as exc:  # no compiler, no nvcc, a failed compile: keep the Python nodes
        _FAILURES[cuda] = _first_error(exc)
        logger.warning("native adapter layers unavailable (%s); using the Python nodes", _FAILURES[cuda])
        module = None
    _MODULES[cuda] = module
    return module


_CUDA_BUILD: Optional[bool] = None


def _cuda_build() -> bool:
    """Whether this process builds the CUDA variant (CUDA torch with a device), asked once: native_module
    runs on every adapter layer's forward."""
    global _CUDA_BUILD
    if _CUDA_BUILD is None:
        _CUDA_BUILD = torch.version.cuda is not None and torch.cuda.is_available()
    return _CUDA_BUILD


def native_module(device: torch.device) -> Optional[Any]:
    """The compiled extension serving tensors on ``device`` under the current mode, or None (mode off,
    a device type the mode leaves out, or a build that failed). Builds on the first call."""
    kind = device.type
    if _MODE == "off" or (kind == "cpu" and _MODE != "all") or kind not in ("cpu", "cuda"):
        return None
    cuda = _cuda_build()
    if kind == "cuda" and not cuda:
        return None
    return _load(cuda)  # a CUDA build serves CPU tensors too


def native_unavailable_reason(device: torch.device | str) -> Optional[str]:
    """Why :func:`native_module` gives None for ``device`` (None when it gives the module)."""
    device = torch.device(device)
    if native_module(device) is not None:
        return None
    if _MODE == "off":
        return "switched off (GEOPROBE_NATIVE=0 or set_native_mode('off'))"
    if device.type == "cpu" and _MODE != "all":
        return "CPU tensors need GEOPROBE_NATIVE=all"
    return _FAILURES.get(_cuda_build(), f"device {device.type!r}")
