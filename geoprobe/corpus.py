"""Text corpora and their token counts.

A :class:`Corpus` is an ordered list of documents (prompt-sized pieces of text). Token counts c_v —
how often each vocabulary id v occurs when the corpus is tokenized — feed the frequency power law
P(k) ∝ k^(−γ) and the norm/frequency analysis of HypLoRA (arXiv 2410.04010 §4.1), which counts the
prompt tokens of each data set with special tokens included.

Where documents come from:

* a text file (``.txt``, ``.md`` or any other UTF-8 text): split on blank lines, one document per
  non-empty paragraph (stripped). Paragraphs are prompt-sized, which per-prompt δ needs; the total
  token count is nearly the same as for whole files (it differs only by the special tokens added per
  document and by tokens that would have spanned a blank line).
* a ``.jsonl`` file: one JSON value per line; a ``.json`` file: an array of records, or one object.
  ``field`` selects the text of each record by a dotted path ("question", "input.text",
  "messages.0.content"); a path step that meets a list maps over its elements, so
  "messages.content" yields every message. Without ``field``, string records are documents and
  object records use their "text" field. Empty strings are skipped.
* a folder: every ``*.txt``, ``*.md``, ``*.jsonl`` and ``*.json`` file below it (recursive, sorted by
  relative path, hidden files and folders skipped), each read as above.
* :meth:`Corpus.default`: the 79 topics of CPython's ``pydoc_data.topics`` (English reference prose
  shipped with Python, no download), one document per topic, sorted by topic name.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .errors import CorpusError
from .profile import CorpusInfo
from .records import json_problem
from .runtime import FALSE_WORDS, progress as progress_bar

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
FOLDER_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


# --------------------------------------------------------------------------- token counts
@dataclass(frozen=True)
class TokenCounts:
    """Per-vocabulary-id token counts of a corpus.

    ``counts[v]`` = number of occurrences of id v (int64, length ``len(tokenizer)``, longer only if
    the tokenizer emitted an id beyond that); ``n_tokens`` = counts.sum(); ``n_documents`` = documents
    tokenized (fewer than the corpus when ``max_tokens`` stopped early); ``corpus_sha256`` identifies
    the corpus. ``add_special_tokens`` records whether BOS/EOS/CLS/SEP were counted.
    """

    counts: np.ndarray
    n_tokens: int
    n_documents: int
    corpus_sha256: str
    add_special_tokens: bool = True
    truncated: bool = False
    seconds: float = 0.0

    @property
    def n_types(self) -> int:
        """Number of distinct ids seen."""
        return int(np.count_nonzero(self.counts))

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class Corpus:
    """An ordered collection of documents. Build one with :meth:`from_path`, :meth:`default` or
    :meth:`from_texts`; the documents are not meant to be changed afterwards (``sha256`` is
    computed once)."""

    documents: list[str]
    name: str = "corpus"
    field: Optional[str] = None

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_texts(cls, texts: Iterable[str], *, name: str = "texts",
                   field: Optional[str] = None) -> "Corpus":
        """A corpus of the given strings (empty or whitespace-only strings dropped)."""
        docs = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise CorpusError(f"document {i} of {name} is a {type(t).__name__}, not a string")
            if t.strip():
                docs.append(t)
        if not docs:
            raise CorpusError(f"corpus {name!r} is empty (no non-blank document)")
        return cls(documents=docs, name=name, field=field)

    @classmethod
    def default(cls) -> "Corpus":
        """CPython's ``pydoc_data.topics``: 79 topics of English reference prose, sorted by name."""
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip pydoc_data
            raise CorpusError(
                "the default corpus needs CPython's pydoc_data module, which this Python lacks; "
                "pass a corpus file or folder instead") from None
        return cls.from_texts((topics[k] for k in sorted(topics)), name="pydoc_data.topics")

    @classmethod
    def from_path(cls, path: Union[str, os.PathLike], field: Optional[str] = None) -> "Corpus":
        """Read a text file, a ``.jsonl``/``.json`` file, or a folder of them (module docstring).

        Raises :class:`CorpusError` for a missing path, a binary or non-UTF-8 file, invalid JSON
        (with its line number), a record without ``field`` (naming the fields it has), or a corpus
        with no non-blank document.
        """
        p = Path(path).expanduser()
        if not p.exists():
            raise CorpusError(f"corpus path {p} does not exist")
        if p.is_dir():
            files = _folder_files(p)
            if not files:
                raise CorpusError(
                    f"folder {p} holds no corpus files ({', '.join('*' + s for s in FOLDER_SUFFIXES)})")
            if field is not None and not any(f.suffix.lower() in JSON_SUFFIXES for f in files):
                raise _field_without_records(field, f"folder {p} holds only plain-text files")
            docs: list[str] = []
            for f in files:
                docs.extend(_read_file(f, field))
            name = p.resolve().name or str(p)
        elif not p.is_file():
            raise CorpusError(f"corpus path {p} is not a regular file (a device, pipe or socket); pass a "
                              "text, .jsonl or .json file, or a folder of them")
        else:
            if field is not None and p.suffix.lower() not in JSON_SUFFIXES:
                raise _field_without_records(field, f"{p} is plain text")
            docs = _read_file(p, field)
            name = p.name
        if not docs:
            raise CorpusError(f"corpus {p} is empty (no non-blank document)")
        logger.info("corpus %s: %d documents, %d characters", name, len(docs), sum(map(len, docs)))
        return cls(documents=docs, name=name, field=field)

    # ----------------------------------------------------------------- properties
    def __repr__(self) -> str:
        """One line: name, documents, characters, the start of the SHA-256, the field and the start
        of the first document (never the documents themselves)."""
        name = self.name if len(self.name) <= 60 else self.name[:59] + "…"
        field = f", field {self.field!r}" if self.field else ""
        first = self.documents[0] if self.documents else ""
        first = " ".join(first.split())
        first = first if len(first) <= 40 else first[:39] + "…"
        return (f"Corpus({name!r}: {len(self.documents):,} documents, {self.n_characters:,} "
                f"characters, sha256 {self.sha256[:12]}…{field}, first {first!r})")

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 over the documents in order, each as its UTF-8 byte length (8 bytes,
        little-endian) followed by its bytes — so no two different document lists collide by
        concatenation. Independent of ``name`` and ``field``."""
        h = hashlib.sha256()
        for d in self.documents:
            b = d.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()

    @functools.cached_property
    def n_characters(self) -> int:
        """Total number of characters (Unicode code points) over all documents."""
        return sum(len(d) for d in self.documents)

    def sample(self, n: int, seed: int = 0) -> "Corpus":
        """``n`` documents drawn without replacement (numpy ``default_rng(seed)``), kept in corpus
        order. ``n`` ≥ len(corpus) returns every document."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise CorpusError(f"sample size must be a positive integer, got {n!r}")
        if n >= len(self.documents):
            return dataclasses.replace(self, documents=list(self.documents))
        pick = np.sort(np.random.default_rng(seed).choice(len(self.documents), size=int(n),
                                                          replace=False))
        return Corpus(documents=[self.documents[i] for i in pick],
                      name=f"{self.name}[sample {int(n)}, seed {seed}]", field=self.field)

    def info(self, counts: Optional[TokenCounts] = None) -> CorpusInfo:
        """The corpus record of a profile (``n_tokens`` from ``counts``, 0 without)."""
        return CorpusInfo(name=self.name, sha256=self.sha256, n_documents=len(self.documents),
                          n_tokens=int(counts.n_tokens) if counts is not None else 0,
                          n_characters=self.n_characters, field=self.field)

    # ----------------------------------------------------------------- token counting
    def count_tokens(self, tokenizer: Any, *, batch_size: int = 1000, add_special_tokens: bool = True,
                     progress: bool = True, max_tokens: Optional[int] = None) -> TokenCounts:
        """Count each vocabulary id over the corpus: c_v = Σ_documents #{positions with id v}.

        Documents are encoded in batches of ``batch_size`` by the fast (Rust) tokenizer, which
        spreads a batch over the CPU cores; ids are accumulated with ``np.bincount``. With
        ``max_tokens`` the count stops after exactly that many tokens (documents in corpus order;
        the last one may be cut). ``progress`` shows a tqdm bar on stderr.
        """
        if batch_size < 1:
            raise CorpusError(f"batch_size must be ≥ 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise CorpusError(f"max_tokens must be ≥ 1 or None, got {max_tokens}")
        if not self.documents:
            raise CorpusError(f"corpus {self.name!r} has no documents")
        encode = _batch_encoder(tokenizer, add_special_tokens, probe=self.documents[0])
        t0 = time.perf_counter()
        bar = progress_bar(len(self.documents), f"counting tokens ({self.name})", enabled=progress,
                           unit="doc")
        try:
            tally = _count_batches(self.documents, encode, batch_size, len(tokenizer), max_tokens, bar)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        if tally.truncated:
            logger.info("token count stopped at max_tokens=%d after %d of %d documents",
                        max_tokens, tally.n_documents, len(self.documents))
        logger.info("counted %d tokens (%d types) in %d documents of %s in %.2f s (%.0f tokens/s)",
                    tally.n_tokens, int(np.count_nonzero(tally.total)), tally.n_documents, self.name,
                    seconds, tally.n_tokens / seconds if seconds > 0 else float("nan"))
        return TokenCounts(counts=tally.total, n_tokens=tally.n_tokens, n_documents=tally.n_documents,
                           corpus_sha256=self.sha256, add_special_tokens=add_special_tokens,
                           truncated=tally.truncated, seconds=seconds)


# --------------------------------------------------------------------------- token-count helpers
def _batch_encoder(tokenizer: Any, add_special_tokens: bool, probe: Optional[str] = None):
    """A function list[str] → list[list[int]] giving ``tokenizer(batch, add_special_tokens=...)``'s
    ``input_ids``.

    For a transformers fast tokenizer the Rust backend is called directly through
    ``encode_batch_fast`` (no offsets, no BatchEncoding, no Python-side padding logic). A
    tokenizer.json may switch on padding or truncation in the backend (MiniLM's pads to the longest
    sequence); ``tokenizer(...)`` turns both off per call, so here a copy of such a backend with both
    off is used. The direct path is checked once against ``tokenizer(probe)`` and abandoned (with a
    log line) if the two disagree.
    """
    backend = getattr(tokenizer, "_tokenizer", None)

    def encode_generic(batch: Sequence[str]) -> list[list[int]]:
        out = tokenizer(list(batch), add_special_tokens=add_special_tokens,
                        return_attention_mask=False)
        return list(out["input_ids"])

    if not (getattr(tokenizer, "is_fast", False) and backend is not None):
        return encode_generic
    rust = backend
    if getattr(backend, "padding", None) is not None or getattr(backend, "truncation", None) is not None:
        try:  # copied so that the caller's tokenizer keeps its settings
            rust = copy.deepcopy(backend)
            rust.no_padding()
            rust.no_truncation()
        except Exception as exc:  # an unusual backend: use the public call
            logger.info("tokenizer backend cannot be copied (%s); using tokenizer(...)", exc)
            return encode_generic
    # The Rust tokenizer spreads a batch over all cores unless TOKENIZERS_PARALLELISM is false
    # (or the process forked after it ran). It is not forced on: in a forked worker that can
    # deadlock.
    if os.environ.get("TOKENIZERS_PARALLELISM", "").strip().lower() in FALSE_WORDS:
        logger.info("TOKENIZERS_PARALLELISM is off: token counting uses one core")
    fast = getattr(rust, "encode_batch_fast", None) or rust.encode_batch

    def encode(batch: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in fast(list(batch), add_special_tokens=add_special_tokens)]

    if probe is not None:
        sample = probe[:4000]
        if encode([sample])[0] != list(encode_generic([sample])[0]):
            logger.warning("the tokenizer's Rust backend disagrees with tokenizer(...); counting "
                           "through tokenizer(...) (slower)")
            return encode_generic
    return encode


@dataclass
class _Tally:
    """The running count of :meth:`Corpus.count_tokens` (mutable, internal)."""

    total: np.ndarray
    n_tokens: int = 0
    n_documents: int = 0
    truncated: bool = False

    def add(self, ids: np.ndarray, n_documents: int) -> None:
        self.total = _accumulate(self.total, ids)
        self.n_tokens += int(ids.size)
        self.n_documents += n_documents


def _count_batches(documents: Sequence[str], encode: Any, batch_size: int, vocab: int,
                   max_tokens: Optional[int], bar: Any) -> _Tally:
    """Encode ``documents`` in batches and tally their ids, stopping after exactly ``max_tokens``
    tokens when given (the last document may be cut)."""
    tally = _Tally(total=np.zeros(vocab, dtype=np.int64))
    for start in range(0, len(documents), batch_size):
        batch = documents[start:start + batch_size]
        id_lists = encode(batch)
        lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
        if max_tokens is not None and tally.n_tokens + int(lengths.sum()) >= max_tokens:
            ids, n_whole, n_docs = _first_tokens(id_lists, lengths, max_tokens - tally.n_tokens)
            tally.add(ids, n_docs)
            tally.truncated = n_whole < len(batch) or start + len(batch) < len(documents)
            bar.update(len(batch))
            break
        tally.add(_flatten(id_lists, int(lengths.sum())), len(batch))
        bar.update(len(batch))
    return tally


def _first_tokens(id_lists: Sequence[Sequence[int]], lengths: np.ndarray,
                  keep: int) -> tuple[np.ndarray, int, int]:
    """(the first ``keep`` ids of a batch, documents taken whole, documents touched)."""
    cum = np.cumsum(lengths)
    n_whole = int(np.searchsorted(cum, keep, side="right"))
    ids = _flatten(id_lists[:n_whole], int(cum[n_whole - 1]) if n_whole else 0)
    rest = keep - ids.size
    if rest > 0:
        ids = np.concatenate([ids, np.asarray(id_lists[n_whole][:rest], np.int64)])
    return ids, n_whole, n_whole + (1 if rest > 0 else 0)


def _flatten(id_lists: Sequence[Sequence[int]], n: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=n)


def _accumulate(total: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if ids.size == 0:
        return total
    if ids.min() < 0:
        raise CorpusError("the tokenizer produced a negative token id")
    binc = np.bincount(ids, minlength=total.size)
    if binc.size > total.size:
        logger.warning("tokenizer produced id %d beyond len(tokenizer)=%d; counts extended",
                       int(ids.max()), total.size)
        total = np.concatenate([total, np.zeros(binc.size - total.size, dtype=np.int64)])
    total += binc
    return total


# --------------------------------------------------------------------------- reading files
def _field_without_records(field: str, why: str) -> CorpusError:
    return CorpusError(f"--field {field} selects a field of .jsonl/.json records, but {why}, which has no "
                       "fields; drop --field or pass a .jsonl/.json file")



def _folder_files(folder: Path) -> list[Path]:
    out = []
    for f in folder.rglob("*"):
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if f.is_file() and f.suffix.lower() in FOLDER_SUFFIXES:
            out.append(f)
    return sorted(out, key=lambda f: f.relative_to(folder).as_posix())


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CorpusError(f"{path} is a folder") from None
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(
            f"corpus file {path} looks binary (NUL byte at offset {nul}); pass a UTF-8 text, "
            ".jsonl or .json file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 text (undecodable byte at offset {exc.start}); "
            "convert it to UTF-8 or pass a text file") from None


def split_paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs of ``text`` (separated by lines holding only whitespace), stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _BLANK_LINES.split(text) if p.strip()]


def _read_file(path: Path, field: Optional[str]) -> list[str]:
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix not in JSON_SUFFIXES:
        field = None  # a plain-text file in a folder that holds records too
    if suffix == ".jsonl":
        records = _jsonl_records(text, path)
        where = lambda i: f"line {i}"  # noqa: E731
    elif suffix == ".json":
        records = _json_records(text, path)
        where = lambda i: f"record {i}"  # noqa: E731
    else:
        return split_paragraphs(text)
    docs: list[str] = []
    for pos, record in records:
        docs.extend(_select(record, field, path, where(pos)))
    if not docs:
        what = f"field {field!r}" if field else "text"
        raise CorpusError(f"{path}: no non-empty {what} in {len(records)} records")
    return [d for d in docs if d.strip()]


def _jsonl_records(text: str, path: Path) -> list[tuple[int, Any]]:
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise CorpusError(
                f"{path}: invalid JSON on line {lineno} ({exc.msg} at column {exc.colno}); "
                "each line of a .jsonl file must hold one JSON value") from None
        except (ValueError, RecursionError) as exc:
            raise CorpusError(f"{path}: unusable JSON on line {lineno} ({json_problem(exc)})") from None
    if not records:
        raise CorpusError(f"corpus file {path} is empty")
    return records


def _json_records(text: str, path: Path) -> list[tuple[int, Any]]:
    if not text.strip():
        raise CorpusError(f"corpus file {path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorpusError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise CorpusError(f"{path}: unusable JSON ({json_problem(exc)})") from None
    if isinstance(data, list):
        return list(enumerate(data))
    return [(0, data)]


def _fields_of(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(map(str, value)) if value else "none (empty object)"
    return f"none (a {type(value).__name__}, not an object)"


def _select(record: Any, field: Optional[str], path: Path, where: str) -> list[str]:
    """The strings selected from ``record`` by the dotted ``field`` path (see module docstring)."""
    if field is None:
        if isinstance(record, str):
            return [record]
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            return [record["text"]]
        raise CorpusError(
            f"{path}: {where} is not a string and has no \"text\" field; choose the text with "
            f"field=... (--field); fields there: {_fields_of(record)}")
    parts = [p for p in field.split(".")]
    if any(not p for p in parts):
        raise CorpusError(f"bad field path {field!r}: empty step")
    return _walk(record, parts, field, path, where, record)


def _walk(value: Any, parts: list[str], field: str, path: Path, where: str, record: Any) -> list[str]:
    if not parts:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if value is None:
            return []
        raise CorpusError(
            f"{path}: field {field!r} of {where} is a {type(value).__name__}, not text")
    head, rest = parts[0], parts[1:]
    if isinstance(value, dict):
        if head not in value:
            raise CorpusError(
                f"{path}: {where} has no field {field!r} (missing {head!r}); fields there: "
                f"{_fields_of(value)}")
        return _walk(value[head], rest, field, path, where, record)
    if isinstance(value, list):
        if re.fullmatch(r"-?[0-9]+", head):
            idx = int(head)
            if not -len(value) <= idx < len(value):
                raise CorpusError(
                    f"{path}: {where}: index {idx} in field {field!r} is out of range "
                    f"(list of {len(value)})")
            return _walk(value[idx], rest, field, path, where, record)
        out: list[str] = []
        for item in value:
            out.extend(_walk(item, parts, field, path, where, record))
        return out
    raise CorpusError(
        f"{path}: {where} has no field {field!r} (reached a {type(value).__name__} at {head!r}); "
        f"fields there: {_fields_of(record)}")


__all__ = ["Corpus", "TokenCounts", "split_paragraphs", "TEXT_SUFFIXES", "JSON_SUFFIXES"]
