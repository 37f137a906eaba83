"""A ``.gguf`` file (and the embedded default, which is one).

GGUF files are dequantised by transformers (``from_pretrained(folder, gguf_file=name)``, about 20–30 s
for SmolLM2 on 2 cores). The result is cached as a safetensors folder under
``$GEOPROBE_CACHE/models/<sha256[:16]>/`` (default ``~/.cache/geoprobe/models/…``), keyed by the
SHA-256 of the whole GGUF file; the next load reads that copy in about a second. The file hash itself
is remembered in ``models/hashes.json`` keyed by (real path, size, mtime_ns), so an unchanged file is
not re-hashed; any change of size or modification time triggers a full re-hash. The cache folder is
written to a temporary folder and renamed into place, so a crash never leaves a half-written copy.
Embedding-only reads dequantise just ``token_embd.weight`` with ``gguf.quants``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from ..errors import GeoprobeError, MissingDependencyError, ModelLoadError
from ..records import read_json, replace_folder, write_json
from .common import LoadedModel, finish, to_device, tokenizer_from
from .folder import folder_embeddings, load_folder
from .precision import resolve_dtype

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the tokenizer's special tokens aligned with the file's metadata (align_special_tokens)
CACHE_MARKER = "geoprobe_cache.json"


# --------------------------------------------------------------------------- the cache
def cache_root() -> Path:
    """Root of geoprobe's cache: ``$GEOPROBE_CACHE``, else ``$XDG_CACHE_HOME/geoprobe``, else
    ``~/.cache/geoprobe``."""
    env = os.environ.get("GEOPROBE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "geoprobe"


def _hash_index_path() -> Path:
    return cache_root() / "models" / "hashes.json"


def file_sha256(path: Union[str, os.PathLike], *, chunk_size: int = 1 << 20, remember: bool = True) -> str:
    """SHA-256 of a file, read in ``chunk_size`` pieces. The digest is remembered in
    ``<cache>/models/hashes.json`` keyed by (real path, size, mtime_ns) and reused while those match;
    ``remember=False`` reuses a remembered digest but adds none (for a file not yet known to load:
    :func:`remember_sha256` records it once it has)."""
    p = Path(path)
    st = p.stat()
    entry = _hash_index().get(str(p.resolve()))
    if isinstance(entry, dict) and entry.get("size") == st.st_size \
            and entry.get("mtime_ns") == st.st_mtime_ns and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    digest = h.hexdigest()
    if remember:
        remember_sha256(p, digest)
    return digest


def _hash_index() -> dict[str, Any]:
    with contextlib.suppress(GeoprobeError):
        return read_json(_hash_index_path(), "hash index")
    return {}


def remember_sha256(path: Union[str, os.PathLike], digest: str) -> None:
    """Record ``digest`` as the SHA-256 of ``path`` in the hash index (a failure to write the index
    only costs a re-hash next time)."""
    p = Path(path)
    st = p.stat()
    index = _hash_index()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    if index.get(str(p.resolve())) == entry:
        return
    index[str(p.resolve())] = entry
    try:
        write_json(_hash_index_path(), index)
    except GeoprobeError as exc:
        logger.info("cannot remember the hash of %s: %s", p, exc)


def gguf_cache_dir(path: Union[str, os.PathLike]) -> Path:
    """The cache folder of a GGUF file's safetensors copy: ``<cache>/models/<sha256[:16]>``."""
    return cache_root() / "models" / file_sha256(path)[:16]


def _cache_valid(folder: Path, sha: str) -> bool:
    """True when ``folder`` holds a finished copy of the GGUF file with digest ``sha``, written in
    this cache format by the same transformers major version."""
    import transformers

    try:
        marker = read_json(folder / CACHE_MARKER, "GGUF cache marker")
    except GeoprobeError:
        return False
    return bool(marker.get("sha256") == sha and marker.get("format") == CACHE_FORMAT
                and str(marker.get("transformers", "")).split(".")[0]
                == transformers.__version__.split(".")[0])


def cached_copy(path: Path) -> Optional[Path]:
    """The cache folder of ``path`` if a valid copy exists (no conversion)."""
    try:
        sha = file_sha256(path, remember=False)
    except OSError:
        return None
    folder = cache_root() / "models" / sha[:16]
    if not _cache_valid(folder, sha):
        return None
    remember_sha256(path, sha)
    return folder


# --------------------------------------------------------------------------- the file
def require(*modules: str) -> None:
    """Raise :class:`MissingDependencyError` naming the install command when a module is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"reading GGUF files needs {', '.join(missing)}: pip install {' '.join(missing)}")


def check_magic(path: Path) -> None:
    """Refuse a file that does not start with the GGUF magic bytes, or whose header is damaged
    (:func:`check_header`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head == b"GGUF":
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    check_header(data, path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); the file is "
            "corrupt or not a model")


# GGUF value types (the GGUF specification, ggml/docs/gguf.md): scalar sizes, string, array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_NESTING = 8


def check_header(data: Any, path: Path) -> None:
    """Walk the header of the GGUF bytes ``data`` (version 2 or 3): every metadata key and value and
    every tensor entry, refusing a length, count, value type or tensor extent that the file cannot
    hold. The gguf library's reader trusts these fields and reads array items one by one, so a
    damaged count (2⁴⁰ items) keeps it busy for hours instead of failing; this walk is bounded by the
    file's size (a count is checked against the bytes left before any item is read)."""
    from gguf.constants import GGML_QUANT_SIZES

    size = len(data)

    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path} is not a readable GGUF file: {what} (at byte {pos:,} of {size:,}); "
                              "it is truncated or corrupt. Download or reinstall it.")

    def take(fmt: str) -> int:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise bad("the header ends early")
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += n
        return value

    def skip(n: int, what: str) -> None:
        nonlocal pos
        if n > size - pos:
            raise bad(f"{what} of {n:,} bytes runs past the end of the file")
        pos += n

    def value(vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR_BYTES:
            skip(_SCALAR_BYTES[vtype], "a value")
        elif vtype == _STRING:
            skip(take("<Q"), "a string")
        elif vtype == _ARRAY and depth < _MAX_NESTING:
            itype, count = take("<I"), take("<Q")
            if itype in _SCALAR_BYTES:
                skip(count * _SCALAR_BYTES[itype], f"an array of {count:,} values")
                return
            if count > (size - pos) // 8:  # every string or array item takes at least 8 bytes
                raise bad(f"an array of {count:,} items does not fit in the file")
            for _ in range(count):
                value(itype, depth + 1)
        else:
            raise bad(f"unknown metadata value type {vtype}")

    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise bad(f"GGUF version {version} (geoprobe reads versions 2 and 3)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    if n_kv > (size - pos) // 13 or n_tensors > (size - pos) // 24:  # smallest entry sizes
        raise bad(f"{n_kv:,} metadata entries and {n_tensors:,} tensors do not fit in the file")
    alignment = 32
    for _ in range(n_kv):
        key_len = take("<Q")
        start = pos
        skip(key_len, "a metadata key")
        vtype = take("<I")
        if bytes(data[start:pos - 4]) == b"general.alignment" and vtype == _UINT32:
            alignment = take("<I")
            if alignment == 0 or alignment & (alignment - 1):
                raise bad(f"general.alignment {alignment} is not a power of two")
        else:
            value(vtype)
    extents = []
    for _ in range(n_tensors):
        skip(take("<Q"), "a tensor name")
        n_dims = take("<I")
        if n_dims > 8:
            raise bad(f"a tensor with {n_dims:,} dimensions")
        n_elems = 1
        for _ in range(n_dims):
            n_elems *= take("<Q")
        ttype, offset = take("<I"), take("<Q")
        if ttype not in {int(t) for t in GGML_QUANT_SIZES}:
            raise bad(f"unknown tensor type {ttype}")
        block, type_size = GGML_QUANT_SIZES[ttype]
        extents.append((offset, n_elems * type_size // block))
    start = -(-pos // alignment) * alignment
    for offset, n_bytes in extents:
        if start + offset + n_bytes > size:
            raise bad(f"a tensor of {n_bytes:,} bytes at offset {start + offset:,} runs past the end of the file")


def _gguf_error(path: Path, exc: BaseException) -> ModelLoadError:
    size = path.stat().st_size if path.exists() else 0
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ModelLoadError(
        f"cannot read GGUF file {path} ({size:,} bytes): it is truncated or corrupt "
        f"({type(exc).__name__}: {first}). Download or reinstall it.")


# --------------------------------------------------------------------------- the whole model
def load_gguf(path: Path, *, device: str, dtype: Any, name: str, source: str) -> LoadedModel:
    """The model of a GGUF file: its cached safetensors copy when valid, else dequantised (and the
    copy written for next time). The copy is read on the CPU and then moved to ``device``, so a failure
    to move it (a device without the memory) never discards a good copy; the file's hash is remembered
    only once the file has loaded."""
    require("gguf", "accelerate")
    path = Path(path)
    check_magic(path)
    dtype = resolve_dtype(dtype, device, "float32")  # dequantised to float32
    sha = file_sha256(path, remember=False)
    folder = cache_root() / "models" / sha[:16]
    if _cache_valid(folder, sha):
        t0 = time.perf_counter()
        try:
            lm = load_folder(folder, device="cpu", dtype=dtype, allow_pickle=False,
                             trust_remote_code=False, name=name, source=source)
        except GeoprobeError as exc:
            logger.warning("cached copy %s is unusable (%s); converting %s again", folder, exc, path)
        else:
            logger.info("read %s from the cache %s in %.2f s", path.name, folder, time.perf_counter() - t0)
            remember_sha256(path, sha)
            return to_device(lm, device)
    model, tokenizer = _convert_gguf(path)
    remember_sha256(path, sha)
    _write_gguf_cache(model, tokenizer, folder, path, sha)
    return finish(model, tokenizer, name=name, source=source, device=device, dtype=dtype,
                  causal=True)


def _convert_gguf(path: Path) -> tuple[Any, Any]:
    """Dequantise a GGUF checkpoint with transformers (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("dequantising %s (one-time; the result is cached)", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    except GeoprobeError:
        raise
    except Exception as exc:
        raise _gguf_error(path, exc) from None
    align_special_tokens(tokenizer, path)
    # A GGUF-loaded model carries a GGUF quantizer that makes save_pretrained refuse (and Trainer
    # treat it as a quantized model); the weights are already dequantised, so every marker is dropped
    # (METHODS.md §9).
    model.hf_quantizer = None
    model.is_quantized = False
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    logger.info("dequantised %s in %.1f s", path.name, time.perf_counter() - t0)
    return model, tokenizer


def _write_gguf_cache(model: Any, tokenizer: Any, folder: Path, source_path: Path, sha: str) -> None:
    """Save the dequantised model and tokenizer to ``folder`` atomically (temp folder + rename); the
    marker that makes the copy valid is written last, itself atomically."""
    import transformers

    tmp: Optional[Path] = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / CACHE_MARKER, {
            "format": CACHE_FORMAT, "sha256": sha, "source": str(source_path.resolve()),
            "source_size": source_path.stat().st_size, "transformers": transformers.__version__})
        if folder.exists() and _cache_valid(folder, sha):  # a concurrent writer finished first
            return
        replace_folder(tmp, folder)  # over a stale copy (another transformers major), if any
        tmp = None
        logger.info("cached the dequantised model in %s", folder)
    except Exception as exc:  # a cache that cannot be written only costs time next run
        logger.warning("could not write the model cache %s: %s", folder, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def gguf_tokenizer(path: Path) -> Any:
    """Only the tokenizer: from the cached copy when one exists, else rebuilt from the GGUF metadata
    (seconds)."""
    cached = cached_copy(path)
    if cached is not None:
        with contextlib.suppress(GeoprobeError):
            return tokenizer_from(cached, f"cached copy of {path.name}")
    require("gguf")
    check_magic(path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise _gguf_error(path, exc) from None
    align_special_tokens(tokenizer, path)
    return tokenizer


SPECIAL_TOKEN_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                      "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(path: Path) -> dict[str, int]:
    """The special-token ids a GGUF file's metadata names (``tokenizer.ggml.{bos,eos,padding}_token_id``),
    by role (bos, eos, pad); roles the file does not name are left out."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
    except Exception as exc:
        raise _gguf_error(path, exc) from None
    out = {}
    for role, key in SPECIAL_TOKEN_KEYS.items():
        field = fields.get(key)
        if field is not None and field.data:
            out[role] = int(field.parts[field.data[0]][0])
    return out


def align_special_tokens(tokenizer: Any, path: Path) -> dict[str, tuple[Optional[int], int]]:
    """Set the tokenizer's bos, eos and pad tokens to the ids the GGUF file names, where they differ.

    The file's metadata is the authority for its own tokens, but how transformers maps them onto the
    converted tokenizer has changed between versions: SmolLM2-135M-Instruct's file names eos 2
    (``<|im_end|>``), which transformers 5.25 gives, while a GPU machine's transformers 5.17 gave
    ``<|im_start|>`` (1), so fine-tuning there ended answers with another token. Returns the changes,
    role → (old id, new id), each logged."""
    changes: dict[str, tuple[Optional[int], int]] = {}
    for role, want in gguf_special_token_ids(path).items():
        have = getattr(tokenizer, f"{role}_token_id", None)
        if have == want or not 0 <= want < len(tokenizer):
            continue
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(want))
        changes[role] = (have, want)
        logger.info("%s: the tokenizer's %s token set to %d (%r), as the file names it (was %s)", path.name,
                    role, want, tokenizer.convert_ids_to_tokens(want), have)
    return changes


# --------------------------------------------------------------------------- embeddings only
def embeddings(path: Path) -> "torch.Tensor":
    """The input-embedding table: from the cached safetensors copy when one exists, else dequantised
    from the file itself (:func:`gguf_embeddings`)."""
    cached = cached_copy(path)
    if cached is not None:
        with contextlib.suppress(GeoprobeError):
            return folder_embeddings(cached, allow_pickle=False)
    return gguf_embeddings(path)


def gguf_embeddings(path: Path) -> "torch.Tensor":
    """``token_embd.weight`` of a GGUF file, dequantised with ``gguf.quants`` (float32, CPU)."""
    import numpy as np
    import torch

    require("gguf")
    check_magic(path)
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}
    except Exception as exc:
        raise _gguf_error(path, exc) from None
    t = tensors.get("token_embd.weight")
    if t is None:
        raise ModelLoadError(f"GGUF file {path} has no token_embd.weight tensor")
    try:
        weight = dequantize(t.data, t.tensor_type)
    except Exception as exc:
        raise _gguf_error(path, exc) from None
    rows, cols = int(t.shape[-1]), int(t.shape[0])  # GGUF lists dimensions fastest-first
    weight = np.asarray(weight, dtype=np.float32).reshape(rows, cols)
    return torch.from_numpy(weight.copy())
