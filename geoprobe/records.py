"""Records and files: the frozen-record mixin every result uses, JSON read with clear errors and
schema checks, and atomic writes (every output goes to a temporary file in the target folder and is
renamed into place, so an interrupted or failed job never leaves a half-written file)."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

from . import runtime
from .errors import GeoprobeError, OutputError, ProfileError

__all__ = ["Record", "atomic_path", "atomic_folder", "replace_folder", "write_text", "write_bytes", "write_json",
           "read_json", "parse_json", "json_problem", "check_schema", "check_writable", "output_error", "error_code",
           "display_path"]


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
        try:
            record = cls(**kwargs)
        except GeoprobeError as exc:
            raise ProfileError(f"{cls.__name__}: {exc}") from None
        problem = record.check()
        if problem:
            raise ProfileError(f"{cls.__name__}: {problem}")
        return record

    def check(self) -> Optional[str]:
        """What is inconsistent in a record read from a file (lists of unequal length, indices out of
        order), or None; records with such rules override it. :meth:`from_dict` refuses a record
        whose check fails."""
        return None


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
        if tp is Any or tp is type(None):
            return None
        raise ProfileError(f"{where}: expected {_KIND.get(tp, 'a value')}, got null")
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_dict(value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            got = "a string" if isinstance(value, str) else _short(value)
            raise ProfileError(f"{where}: expected a list, got {got}")
        inner = args[0] if args else Any
        items = [_from_plain(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: expected an object, got {_short(value)}")
        inner = args[1] if len(args) == 2 else Any
        return {k: _from_plain(inner, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {_short(value)}")
        if not math.isfinite(value):
            raise ProfileError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {_short(value)}")
        return value
    if tp is bool and not isinstance(value, bool):
        raise ProfileError(f"{where}: expected true or false, got {_short(value)}")
    if tp is str and not isinstance(value, str):
        raise ProfileError(f"{where}: expected a string, got {_short(value)}")
    if tp is Any and isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(f"{where}: expected a finite number, got {value!r}")
    return value


_KIND = {int: "an integer", str: "a string", bool: "true or false"}


def _short(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for messages about a value read from a file."""
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


# --------------------------------------------------------------------------- output errors
_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or choose another location",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another location",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}
_OS_CODE = re.compile(r"\bOs \{ code: (\d+)|\[Errno (\d+)\]|os error (\d+)")


def _blocking_file(path: Path) -> Optional[Path]:
    """The first ancestor of ``path`` (or ``path`` itself) that exists but is not a folder."""
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _diagnose(path: Path) -> Optional[int]:
    """ENOSPC or EROFS when the file system that would hold ``path`` is full or read-only (for a failed
    write whose exception carries no OS error number), else None."""
    nearest = path.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    try:
        st = os.statvfs(nearest)
    except (OSError, AttributeError):
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        return errno.EROFS
    if st.f_bavail == 0:
        return errno.ENOSPC
    return None


def error_code(exc: BaseException) -> Optional[int]:
    """The OS error number behind ``exc``: its ``errno`` for an OSError, else one quoted in its
    message (safetensors and torch wrap the OS error of a failed write in their own exceptions)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    m = _OS_CODE.search(str(exc))
    if m:
        return int(next(g for g in m.groups() if g))
    return None


def output_error(path: str | os.PathLike, exc: BaseException, *, what: str = "",
                 folder: bool = False) -> OutputError:
    """The one :class:`OutputError` for a failed write of the file (or, with ``folder``, the folder)
    ``path``: ``what`` (the flag or the kind of output), the path, the reason in words (disk full,
    read-only, no permission, a folder where a file should be, a file where a folder should be) and
    what to do."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    code = error_code(exc)
    if code is None:
        code = _diagnose(path)
    blocker = _blocking_file(path.parent) if code in (errno.ENOTDIR, errno.EEXIST, None) else None
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder; remove it or choose another location"
    elif not folder and (code == errno.EISDIR or (code is None and path.is_dir())):
        reason = _ADVICE[errno.EISDIR]
    elif code in _ADVICE:
        reason = _ADVICE[code]
    else:
        text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
                if str(exc) else type(exc).__name__)
        reason = f"{text}; choose another location"
    return OutputError(f"cannot write {label}: {reason}")


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (raised while writing a temporary output) is the OS refusing the write."""
    if isinstance(exc, (GeoprobeError, KeyboardInterrupt, SystemExit, MemoryError)):
        return False
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return error_code(exc) is not None or "file write failed" in text or "No space left" in text


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders created, deepest first."""
    created = []
    for parent in [*reversed(folder.parents), folder]:
        if not parent.exists():
            created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return created[::-1]


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write created (deepest first), where they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_writable(path: str | os.PathLike, *, what: str = "", folder: bool = False) -> Path:
    """Fail now, before long work, when the file (``folder=False``) or folder ``path`` could not be
    written later: a folder where a file is asked for (or the reverse), a parent that is a file, or a
    nearest existing folder where no file can be created (read-only, no permission, no space for a
    new entry). A test file is created there and removed again; nothing else is left behind.

    Raises:
        OutputError: naming ``what`` (the flag, e.g. ``--out``), the path and what to do.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {label}: it is a file; give a folder")
    if not folder and path.is_dir():
        raise OutputError(f"cannot write {label}: it is a folder; give a file name")
    blocker = _blocking_file(path if folder else path.parent)
    if blocker is not None:
        raise OutputError(f"cannot write {label}: {blocker} is a file, not a folder; remove it or choose "
                          "another location")
    nearest = path if folder and path.is_dir() else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".geoprobe-write-test.", dir=nearest)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise output_error(path, exc, what=what, folder=folder) from None
    return path


def display_path(path: str | os.PathLike) -> str:
    """``path`` as a record should hold it: relative to the working directory when it lies under it
    (so outputs carry no machine's absolute paths), else as given."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    try:
        rel = os.path.relpath(os.path.normpath(text), os.getcwd())
    except (OSError, ValueError):  # no working directory, another drive
        return text
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return text
    return Path(rel).as_posix()


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", *, what: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception the temporary file (and any folder made for it) is removed and ``path`` is left
    untouched; a write the OS refuses (disk full, read-only, no permission, a folder in the way, a
    parent that is a file) becomes one :class:`OutputError` naming ``what`` and the path. After Ctrl-C
    nothing is renamed into place, even where a library swallowed the interrupt.
    """
    target = Path(path)
    if target.is_dir():
        raise output_error(target, IsADirectoryError(errno.EISDIR, "Is a directory"), what=what)
    created: list[Path] = []
    try:
        created = _make_folder(target.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        _remove_empty(created)
        raise output_error(target, exc, what=what) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        runtime.check_interrupt()
        if tmp_path.exists():  # mkstemp makes 0600; give the file the usual umask permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        _remove_empty(created)
        if _is_write_failure(exc):
            raise output_error(target, exc, what=what) from None
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, what: str = "") -> Iterator[Path]:
    """Yield a temporary folder beside the folder ``path``; on success it replaces ``path``
    (:func:`replace_folder`). On any exception the temporary folder, and any parent folder made for
    it, is removed and ``path`` is left as it was; refused writes become one :class:`OutputError` as
    in :func:`atomic_path`."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"cannot write {what + ' ' if what else ''}{target}: it is a file; give a folder")
    created: list[Path] = []
    try:
        created = _make_folder(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        _remove_empty(created)
        raise output_error(target, exc, what=what, folder=True) from None
    try:
        yield tmp
        runtime.check_interrupt()
        replace_folder(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if _is_write_failure(exc):
            raise output_error(target, exc, what=what, folder=True) from None
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
def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number JSON allows (write null for a missing value)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is too large for a float")
    return value


def parse_json(text: str) -> Any:
    """``json.loads`` for files we did not write: ``NaN``/``Infinity`` and numbers that overflow a
    float are refused (ValueError), as is nesting deep enough to exhaust the stack."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def read_json(path: str | os.PathLike, what: str, *, error: type[GeoprobeError] = GeoprobeError,
              missing: Optional[str] = None) -> dict[str, Any]:
    """Read the JSON object in ``path``; any failure is one ``error`` naming ``what`` and the path.

    ``missing`` replaces the message for a file that does not exist (default: "<what>: <path> is
    missing"). The top level must be an object; ``NaN``, ``Infinity`` and numbers beyond a float's
    range are refused (:func:`parse_json`).
    """
    path = Path(path)
    if path.exists() and not path.is_dir() and not path.is_file():
        raise error(f"{what}: {path} is not a regular file (a device, pipe or socket)")
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing or f"{what}: {path} is missing") from None
    except IsADirectoryError:
        raise error(f"{what}: {path} is a folder, not a JSON file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what}: {path} is not UTF-8 text (undecodable byte at offset {exc.start})") from None
    except OSError as exc:
        raise error(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
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
