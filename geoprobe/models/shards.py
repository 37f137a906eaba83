"""The tensors of a safetensors checkpoint, known from the file headers alone, and reading a few of
them at a time.

A safetensors file starts with an 8-byte little-endian header length and a JSON header mapping every
tensor name to its ``dtype``, ``shape`` and ``data_offsets`` (https://github.com/huggingface/safetensors,
"Format"). :class:`Checkpoint` reads those headers (kilobytes, whatever the size of the weights), so
the parameter count, the bytes of one decoder layer and the dtype of the weights are known before
anything is loaded; :meth:`Checkpoint.read` then reads only the tensors asked for, opening each file
with ``safe_open`` for that call alone, so no mapping of a multi-gigabyte shard outlives it.

The checks run here, before any weight is read: an index (``model.safetensors.index.json``) whose
weight map names files that are not in the folder, numbered shards (``model-00002-of-00004``) with some
missing and no index, and headers that are corrupt or promise more bytes than the file holds
(truncated downloads) are refused with the names of the files.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

from ..errors import ModelLoadError
from ..records import read_json
from .safety import SAFETENSORS_INDEX, unreadable_safetensors

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes per element of each safetensors dtype name."""

FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
"""The floating safetensors dtypes and their torch names."""

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<k>\d+)-of-(?P<n>\d+)\.safetensors$")
_MAX_HEADER = 100 * 2**20  # the format's own limit on a header


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, from its file's header: name, file (relative to the folder),
    shape and safetensors dtype name ("BF16", "F32", …)."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


def read_header(path: Path, what: str) -> dict[str, TensorInfo]:
    """The tensors listed in the header of safetensors file ``path``. A header that cannot be parsed,
    or whose tensors reach past the end of the file, raises :class:`ModelLoadError` naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("the file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {length:,} does not fit a file of {size:,} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise unreadable_safetensors(what, path.name, exc) from None
    if not isinstance(header, dict):
        raise unreadable_safetensors(what, path.name, ValueError("the header is not a JSON object"))
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = str(entry["dtype"]), tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise unreadable_safetensors(what, path.name, ValueError(f"bad entry for {name}: {exc}")) from None
        info = TensorInfo(name=name, file=path.name, shape=shape, dtype=dtype)
        if dtype in DTYPE_BYTES and int(hi) - int(lo) != info.nbytes:
            raise unreadable_safetensors(what, path.name, ValueError(
                f"{name} holds {int(hi) - int(lo):,} bytes, its shape {list(shape)} in {dtype} needs {info.nbytes:,}"))
        out[name] = info
        end = max(end, int(hi))
    if 8 + length + end > size:
        raise unreadable_safetensors(what, path.name, ValueError(
            f"{size:,} bytes where its header lists {8 + length + end:,}; download it again"))
    return out


def missing_numbered_shards(names: Iterable[str]) -> list[str]:
    """The shard files a numbered series (``stem-0000k-of-0000n.safetensors``) lacks, given the names
    present."""
    series: dict[tuple[str, int, int], set[int]] = {}
    for name in names:
        m = _SHARD.match(name)
        if m:
            series.setdefault((m["stem"], len(m["k"]), int(m["n"])), set()).add(int(m["k"]))
    missing = []
    for (stem, width, n), have in series.items():
        missing += [f"{stem}-{i:0{width}d}-of-{n:0{width}d}.safetensors" for i in range(1, n + 1)
                    if i not in have]
    return sorted(missing)


def _listed(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_weight_map(folder: Path, what: str) -> Optional[dict[str, str]]:
    """The weight map (tensor name → file) of ``folder``'s safetensors index, None without an index;
    the files it names are not checked (:func:`check_index` does)."""
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return None
    weight_map = read_json(index, what, error=ModelLoadError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{what}: {index.name} has no weight_map")
    return {str(k): str(v) for k, v in weight_map.items()}


def check_index(folder: Path, what: str) -> Optional[dict[str, str]]:
    """The weight map of ``folder``'s safetensors index (tensor name → file), after checking that
    every file it names is in the folder; None when there is no index. Without an index, a numbered
    shard series with gaps is refused. Raises :class:`ModelLoadError` naming the missing files."""
    weight_map = read_weight_map(folder, what)
    if weight_map is None:
        present = [p.name for p in folder.glob("*.safetensors")]
        gaps = missing_numbered_shards(present)
        if gaps:
            raise ModelLoadError(f"{what}: shard files are missing: {_listed(gaps)} (and there is no "
                                 f"{SAFETENSORS_INDEX}); download the checkpoint again")
        return None
    absent = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
    if absent:
        raise ModelLoadError(f"{what}: {SAFETENSORS_INDEX} names {len(absent)} file(s) that are not in the "
                             f"folder: {_listed(absent)}; download them again")
    return weight_map


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of the safetensors checkpoint in ``folder`` (name → :class:`TensorInfo`), read
    from the headers; ``what`` names it in messages."""

    folder: Path
    what: str
    tensors: Mapping[str, TensorInfo]

    @classmethod
    def from_folder(cls, folder: Path, what: str) -> "Checkpoint":
        """Headers of every safetensors file of ``folder`` (through the index when there is one, checked
        by :func:`check_index`). Raises :class:`ModelLoadError` when the folder has no safetensors."""
        folder = Path(folder)
        weight_map = check_index(folder, what)
        files = sorted(set(weight_map.values())) if weight_map else sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{what} has no safetensors weights")
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            tensors.update(read_header(folder / fname, what))
        if weight_map:
            lost = sorted(k for k, f in weight_map.items() if k not in tensors or tensors[k].file != f)
            if lost:
                raise ModelLoadError(f"{what}: {SAFETENSORS_INDEX} lists {len(lost)} tensor(s) that are not "
                                     f"in the files it names, e.g. {_listed(lost, 3)}")
        return cls(folder=folder, what=what, tensors=tensors)

    @property
    def n_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def float_dtype(self) -> Optional[str]:
        """The torch name of the floating dtype holding most of the weights' bytes (None without
        floating tensors)."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in FLOAT_DTYPES:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return FLOAT_DTYPES[max(by, key=by.__getitem__)] if by else None

    def read(self, names: Iterable[str], *, device: Any = "cpu",
             dtype: Optional["torch.dtype"] = None) -> dict[str, "torch.Tensor"]:
        """The tensors ``names``, each read alone (``safe_open`` … ``get_tensor``) and cast to
        ``dtype`` (floating tensors only) on ``device``. Every file is opened for this call only."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.tensors:
                raise ModelLoadError(f"{self.what}: the checkpoint has no tensor {n}")
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out: dict[str, "torch.Tensor"] = {}
        for fname, keys in by_file.items():
            try:
                with safe_open(str(self.folder / fname), framework="pt") as handle:
                    for k in keys:
                        t = handle.get_tensor(k)
                        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
                        out[k] = t.to(device=device, dtype=cast)
                        del t
            except ModelLoadError:
                raise
            except Exception as exc:  # SafetensorError is not exported as a class to catch
                raise unreadable_safetensors(self.what, fname, exc) from None
        return out
