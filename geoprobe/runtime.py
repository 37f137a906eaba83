"""What every job needs from its surroundings, written once: the versions a result records, the
``GEOPROBE_*`` environment switches, optional packages, progress bars and the GPU memory free for
error messages, and the host memory available."""
from __future__ import annotations

import contextlib
import importlib
import os
import platform
import signal
import sys
import threading
from importlib import metadata
from types import ModuleType
from typing import Any, Iterator, Mapping, TypeVar

from .errors import GeoprobeError, MissingDependencyError

__all__ = ["PACKAGES", "versions", "env_flag", "env_true", "env_switch", "NATIVE_SPELLINGS", "SWITCHES",
           "check_switches", "optional_module", "progress", "NullBar", "cuda_free_bytes", "host_available_bytes",
           "interrupt_guard", "interrupted", "check_interrupt"]

T = TypeVar("T")

PACKAGES = ("geoprobe", "torch", "transformers", "peft", "accelerate", "numpy", "scipy", "powerlaw",
            "scikit-dimension", "scikit-learn", "safetensors", "gguf", "triton", "bitsandbytes")
"""The packages whose versions every profile and fine-tune result records (those installed)."""

TRUE_WORDS = frozenset({"1", "on", "yes", "true"})
FALSE_WORDS = frozenset({"0", "off", "no", "false"})


# --------------------------------------------------------------------------- versions
def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{"python": …, package: version}`` for each of ``packages`` that is installed."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------- environment switches
def env_flag(name: str, default: bool = False) -> bool:
    """A yes/no environment variable: ``1/on/yes/true`` or ``0/off/no/false`` (any case); unset or
    empty gives ``default``. Any other value is refused with a message naming the variable."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise GeoprobeError(f"environment variable {name}={os.environ[name]!r} is not understood: use 1 or 0")


def env_true(name: str) -> bool:
    """True when the environment variable holds one of the yes-spellings of :func:`env_flag`
    (``1/on/yes/true``, any case); any other value, or none, is false and never refused. For
    variables another library defines (``HF_HUB_OFFLINE``), whose other values are that library's
    business."""
    return os.environ.get(name, "").strip().lower() in TRUE_WORDS


def env_switch(name: str, values: Mapping[str, T], default: T) -> T:
    """A many-valued environment switch: ``values`` maps each accepted spelling (lower case) to its
    meaning; unset or empty gives ``default``; anything else is refused, listing the accepted values."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in values:
        return values[raw]
    accepted = ", ".join(sorted(values))
    raise GeoprobeError(f"environment variable {name}={os.environ[name]!r} is not understood: use one of "
                        f"{accepted}")


NATIVE_SPELLINGS: Mapping[str, str] = {
    **dict.fromkeys(("0", "off", "false", "no"), "off"), **dict.fromkeys(("all", "cpu"), "all"),
    **dict.fromkeys(("auto", "1", "on", "true", "yes", "cuda"), "auto")}
"""Accepted values of ``GEOPROBE_NATIVE`` (lower case) and the mode each selects."""

SWITCHES: Mapping[str, Any] = {
    "GEOPROBE_NATIVE": NATIVE_SPELLINGS,
    "GEOPROBE_PRIVATE_APIS": bool,
    "GEOPROBE_DELTA_TRITON": bool,
    "GEOPROBE_DELTA_GLUON": bool,
}
"""Every documented ``GEOPROBE_*`` switch: ``bool`` for a yes/no flag (:func:`env_flag`), else the
spellings of a many-valued switch (:func:`env_switch`). ``GEOPROBE_CACHE`` names a folder and is no
switch."""


def check_switches() -> None:
    """Refuse, naming the variable and its accepted values, any value of a :data:`SWITCHES` variable
    that is not documented; called before any work, since the modules that read a switch are imported
    only where they are needed."""
    for name, values in SWITCHES.items():
        if values is bool:
            env_flag(name)
        else:
            env_switch(name, values, None)


# --------------------------------------------------------------------------- interruption
_INTERRUPTED = threading.Event()


def interrupted() -> bool:
    """True after Ctrl-C (SIGINT) arrived inside :func:`interrupt_guard`, even where a library caught
    the KeyboardInterrupt it raised."""
    return _INTERRUPTED.is_set()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt when Ctrl-C has been pressed inside :func:`interrupt_guard`: every
    atomic write calls it before renaming into place, so no output appears after an interrupt that a
    library swallowed."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """Within the block, Ctrl-C both raises KeyboardInterrupt (Python's default) and is remembered
    (:func:`interrupted`), so that code catching the exception cannot make it vanish; the memory is
    cleared when the block ends. Only the main thread can install the handler; elsewhere the block
    runs with the handler it has."""
    _INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _INTERRUPTED.clear()


# --------------------------------------------------------------------------- optional packages
def optional_module(name: str, extra: str, purpose: str) -> ModuleType:
    """Import the optional package ``name`` on first use, or raise :class:`MissingDependencyError`
    saying that ``purpose`` needs it and naming the install command ``pip install "geoprobe[extra]"``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(
            f"{purpose} needs {name}, which is not installed: pip install \"geoprobe[{extra}]\"") from None


# --------------------------------------------------------------------------- progress
class NullBar:
    """The do-nothing stand-in for a tqdm bar (``update``, ``close``, context manager)."""

    total = 0
    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullBar":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


def progress(total: int, desc: str, *, enabled: bool = True, unit: str = "it", initial: int = 0) -> Any:
    """A tqdm bar on stderr that clears itself when done, or a :class:`NullBar` when ``enabled`` is
    false or tqdm is not installed."""
    if not enabled:
        return NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return NullBar()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True)


# --------------------------------------------------------------------------- GPU memory
def cuda_free_bytes(device: Any) -> int:
    """Bytes a new tensor on CUDA ``device`` can take: the driver's free memory plus what torch's
    caching allocator holds reserved but unused (it hands that out before asking the driver)."""
    import torch

    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def host_available_bytes() -> "int | None":
    """Bytes of host memory a new allocation can take without swapping: ``MemAvailable`` of
    /proc/meminfo (Linux), else psutil's ``available``; None when neither can tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)
