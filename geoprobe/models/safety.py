"""The checks that stand between a checkpoint and code execution or a corrupt read, written once for
every source: pickle weights are refused unless allowed (unpickling can run arbitrary code), model
code shipped with a checkpoint is refused unless trusted, and every safetensors header is opened
before the weights are read, so a truncated or corrupt file fails with a clear message."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import ModelLoadError, UnsafeModelError

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
