"""The checks that stand between a checkpoint and code execution or a corrupt read, written once for
every source: pickle weights are refused unless allowed (unpickling can run arbitrary code), model
code shipped with a checkpoint is refused unless trusted, and every safetensors header is opened
before the weights are read, so a truncated or corrupt file fails with a clear message."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

from ..errors import GeoprobeError, ModelLoadError, UnsafeModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_NOT_WEIGHTS = "training_args.bin"  # the Trainer's pickled arguments, not a weight file


def is_pickle_weight(name: str) -> bool:
    """True for a file name of pickle weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``; not the
    Trainer's ``training_args.bin``)."""
    return name.endswith(PICKLE_SUFFIXES) and Path(name).name != _NOT_WEIGHTS


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle weight files) directly inside ``folder``, each sorted."""
    safe = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p for p in folder.iterdir() if p.is_file() and is_pickle_weight(p.name))
    return safe, pickled


def refuse_pickle(what: str, names: Sequence[str], allow_pickle: bool) -> None:
    """Raise :class:`UnsafeModelError` when ``what`` has only pickle weights (``names``) and
    ``allow_pickle`` is false."""
    if allow_pickle:
        return
    listed = f" ({', '.join(names[:3])})" if names else ""
    raise UnsafeModelError(
        f"{what} has only pickle weights{listed}; unpickling can run arbitrary code. Convert them to "
        "safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the file")


def refuse_remote_code(what: str, auto_map: object, trust_remote_code: bool) -> None:
    """Raise :class:`UnsafeModelError` when the config names model code of its own (``auto_map``) and
    ``trust_remote_code`` is false."""
    if auto_map and not trust_remote_code:
        raise UnsafeModelError(remote_code_message(what, "ships its own model code (auto_map in "
                                                         "config.json)"))


def remote_code_message(what: str, needs: str) -> str:
    """The one wording of a refusal to run a checkpoint's own code."""
    return (f"{what} {needs}; pass trust_remote_code=True (--trust-remote-code) only if you trust "
            "its author")


def unreadable_safetensors(what: str, name: str, exc: BaseException) -> ModelLoadError:
    """The error for a safetensors file whose header cannot be read."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ModelLoadError(
        f"{what}: {name} is not a readable safetensors file (corrupt or truncated: {first})")


def safetensors_keys(path: Path, what: str) -> list[str]:
    """The tensor names in a safetensors file, read from its header alone (no tensor is read); a
    truncated or corrupt file raises :class:`ModelLoadError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # SafetensorError is not exported as a class to catch
        raise unreadable_safetensors(what, Path(path).name, exc) from None


def check_safetensors(files: Sequence[Path], what: str) -> None:
    """Open each file's header (cheap); the first unreadable one raises :class:`ModelLoadError`."""
    for f in files:
        safetensors_keys(f, what)


_TORCH_ADVICE = re.compile(r"weights_only|add_safe_globals|safe_globals|file an issue|Check the documentation",
                           re.IGNORECASE)


def is_refused_pickle(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's restricted unpickler (``weights_only=True``) refusing a file."""
    import pickle

    return isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc)


def _refusal_detail(exc: BaseException) -> str:
    """What the restricted unpickler met, in its own words, without torch's advice on how to load the
    file anyway (which would execute it)."""
    lines = str(exc).splitlines()
    if lines and lines[0].startswith("Weights only load failed"):
        lines = lines[1:]
    for line in lines:
        line = line.strip()
        if line and not _TORCH_ADVICE.search(line):
            return line.split(". ", 1)[0].rstrip(".")[:160]
    return ""


def unsafe_pickle_error(what: str, name: str, exc: BaseException) -> UnsafeModelError:
    """The one message for pickle weights the restricted unpickler refused: the file could not be
    loaded safely, and the loader will not execute it."""
    detail = _refusal_detail(exc)
    return UnsafeModelError(
        f"{what + ': ' if what else ''}{name} could not be loaded safely{f' ({detail})' if detail else ''}: it holds more than "
        "tensors, and geoprobe's loader refuses to execute code from a pickle file, --allow-pickle or "
        "not. Use safetensors weights, or a checkpoint from a source you trust")


def load_pickle(path: Union[str, Path], what: str, *, error: type[GeoprobeError] = ModelLoadError,
                **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu", **kwargs)`` with geoprobe errors: a
    file the restricted unpickler refuses is an :class:`UnsafeModelError` saying so; any other failure
    (missing, truncated, not a torch file) is ``error`` naming ``what`` and the file."""
    import torch

    path = Path(path)
    where = f"{what}: " if what else ""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, weights_only=True, map_location="cpu", **kwargs)
    except FileNotFoundError:
        raise error(f"{where}{path.name} is missing") from None
    except Exception as exc:
        if is_refused_pickle(exc) and _looks_like_torch_file(path):
            raise unsafe_pickle_error(what, path.name, exc) from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if is_refused_pickle(exc):
            first = "not a torch file"
        raise error(f"{where}{path.name} cannot be read (corrupt or truncated: {first[:200]})") from None


def _looks_like_torch_file(path: Path) -> bool:
    """Whether ``path`` starts as torch's files do: a zip archive, or a pickle of protocol 2 or later."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
