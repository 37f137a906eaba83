"""Records and files: the frozen-record mixin every result uses, JSON read with clear errors and
schema checks, and atomic writes (every output goes to a temporary file in the target folder and is
renamed into place, so an interrupted or failed job never leaves a half-written file)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import GeoprobeError, OutputError, ProfileError

__all__ = ["Record", "atomic_path", "replace_folder", "write_text", "write_bytes", "write_json", "read_json", "json_problem",
           "check_schema"]


# --------------------------------------------------------------------------- frozen records
class Record:
    """Mixin: JSON-ready ``to_dict`` and a type-directed ``from_dict`` for nested dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ProfileError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _from_plain(hints[f.name], data[f.name], f"{cls.__name__}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProfileError(f"{cls.__name__}: missing field {f.name!r}")
        return cls(**kwargs)


def _to_plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _to_plain(value.item())
    return value


def _from_plain(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            non_none = [a for a in args if a is not type(None)]
            if non_none and non_none[0] is float:
                return math.nan
        for a in args:
            if a is type(None):
                continue
            return _from_plain(a, value, where)
    if value is None:
        if tp is float:
            return math.nan
        return None
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_dict(value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ProfileError(f"{where}: expected a list")
        inner = args[0] if args else Any
        items = [_from_plain(inner, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: expected an object")
        inner = args[1] if len(args) == 2 else Any
        return {k: _from_plain(inner, v, where) for k, v in value.items()}
    if tp is float:
        if not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str and not isinstance(value, str):
        raise ProfileError(f"{where}: expected a string, got {value!r}")
    return value


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp",
                                   dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600; give the file the usual umask permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def replace_folder(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the complete folder ``src`` onto ``target``. An old ``target`` is moved aside into a temporary
    folder beside it first and deleted afterwards, so ``target`` is at every moment the old or the new
    complete folder (or briefly absent), never a mixture."""
    src, target = Path(src), Path(target)
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(src, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, target)
    return target


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Serialise ``obj`` to JSON (indented, NaN written as null) and write it atomically. Text is
    written as UTF-8, or as ``\\u`` escapes throughout when it holds a lone surrogate (a file name
    that was not UTF-8, a string read from such an escape), which UTF-8 cannot encode."""
    text = json.dumps(_finite(obj), indent=1, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(_finite(obj), indent=1, ensure_ascii=True)
    return write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None so the JSON is standard (no NaN/Infinity tokens)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike, what: str, *, error: type[GeoprobeError] = GeoprobeError,
              missing: Optional[str] = None) -> dict[str, Any]:
    """Read the JSON object in ``path``; any failure is one ``error`` naming ``what`` and the path.

    ``missing`` replaces the message for a file that does not exist (default: "<what>: <path> is
    missing"). The top level must be an object.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing or f"{what}: {path} is missing") from None
    except IsADirectoryError:
        raise error(f"{what}: {path} is a folder, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what}: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{what}: {path} is not usable JSON ({json_problem(exc)})") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {path} does not hold a JSON object")
    return data


def json_problem(exc: BaseException) -> str:
    """A short reason why ``json.loads`` failed, also for texts that follow the grammar but that Python
    cannot hold: nesting deeper than the interpreter's recursion limit, or an integer with more digits
    than ``int`` converts (``sys.get_int_max_str_digits()``, 4,300 by default)."""
    if isinstance(exc, RecursionError):
        return "arrays or objects nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno}"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text: undecodable byte at offset {exc.start}"
    if "digits" in str(exc):
        return f"an integer with more than {sys.get_int_max_str_digits():,} digits"
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def check_schema(data: dict[str, Any], what: str, *, schema: str, version: int,
                 error: type[GeoprobeError] = GeoprobeError, key: str = "schema",
                 version_key: str = "schema_version") -> None:
    """Check that ``data[key] == schema`` and that ``data[version_key]`` is an integer no newer than
    ``version``; raise ``error`` naming ``what`` otherwise."""
    if data.get(key) != schema:
        raise error(f"{what} is not a {schema} file ({key} {data.get(key)!r})")
    got = data.get(version_key)
    if not isinstance(got, int) or isinstance(got, bool):
        raise error(f"{what}: {version_key} {got!r} is not an integer")
    if got > version:
        raise error(f"{what} has {version_key} {got}, newer than this geoprobe reads ({version}); "
                    "upgrade geoprobe")
